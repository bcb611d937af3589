"""Agent settings: flags or ``SYNC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from broker.models import DEVICE_ID_PATTERN
from broker.settings import BrokerSettings

__all__ = ["AgentSettings"]


class AgentSettings(BrokerSettings):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    db_path: Path
    # Batches fetched ahead while one is applied; applying stays one at a time, in order.
    prefetch: int = Field(default=8, ge=1, le=1000)
