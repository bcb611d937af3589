"""Agent settings: flags or ``SYNC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.models import DEVICE_ID_PATTERN

__all__ = ["AgentSettings"]


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNC_", frozen=True, extra="ignore")

    amqp_url: str = "amqp://sync:sync@127.0.0.1:5673/"
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    db_path: Path
    # Batches fetched ahead while one is applied; applying stays one at a time, in order.
    prefetch: int = Field(default=8, ge=1, le=1000)
