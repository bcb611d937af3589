"""Agent settings: flags or ``SYNC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from broker.models import DEVICE_ID_PATTERN
from broker.settings import BrokerSettings
from broker.topology import DEVICE_QUEUE_TTL_SECONDS

__all__ = ["AgentSettings"]


class AgentSettings(BrokerSettings):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    db_path: Path
    # Batches the broker delivers ahead. Those in hand are applied as one group: one SQLite
    # transaction (one fsync) for up to ``group_batches`` batches, or until the group holds
    # ``group_changes`` changes; in delivery order, each acked once the group committed.
    prefetch: int = Field(default=64, ge=1, le=1000)
    group_batches: int = Field(default=64, ge=1, le=1000)
    group_changes: int = Field(default=10_000, ge=1)
    # Applied batch ids and tombstones are kept this long, then pruned at start. It must
    # exceed the device queue's TTL (broker.topology.DEVICE_QUEUE_TTL_SECONDS, 30 days).
    prune_after_days: float = Field(default=35, gt=DEVICE_QUEUE_TTL_SECONDS / 86400)
    # On SIGTERM, how long the batch in hand may take (say, SQLite is locked) before it is
    # let go unacked: the broker hands it over again when the agent comes back.
    shutdown_grace: float = Field(default=3.0, ge=0)
