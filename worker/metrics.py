"""The worker's Prometheus metric families (SPEC §14), served by ``broker.health``.

Call sites stay one line::

    started = time.monotonic()
    answer = await handle(job)
    record_job(answer, time.monotonic() - started)

    with DEVICE_LOCK_WAIT.time():
        await take_device_lock(connection, device_id)
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import Counter, Gauge, Histogram

from worker.answers import Answer

__all__ = [
    "BATCHES_PUBLISHED",
    "DEVICE_LOCK_WAIT",
    "FOLLOW_BACKLOG",
    "FOLLOW_CHANGES",
    "FOLLOW_LAG",
    "FOLLOW_LEADER",
    "FOLLOW_PUSHES",
    "JOBS",
    "JOB_DURATION",
    "LOST_BATCHES",
    "MODEL_RESYNC_DEVICES",
    "OBJECTS",
    "JobStatus",
    "record_failed_job",
    "record_job",
]

# An answer's status, or "failed": the job raised and was not answered.
JobStatus = Literal["done", "ignored", "rejected", "failed"]
_STATUSES: tuple[JobStatus, ...] = ("done", "ignored", "rejected", "failed")

JOBS = Counter("sync_jobs_total", "Sync jobs handled, by final status.", ["status"])
JOB_DURATION = Histogram(
    "sync_job_duration_seconds",
    "Time from taking a sync job to settling it.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
OBJECTS = Counter("sync_objects_total", "Objects considered by sync jobs, by outcome.", ["outcome"])
BATCHES_PUBLISHED = Counter(
    "sync_batches_published_total", "Change batches published to device queues and confirmed."
)
DEVICE_LOCK_WAIT = Histogram(
    "sync_device_lock_wait_seconds",
    "Time a job waited in the worker for its device's turn (busy here or in another worker).",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LOST_BATCHES = Counter(
    "sync_lost_batches_total", "Batches the broker dead-lettered from device queues."
)
FOLLOW_CHANGES = Counter(
    "sync_follow_changes_total", "Captured changes the follow feed routed (this worker leading)."
)
FOLLOW_PUSHES = Counter(
    "sync_follow_pushes_total", "Pushes the follow feed served, one per device and read."
)
FOLLOW_LAG = Gauge(
    "sync_follow_lag_seconds",
    "Age of the oldest captured change the follow feed read last (0 when none waits).",
)
FOLLOW_BACKLOG = Gauge(
    "sync_follow_backlog", "Captured changes waiting to be routed, as the leader saw last."
)
FOLLOW_LEADER = Gauge("sync_follow_leader", "1 while this worker leads the follow feed.")
MODEL_RESYNC_DEVICES = Counter(
    "sync_model_resync_devices_total",
    "Devices pushed what they hold of an entity whose rules changed (worker.model_changes).",
)

# Every label value from the start, so a rate() over a quiet series reads 0, not nothing.
for _status in _STATUSES:
    JOBS.labels(status=_status)
for _outcome in ("synced", "removed", "skipped"):
    OBJECTS.labels(outcome=_outcome)


def record_job(answer: Answer, seconds: float) -> None:
    """Counts an answered job: its status, its objects by outcome and its batches."""
    JOBS.labels(status=answer.status).inc()
    JOB_DURATION.observe(seconds)
    OBJECTS.labels(outcome="synced").inc(answer.synced)
    OBJECTS.labels(outcome="removed").inc(answer.removed)
    OBJECTS.labels(outcome="skipped").inc(answer.skipped)
    BATCHES_PUBLISHED.inc(answer.batches)


def record_failed_job(seconds: float) -> None:
    """Counts a job that raised instead of producing a SyncResult."""
    JOBS.labels(status="failed").inc()
    JOB_DURATION.observe(seconds)
