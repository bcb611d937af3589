"""Handles the jobs of one device that a worker has in hand, together: the device checks,
one read of the union of their targets, the decisions, one stream of batches.

The device is taken with ``pg_try_advisory_xact_lock``: a device another worker is
serving raises ``Busy`` at once, so no job ever waits for a device while it holds a
database connection (the scheduler parks the device and tries again). The lock is held
from the read until the broker confirmed the batches and the transaction commits, so two
workers cannot interleave one device's jobs: the later reader always publishes later.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import asyncpg
from pydantic import ValidationError

from broker.accounts import device_of_account
from broker.errors import Refused, Unroutable
from broker.models import ObjectKey, ResyncChange, Session, SyncJob, SyncResult
from worker.access import AccessPolicy
from worker.answers import Answer, answer_of, done, remembered
from worker.eligibility import Decision, decide
from worker.errors import JobRejected
from worker.model import DomainModel
from worker.publisher import BatchPublisher, EncodedBatch
from worker.resolver import fetch_rows
from worker.scheduler import Busy

__all__ = ["DEVICE_LOCK_CLASS", "Claimed", "JobHandler", "Outcome", "claim", "ignored"]

# Namespaces the per-device advisory locks among any other advisory locks of the database.
DEVICE_LOCK_CLASS = 0x5D0C

# Its own statement: under READ COMMITTED a statement reads a snapshot taken when it
# starts, so only statements after this one see what the previous run of the device
# committed.
_TRY_LOCK = "SELECT pg_try_advisory_xact_lock($1, hashtext($2))"
# The device, its user's roles (always from PostgreSQL, never from the job), and which of
# the jobs in hand it has answered before (a caller that retried with the same job id).
_READ_DEVICE = """
SELECT d.user_id, d.offline, d.resync_reason, d.resync_since,
       ARRAY(SELECT r.role FROM sync.user_role r WHERE r.user_id = d.user_id) AS roles,
       ARRAY(SELECT j.job_id FROM sync.job_result j
             WHERE j.device_id = d.device_id AND j.job_id = ANY($2::text[])) AS answered
