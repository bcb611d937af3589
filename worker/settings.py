"""Worker settings: flags or ``SYNC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["WorkerSettings"]


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNC_", frozen=True, extra="ignore")

    amqp_url: str = "amqp://sync:sync@127.0.0.1:5673/"
    database_url: str = "postgresql://sync:sync@127.0.0.1:5433/sync"
    model: Path = Path("examples/field_service.yaml")
    name: str = "sync-worker"
    # Jobs in hand at once; each holds one database connection while it runs.
    prefetch: int = Field(default=16, ge=1, le=1000)
    batch_size: int = Field(default=500, ge=1, le=10_000)
    chunk_size: int = Field(default=5_000, ge=1, le=100_000)
    publish_timeout: float = Field(default=10.0, gt=0)
    confirm_window: int = Field(default=64, ge=1, le=10_000)
