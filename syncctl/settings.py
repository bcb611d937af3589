"""``syncctl`` settings: flags or ``SYNC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["CtlSettings"]


class CtlSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNC_", frozen=True, extra="ignore")

    amqp_url: str = "amqp://sync:sync@127.0.0.1:5673/"
    database_url: str = "postgresql://sync:sync@127.0.0.1:5433/sync"
    model: Path = Path("examples/field_service.yaml")