FROM sync.device d WHERE d.device_id = $1
"""
_ANSWERS = "SELECT job_id, result FROM sync.job_result WHERE device_id = $1 AND job_id = ANY($2)"
_REMEMBER = """
INSERT INTO sync.job_result (device_id, job_id, result)
SELECT $1, job_id, result FROM unnest($2::text[], $3::text[]) AS t(job_id, result)
ON CONFLICT DO NOTHING
"""
# The device was just told to resync: the mark goes (unless a newer loss moved it).
_RESYNC_ANNOUNCED = (
    "UPDATE sync.device SET resync_reason = NULL, resync_since = NULL "
    "WHERE device_id = $1 AND resync_since = $2"
)


@dataclass(frozen=True, eq=False)
class Claimed:
    """A valid job, the device it is for, the user it claims (``None`` for a device's own
    account) and its targets, computed once."""

    job: SyncJob
    device_id: str
    claimed_user: int | None
    targets: list[ObjectKey]


# What a job of a group comes to: its answer, or why it is rejected.
Outcome = Answer | JobRejected


def ignored(job: SyncJob, reason: str) -> Answer:
    return answer_of(SyncResult(job_id=job.job_id, status="ignored", reason=reason))


def claim(
    job: SyncJob, publisher: str | None, trusted_publishers: Collection[str]
) -> tuple[str, int | None]:
    """The device ``job`` is for, and the user it claims (to check) if any.

    A device account speaks for its own device only: the session in the body is ignored
    and the user is the device's registered owner. A trusted account (the app server)
    may name any session, which must then own the device.
    """
    own_device = device_of_account(publisher)
    if own_device is not None:
        return own_device, None
    if publisher in trusted_publishers:
        return job.session.device_id, job.session.user_id
    raise JobRejected(f"untrusted-publisher: {publisher or 'no user_id'}")


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
    """Turns the claimed jobs of one device into confirmed change batches and a result
    per job. Raises ``Busy`` when another worker serves the device; transient errors
    propagate; a job that can never succeed comes back as a ``JobRejected``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        model: DomainModel,
        publisher: BatchPublisher,
        *,
        chunk_size: int,
    ) -> None:
        self._pool = pool
        self._policy = AccessPolicy(model)
        self._publisher = publisher
        self._chunk_size = chunk_size

    async def handle(self, device_id: str, claimed: Sequence[Claimed]) -> list[Outcome]:
        """One outcome per job of ``claimed``, in order."""
        job_ids = [c.job.job_id for c in claimed]
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(_TRY_LOCK, DEVICE_LOCK_CLASS, device_id):
                raise Busy(device_id)
            device = await conn.fetchrow(_READ_DEVICE, device_id, job_ids)
            if device is None:
                return [JobRejected("unknown-device")] * len(claimed)
            outcomes = await self._serve(conn, device_id, device, claimed)
        return outcomes

    async def _serve(
        self,
        conn: asyncpg.Connection,
        device_id: str,
        device: asyncpg.Record,
        claimed: Sequence[Claimed],
    ) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        answered = set(device["answered"])
        first_of: dict[str, int] = {}
        to_run: list[tuple[int, Claimed]] = []
        for index, item in enumerate(claimed):
            if item.claimed_user is not None and device["user_id"] != item.claimed_user:
                outcomes[index] = JobRejected("device-not-owned")
            elif not device["offline"]:
                outcomes[index] = ignored(item.job, "online-app")
            elif item.job.job_id not in answered and item.job.job_id not in first_of:
                first_of[item.job.job_id] = index
                to_run.append((index, item))
        if to_run:
            try:
                results = await self._run(conn, device_id, device, [c for _, c in to_run])
            except JobRejected as rejected:
                results = [rejected] * len(to_run)
            outcomes.update(zip((index for index, _ in to_run), results, strict=True))
        # Retries of a job already answered, in hand now or earlier: the same answer.
        earlier = {job_id: outcomes[index] for job_id, index in first_of.items()}
        if answered:
            stored = await conn.fetch(_ANSWERS, device_id, list(answered))
            earlier.update((row["job_id"], remembered(row["result"])) for row in stored)
        return [
            outcomes[index] if index in outcomes else earlier[item.job.job_id]
            for index, item in enumerate(claimed)
        ]

    async def _run(
        self,
        conn: asyncpg.Connection,
        device_id: str,
        device: asyncpg.Record,
        claimed: Sequence[Claimed],
    ) -> list[Outcome]:
        """Read once for all of ``claimed``, decide per job, publish every batch in one
        stream, remember the answers; all under the device's lock."""
        session = _session(device["user_id"], device_id)
        union = list(dict.fromkeys(itertools.chain.from_iterable(c.targets for c in claimed)))
        found = await fetch_rows(
            conn,
            self._policy,
            union,
            user_id=session.user_id,
            roles=frozenset(device["roles"]),
            chunk_size=self._chunk_size,
        )
        resync = _resync_change(device)
        per_job: list[tuple[SyncJob, Decision, list[EncodedBatch]]] = []
        for position, item in enumerate(claimed):
            decision = decide(item.job, item.targets, found)
            changes = decision.changes
            if resync is not None and position == 0:
                changes = [resync.model_dump_json(), *changes]
            batches = self._publisher.encode(item.job.job_id, device_id, changes)
            per_job.append((item.job, decision, batches))
        try:
            await self._publisher.publish(device_id, [b for _, _, bs in per_job for b in bs])
        except Unroutable:
            raise JobRejected("no-device-queue") from None
        except Refused:
            # The queue dead-lettered the refused batch, so the device gets marked for
            # a resync; the callers learn now.
            raise JobRejected("device-queue-full") from None
        answers = [
            done(job.job_id, decision, [batch.batch_id for batch in batches])
            for job, decision, batches in per_job
        ]
        await conn.execute(
            _REMEMBER,
            device_id,
            [answer.job_id for answer in answers],
            [answer.body.decode() for answer in answers],
        )
        if resync is not None:
            # Still under the device lock: no later job's batch can be lost unseen.
            await conn.execute(_RESYNC_ANNOUNCED, device_id, resync.since)
        return list(answers)
