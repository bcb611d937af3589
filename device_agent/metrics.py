"""The device agent's Prometheus metric families (SPEC §14), served by ``broker.health``.

Call sites stay short::

    with BATCH_APPLY_SECONDS.time():
        applied = await store.apply_batch(batch)
    if applied:
        record_applied(len(batch.changes))
    else:
        BATCHES_SKIPPED.inc()

    record_dropped("wrong-device")
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import Counter, Histogram

__all__ = [
    "BATCHES_APPLIED",
    "BATCHES_DROPPED",
    "BATCHES_PER_COMMIT",
    "BATCHES_SKIPPED",
    "BATCH_APPLY_SECONDS",
    "CHANGES_APPLIED",
    "DropReason",
    "record_applied",
    "record_dropped",
]

# invalid: not a batch this agent can read; unappliable: read, but the store refused it;
# wrong-device: addressed to another device.
DropReason = Literal["invalid", "unappliable", "wrong-device"]
_DROP_REASONS: tuple[DropReason, ...] = ("invalid", "unappliable", "wrong-device")

BATCHES_APPLIED = Counter(
    "sync_batches_applied_total", "Change batches committed to the offline store."
)
BATCHES_SKIPPED = Counter(
    "sync_batches_skipped_total", "Change batches received again after being applied."
)
BATCHES_DROPPED = Counter(
    "sync_batches_dropped_total",
    "Change batches dead-lettered by the agent, by reason.",
    ["reason"],
)
BATCH_APPLY_SECONDS = Histogram(
    "sync_batch_apply_seconds",
    "Time to apply one change batch to the offline store: from the start of its group "
    "until the commit that made it durable.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCHES_PER_COMMIT = Histogram(
    "sync_batches_per_commit",
    "Change batches settled by one SQLite commit (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
CHANGES_APPLIED = Counter(
    "sync_changes_applied_total", "Object changes committed to the offline store."
)

for _reason in _DROP_REASONS:
    BATCHES_DROPPED.labels(reason=_reason)


def record_applied(changes: int) -> None:
    """Counts one committed batch and the changes it carried."""
    BATCHES_APPLIED.inc()
    CHANGES_APPLIED.inc(changes)


def record_dropped(reason: DropReason) -> None:
    """Counts one batch the agent dead-lettered instead of applying."""
    BATCHES_DROPPED.labels(reason=reason).inc()
