"""Handles one sync job: the session checks, the read, the decision and the publish."""

from __future__ import annotations

from collections.abc import Collection

import asyncpg
from pydantic import ValidationError

from broker.accounts import device_of_account
from broker.models import ResyncChange, Session, SyncJob, SyncResult
from worker.access import AccessPolicy
from worker.eligibility import check_job_names, decide
from worker.errors import JobRejected
from worker.metrics import DEVICE_LOCK_WAIT
from worker.model import DomainModel
from worker.publisher import BatchPublisher
from worker.resolver import fetch_rows

__all__ = ["DEVICE_LOCK_CLASS", "JobHandler", "ignored"]

# Namespaces the per-device advisory locks among any other advisory locks of the database.
DEVICE_LOCK_CLASS = 0x5D0C

# Held from here until the batches are confirmed, so two workers cannot interleave one
# device's jobs: the later reader always publishes later. It is its own statement: under
# READ COMMITTED a statement reads a snapshot taken when it starts, so only statements
# after this one see what the previous job of the device committed.
_LOCK_DEVICE = "SELECT pg_advisory_xact_lock($1, hashtext($2))"
# The device and its user's roles (always from PostgreSQL, never from the job).
_READ_DEVICE = """
SELECT d.user_id, d.offline, d.resync_reason, d.resync_since,
       ARRAY(SELECT r.role FROM sync.user_role r WHERE r.user_id = d.user_id) AS roles
FROM sync.device d WHERE d.device_id = $1
"""


def ignored(job: SyncJob, reason: str) -> SyncResult:
    return SyncResult(job_id=job.job_id, status="ignored", reason=reason)


def _session(user_id: int, device_id: str) -> Session:
    """The device's registered session; a row written by hand with a user id that jobs
    cannot carry is refused once, never retried."""
    try:
        return Session(user_id=user_id, device_id=device_id)
    except ValidationError:
        raise JobRejected(f"invalid-device-registration: user {user_id}") from None


def _resync_change(device: asyncpg.Record) -> ResyncChange | None:
    if device["resync_reason"] is None:
        return None
    return ResyncChange(reason=device["resync_reason"], since=device["resync_since"])


class JobHandler:
    """Turns a valid ``SyncJob`` into confirmed change batches and a ``SyncResult``.

    Raises ``JobRejected`` for jobs that can never succeed; transient errors propagate.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        model: DomainModel,
        publisher: BatchPublisher,
        *,
        chunk_size: int,
        trusted_publishers: Collection[str],
    ) -> None:
        self._pool = pool
        self._model = model
        self._policy = AccessPolicy(model)
        self._publisher = publisher
        self._chunk_size = chunk_size
        self._trusted_publishers = frozenset(trusted_publishers)

    async def handle(self, job: SyncJob, publisher: str | None) -> SyncResult:
        """Handle ``job`` published by the AMQP account ``publisher`` (checked by the broker)."""
        device_id, claimed_user = self._claim(job, publisher)
        if job.origin != "nanoflow":
            return ignored(job, "not-called-from-nanoflow")
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            with DEVICE_LOCK_WAIT.time():
                await conn.execute(_LOCK_DEVICE, DEVICE_LOCK_CLASS, device_id)
            device = await conn.fetchrow(_READ_DEVICE, device_id)
            if device is None:
                raise JobRejected("unknown-device")
            if claimed_user is not None and device["user_id"] != claimed_user:
                raise JobRejected("device-not-owned")
            session = _session(device["user_id"], device_id)
            if not device["offline"]:
                return ignored(job, "online-app")
            targets = job.targets()
            check_job_names(job, self._model, targets)
            rows = await fetch_rows(
                conn,
                self._policy,
                targets,
                session=session,
                roles=frozenset(device["roles"]),
                chunk_size=self._chunk_size,
            )
            decision = decide(job, targets, rows)
            resync = _resync_change(device)
            changes = [resync, *decision.changes] if resync else decision.changes
            batch_ids = await self._publisher.publish(job.job_id, session.device_id, changes)
            if resync is not None:
                # Still under the device lock: no later job's batch can be lost unseen.
                await self._resync_announced(session.device_id, resync)
        return SyncResult(
            job_id=job.job_id,
            status="done",
            synced=decision.count("synced"),
            removed=decision.count("removed"),
            skipped=decision.count("skipped"),
            objects=tuple(decision.outcomes),
            batch_ids=tuple(batch_ids),
        )

    def _claim(self, job: SyncJob, publisher: str | None) -> tuple[str, int | None]:
        """The device the job is for, and the user it claims (to check) if any.

        A device account speaks for its own device only: the session in the body is
        ignored and the user is the device's registered owner. A trusted account (the app
        server) may name any session, which must then own the device.
        """
        own_device = device_of_account(publisher)
        if own_device is not None:
            return own_device, None
        if publisher in self._trusted_publishers:
            return job.session.device_id, job.session.user_id
        raise JobRejected(f"untrusted-publisher: {publisher or 'no user_id'}")

    async def _resync_announced(self, device_id: str, resync: ResyncChange) -> None:
        """Clear the mark the device was just told about (on another connection: the job's
        transaction is read-only)."""
        await self._pool.execute(
            "UPDATE sync.device SET resync_reason = NULL, resync_since = NULL "
            "WHERE device_id = $1 AND resync_since = $2",
            device_id,
            resync.since,
        )
