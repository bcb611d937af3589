"""Handles the jobs of one device that a worker has in hand, together: the device checks,
one read of the union of their targets, the decisions, one stream of batches.

The device is taken with ``sync.take_device`` (a session advisory lock, tried, never
waited for): a device another worker is serving raises ``Busy`` at once, so no job ever
waits for a device while it holds a database connection (the scheduler parks the device
and tries again). The lock is held from the read until the broker confirmed the batches
and ``sync.release_device`` committed the answers, so two workers cannot interleave one
device's jobs: the later reader always publishes later. A small job costs three
statements: take (the lock, the device, its user's roles, earlier answers), fetch, and
release.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from pydantic import ValidationError

from broker.accounts import device_of_account
from broker.errors import BrokerUnavailable, Refused, Unroutable
from broker.models import ObjectKey, ResyncChange, Session, SyncJob, SyncResult
from broker.topology import DEVICE_QUEUE_MAX_LENGTH
from worker.access import AUTOCOMMITTED, MATCHES, UPSERT, VERSION, AccessPolicy
from worker.answers import Answer, answer_of, done, remembered
from worker.devices import (
    DEVICE_LOCK_CLASS,
    LET_GO,
    PEND,
    RELEASE,
    TAKE,
    mark_lost,
    max_batches,
)
from worker.eligibility import DELETED, GONE, NO_ACCESS, SYNCED, Decision, Found, decide
from worker.errors import JobRejected
from worker.model import DomainModel
from worker.progress import Report, stream_progress
from worker.publisher import BatchPublisher, EncodedBatch
from worker.queries import CompiledQuery, list_targets
from worker.resolver import fetch_rows
from worker.scheduler import Busy

__all__ = ["DEVICE_LOCK_CLASS", "Claimed", "JobHandler", "Outcome", "claim", "ignored"]

log = logging.getLogger(__name__)

_LET_GO_TIMEOUT = 5.0
_REMOVED = frozenset({DELETED, GONE, NO_ACCESS})
# What the device holds of a followed object after a run: (entity, id, version, members);
# no version: no longer held.
Holding = tuple[str, int, int | None, str | None]


@dataclass(frozen=True, eq=False)
class Claimed:
    """A valid job, the device it is for, the user it claims (``None`` for a device's own
    account) and its targets, computed once."""

    job: SyncJob
    device_id: str
    claimed_user: int | None
    targets: list[ObjectKey]
    # A follow push (``worker.follow``): what caused it. It refreshes only what the device
    # holds, and its answer is not remembered.
    push: str | None = None
    # The job's queries, compiled; listed into ``targets`` under the device's lock.
    queries: tuple[CompiledQuery, ...] = ()
    # Told how many of the job's batches the broker confirmed, when its caller asked.
    progress: Report | None = None


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
    if device["lost_reason"] is None:
        return None
    return ResyncChange(reason=device["lost_reason"], since=device["lost_since"])


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
        self._followed = frozenset(model.followed)
        self._publisher = publisher
        self._chunk_size = chunk_size

    async def handle(self, device_id: str, claimed: Sequence[Claimed]) -> list[Outcome]:
        """One outcome per job of ``claimed``, in order."""
        job_ids = [c.job.job_id for c in claimed if c.push is None]
        pending = list(
            dict.fromkeys(
                key
                for c in claimed
                if c.push is None
                for key in c.targets
                if key[0] in self._followed
            )
        )
        pushed = list(
            dict.fromkeys(key for c in claimed if c.push is not None for key in c.targets)
        )
        async with self._pool.acquire() as conn:
            device = await conn.fetchrow(
                TAKE,
                device_id,
                job_ids,
                [entity for entity, _ in pending],
                [object_id for _, object_id in pending],
                [entity for entity, _ in pushed],
                [object_id for _, object_id in pushed],
            )
            if not device["taken"]:
                raise Busy(device_id)
            if not device["known"]:
                return [JobRejected("unknown-device")] * len(claimed)
            try:
                outcomes, ran, announced, holdings = await self._serve(
                    conn, device_id, device, claimed
                )
                await conn.execute(
                    RELEASE,
                    device_id,
                    [answer.job_id for answer in ran],
                    [answer.body.decode() for answer in ran],
                    announced,
                    [holding[0] for holding in holdings],
                    [holding[1] for holding in holdings],
                    [holding[2] for holding in holdings],
                    [holding[3] for holding in holdings],
                )
            except BaseException:
                await _let_go(conn, device_id)
                raise
        return outcomes

    async def _serve(
        self,
        conn: asyncpg.Connection,
        device_id: str,
        device: asyncpg.Record,
        claimed: Sequence[Claimed],
    ) -> tuple[list[Outcome], list[Answer], datetime | None, list[Holding]]:
        """The outcome of each job, the answers of the jobs that ran (to remember), the
        resync mark they announced, if any, and what the device holds now."""
        outcomes: dict[int, Outcome] = {}
        # Retries of a job already answered, earlier or in hand now: the same answer.
        earlier: dict[str, Outcome] = {
            job_id: remembered(result)
            for job_id, result in zip(
                device["answered_ids"], device["answered_results"], strict=True
            )
        }
        first_of: dict[str, int] = {}
        to_run: list[tuple[int, Claimed]] = []
        for index, item in enumerate(claimed):
            if item.push is not None:
                to_run.append((index, item))
            elif item.claimed_user is not None and device["owner"] != item.claimed_user:
                outcomes[index] = JobRejected("device-not-owned")
            elif not device["is_offline"]:
                outcomes[index] = ignored(item.job, "online-app")
            elif item.job.job_id not in earlier and item.job.job_id not in first_of:
                first_of[item.job.job_id] = index
                to_run.append((index, item))
        ran: list[Answer] = []
        announced = None
        holdings: list[Holding] = []
        if to_run:
            # ``_run`` answers the jobs first and the pushes after them: so are they taken.
            to_run.sort(key=lambda pair: pair[1].push is not None)
            results: list[Outcome] = []
            try:
                to_run = await self._listed(conn, device_id, device, to_run, outcomes)
                if to_run:
                    results, announced, holdings = await self._run(
                        conn, device_id, device, [c for _, c in to_run]
                    )
            except JobRejected as rejected:
                results = [rejected] * len(to_run)
            outcomes.update(zip((index for index, _ in to_run), results, strict=True))
            ran = [
                result
                for (_, item), result in zip(to_run, results, strict=True)
                if item.push is None and isinstance(result, Answer)
            ]
        earlier.update((job_id, outcomes[index]) for job_id, index in first_of.items())
        answers = [
            outcomes[index] if index in outcomes else earlier[item.job.job_id]
            for index, item in enumerate(claimed)
        ]
        return answers, ran, announced, holdings

    async def _listed(
        self,
        conn: asyncpg.Connection,
        device_id: str,
        device: asyncpg.Record,
        to_run: list[tuple[int, Claimed]],
        outcomes: dict[int, Outcome],
    ) -> list[tuple[int, Claimed]]:
        """``to_run`` with each job's queries listed into its targets; a job whose queries
        list too much gets its rejection in ``outcomes`` and does not run. The followed
        objects listed become pending holdings before they are read, as named ones do in
        ``sync.take_device``."""
        if not any(c.queries for _, c in to_run if c.push is None):
            return to_run
        session = _session(device["owner"], device_id)
        listed: list[tuple[int, Claimed]] = []
        pending: dict[ObjectKey, None] = {}
        for index, item in to_run:
            if item.push is not None or not item.queries:
                listed.append((index, item))
                continue
            try:
                targets = await list_targets(
                    conn,
                    self._policy,
                    item.targets,
                    item.queries,
                    user_id=session.user_id,
                    roles=frozenset(device["owner_roles"]),
                    chunk_size=self._chunk_size,
                )
            except JobRejected as rejected:
                outcomes[index] = rejected
                continue
            found = targets[len(item.targets) :]
            pending.update(dict.fromkeys(key for key in found if key[0] in self._followed))
            listed.append((index, dataclasses.replace(item, targets=targets)))
        if pending:
            await conn.execute(
                PEND, device_id, [key[0] for key in pending], [key[1] for key in pending]
            )
        return listed

    async def _run(
        self,
        conn: asyncpg.Connection,
        device_id: str,
        device: asyncpg.Record,
        claimed: Sequence[Claimed],
    ) -> tuple[list[Outcome], datetime | None, list[Holding]]:
        """Read once for all of ``claimed``, decide per job, publish every batch in one
        stream; all under the device's lock. The pushes in hand are served as one, for
        what the device holds of their objects. Returns the answers, the resync mark the
        batches announced (if they did) and what the device holds of followed objects."""
        session = _session(device["owner"], device_id)
        held = {
            (entity, object_id): (version, members)
            for entity, object_id, version, members in zip(
                device["held_entities"],
                device["held_ids"],
                device["held_versions"],
                device["held_members"],
                strict=True,
            )
        }
        jobs = [c for c in claimed if c.push is None]
        pushes = [c for c in claimed if c.push is not None]
        refreshed = [
            key for key in dict.fromkeys(k for c in pushes for k in c.targets) if key in held
        ]
        union = list(
            dict.fromkeys(
                itertools.chain(itertools.chain.from_iterable(c.targets for c in jobs), refreshed)
            )
        )
        found = await fetch_rows(
            conn,
            self._policy,
            union,
            user_id=session.user_id,
            roles=frozenset(device["owner_roles"]),
            chunk_size=self._chunk_size,
        )
        units = [(c.job, c.targets) for c in jobs]
        if pushes:
            # What the device holds as it is now (same version, same members) is not sent.
            changed = [key for key in refreshed if _sent(found, key) != held[key]]
            units.append((pushes[0].job, changed))
        resync = _resync_change(device)
        per_job: list[tuple[SyncJob, Decision, list[EncodedBatch]]] = []
        for position, (job, targets) in enumerate(units):
            decision = decide(job, targets, found)
            changes = decision.changes
            if resync is not None and position == 0:
                changes = [resync.model_dump_json(), *changes]
            batches = self._publisher.encode(job.job_id, device_id, changes)
            per_job.append((job, decision, batches))
        # Several jobs share the stream; each one's progress counts its own batches (the
        # pushes' unit, last, has no caller to tell).
        reports = [c.progress for c in jobs] + [None] * (len(per_job) - len(jobs))
        confirmed = stream_progress(
            zip(reports, (len(batches) for _, _, batches in per_job), strict=True)
        )
        try:
            await self._publisher.publish(
                device_id, [b for _, _, bs in per_job for b in bs], confirmed=confirmed
            )
        except Unroutable:
            raise JobRejected("no-device-queue") from None
        except Refused:
            if not await self._full(conn, device_id):
                # A quorum queue refuses too while its leader's node shuts down: the
                # broker hands the jobs back, to run once another node leads it.
                raise BrokerUnavailable(f"device queue {device_id} refused a batch") from None
            # The device lost the refused batch: marked here, as a quorum queue does not
            # dead-letter it (a classic one does, and worker.lost marks the same); the
            # callers learn now.
            await mark_lost(conn, device_id, "maxlen")
            raise JobRejected("device-queue-full") from None
        answers: list[Outcome] = [
            done(job.job_id, decision, [batch.batch_id for batch in batches])
            for job, decision, batches in per_job
        ]
        if pushes:
            _log_pushed(device_id, pushes[0], per_job[-1][2])
            # The other pushes in hand were served by the first one's run.
            answers[len(jobs) :] = [answers[-1]] + [
                answer_of(SyncResult(job_id=c.job.job_id, status="done")) for c in pushes[1:]
            ]
        holdings = self._holdings(found, [decision for _, decision, _ in per_job])
        # Released with the answers, still under the lock: no later job's batch is lost
        # unseen.
        return answers, resync.since if resync is not None else None, holdings

    async def _full(self, conn: asyncpg.Connection, device_id: str) -> bool:
        """Whether the device's queue is at its limit (a refusal then means full); not
        when the broker cannot say how many batches it holds."""
        depth = await self._publisher.depth(device_id)
        limit = await max_batches(conn, device_id) or DEVICE_QUEUE_MAX_LENGTH
        return depth is not None and depth >= limit

    def _holdings(self, found: dict[str, Found], decisions: Sequence[Decision]) -> list[Holding]:
        """What the device holds of followed objects after ``decisions``, the last one's
        word on an object counting."""
        holdings: dict[ObjectKey, Holding] = {}
        for decision in decisions:
            for key, code in zip(decision.targets, decision.codes, strict=True):
                if key[0] not in self._followed:
                    continue
                sent = _sent(found, key)
                if code == SYNCED and sent is not None:
                    holdings[key] = (*key, *sent)
                elif code in _REMOVED:
                    holdings[key] = (*key, None, None)
        return list(holdings.values())


def _sent(found: dict[str, Found], key: ObjectKey) -> tuple[int, str] | None:
    """The version and readable members (as a holding records them) the device would be
    sent of ``key`` now, or ``None`` when it would get no upsert."""
    entity = found.get(key[0])
    row = entity.records.get(key[1]) if entity is not None else None
    if entity is None or row is None or row[UPSERT] is None or row[AUTOCOMMITTED]:
        return None
    return row[VERSION], ",".join(sorted(entity.readable(row[MATCHES]) or ()))


def _log_pushed(device_id: str, push: Claimed, batches: Sequence[EncodedBatch]) -> None:
    for batch in batches:
        log.info(
            "follow batch pushed",
            extra={
                "device_id": device_id,
                "job_id": push.job.job_id,
                "batch_id": batch.batch_id,
                "cause": push.push,
            },
        )


async def _let_go(conn: asyncpg.Connection, device_id: str) -> None:
    """Release the device after a run that failed. A connection that cannot do that is
    closed, which ends its session and so its lock."""
    try:
        await conn.execute(LET_GO, DEVICE_LOCK_CLASS, device_id, timeout=_LET_GO_TIMEOUT)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        conn.terminate()
    except BaseException:
        conn.terminate()
        raise
