"""Worker settings: flags or ``SYNC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from broker.errors import ConfigurationError
from broker.settings import BrokerSettings
from broker.topology import DeviceQueueType

__all__ = ["ServerSettings", "WorkerSettings"]


class ServerSettings(BrokerSettings):
    """What every server-side program needs: the broker, the database and the model."""

    database_url: str = "postgresql://sync:sync@127.0.0.1:5433/sync"
    # No default: a worker must never run on a model that is not the operator's own.
    model: Path | None = None
    # RabbitMQ's management API, where syncctl creates and removes device accounts.
    management_url: str = "http://127.0.0.1:15673"
    # Password for the workers' read-only role, when `syncctl db init --worker-role` runs.
    worker_db_password: str | None = None
    # Captured changes that may wait for the follow feed; past it, capture stops and the
    # holding devices are told to resync. Set by `syncctl db init` when given (the
    # database keeps it; 1,000,000 at first).
    follow_backlog_limit: int | None = Field(default=None, ge=1_000)
    # The type of the queue a device gets at registration: classic (one node) or quorum
    # (replicated on every node of a cluster, several times the memory); docs/cluster.md.
    device_queue_type: DeviceQueueType = "classic"

    def model_path(self) -> Path:
        """The model file; ``ConfigurationError`` when none was given."""
        if self.model is None:
            raise ConfigurationError(
                "no model file: give --model PATH or set SYNC_MODEL "
                "(`syncctl model example` prints an example to start from)"
            )
        return self.model


class WorkerSettings(ServerSettings):
    name: str = "sync-worker"
    # Jobs in hand at once, running or waiting for their device's turn. A frozen worker
    # delays the jobs it holds, so this stays small.
    prefetch: int = Field(default=32, ge=1, le=1000)
    # Devices served at once; each run holds one database connection.
    concurrency: int = Field(default=16, ge=1, le=1000)
    # Jobs of one device served together in one run (one read, one stream of batches).
    max_group: int = Field(default=64, ge=1, le=1000)
    # Per device, in this worker: jobs per second (a token bucket with this burst) and
    # jobs in hand. A job past either is answered `rejected: rate-limited`.
    device_rate: float = Field(default=50.0, gt=0)
    device_burst: int = Field(default=100, ge=1)
    device_in_hand: int = Field(default=8, ge=1)
    # How long a job's answer is remembered, so a retry with the same job id is answered
    # the same and changes nothing (SPEC §7, idempotent submission).
    job_memory_hours: float = Field(default=24.0, gt=0)
    # A worker session that holds a device's lock this long without a statement (its
    # worker frozen, say) is ended by PostgreSQL, which frees the device for the others.
    # Keep it above publish_timeout: the lock is held while the batches are confirmed.
    lock_idle_timeout: float = Field(default=60.0, gt=0)
    batch_size: int = Field(default=500, ge=1, le=10_000)
    chunk_size: int = Field(default=5_000, ge=1, le=100_000)
    publish_timeout: float = Field(default=10.0, gt=0)
    confirm_window: int = Field(default=64, ge=1, le=10_000)
    # AMQP accounts that may publish jobs for any registered session (the app server);
    # device accounts always speak for their own device only.
    trusted_publishers: tuple[str, ...] = ("sync",)
    # On SIGTERM, how long jobs in hand may take to finish before they are handed back.
    shutdown_grace: float = Field(default=30.0, ge=0)
    # Follow (SPEC §12): the feed reads captured changes this often (at most), so a hot
    # row's updates coalesce into few pushes; at most this many at a time.
    follow_interval: float = Field(default=0.1, ge=0.01, le=10)
    follow_chunk: int = Field(default=5_000, ge=1, le=100_000)
    # A leading worker frozen this long loses the feed to another.
    follow_takeover: float = Field(default=15.0, ge=2)
    # After a model change, holders of the changed entities are pushed what they hold
    # again (worker.model_changes): at most this many devices a second.
    model_resync_rate: int = Field(default=50, ge=1, le=10_000)
