"""The follow feed (SPEC §12): one worker at a time reads the captured changes
(``worker.capture``), finds the devices holding what they may change
(``worker.impact``) and serves, per device, a push: an ordinary job for the objects the
device holds (``worker.handler``), run in this worker's device scheduler under the
device's lock like any job, so pushes and jobs reach the device in the order they read,
and the latest state wins. A push not answered within ``SPILL_AFTER`` (its device is busy
elsewhere, say) is published to ``sync.jobs`` instead, for any worker to serve, so one
slow device never holds up the feed. The feed deletes captured rows only after every
push of them was answered or confirmed by the broker, so a leader killed at any point
loses nothing; a row routed twice makes a push that changes nothing on the device.

Every worker runs a feed; the one holding a session advisory lock leads. A leader that
dies drops its connection and with it the lock; a frozen one loses its session (and the
lock) after ``follow_takeover`` seconds. The others try for the lock every second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from itertools import groupby
from typing import Protocol

import asyncpg
from aio_pika.abc import AbstractExchange

from broker.errors import ProgramError, Refused, Unroutable
from broker.models import MAX_OBJECTS_PER_JOB, ObjectKey, ObjectList, Session, SyncJob
from broker.publishing import json_message, publish_confirmed
from worker.capture import backlog, forget, overflowed_since, read_changes, start_over
from worker.database import connect
from worker.devices import DEVICE_LOCK_CLASS
from worker.errors import TRANSIENT_ERRORS
from worker.handler import Claimed
from worker.impact import Impact, Push
from worker.metrics import FOLLOW_BACKLOG, FOLLOW_CHANGES, FOLLOW_LAG, FOLLOW_LEADER, FOLLOW_PUSHES
from worker.model import DomainModel

__all__ = ["FOLLOW_HEADER", "FollowFeed", "push_body"]

log = logging.getLogger(__name__)

# Marks a push job, with what caused it; honoured from trusted publishers only.
FOLLOW_HEADER = "x-sync-follow"
# The feed's lock: the device locks' class, key 0 is no device's (hashtext gives any int).
_LEAD = "SELECT pg_try_advisory_lock($1, 0)"
_LEAD_KEY = DEVICE_LOCK_CLASS + 1
RETRY = 1.0
# How long the feed waits for pushes held up by their device before it spills them.
SPILL_AFTER = 1.0


class Ticket(Protocol):
    """A push served in this worker (``worker.consumer.PushTicket``)."""

    @property
    def served(self) -> asyncio.Future[bool]: ...
    @property
    def held_up(self) -> bool: ...


Serve = Callable[[str, Claimed], Ticket]


async def _stand_by(conn: asyncpg.Connection) -> None:
    """Until this session holds the feed's lock; asking often keeps the session alive."""
    while True:
        if await conn.fetchval(_LEAD, _LEAD_KEY):
            return
        await asyncio.sleep(RETRY)


def _claimed(job_id: str, device_id: str, push: Push) -> Claimed:
    job = SyncJob(
        job_id=job_id, session=Session(user_id=push.user_id, device_id=device_id), origin="nanoflow"
    )
    return Claimed(job, device_id, None, list(push.keys), push.cause)


def push_body(job_id: str, device_id: str, user_id: int, keys: Iterable[ObjectKey]) -> bytes:
    """A push job as JSON: a ``SyncJob`` listing the objects to refresh, by entity."""
    lists = tuple(
        ObjectList(entity, [object_id for _, object_id in group])
        for entity, group in groupby(sorted(keys), key=lambda key: key[0])
    )
    session = Session(user_id=user_id, device_id=device_id)
    job = SyncJob(job_id=job_id, session=session, origin="nanoflow", lists=lists)
    return job.model_dump_json().encode()


class FollowFeed:
    """Leads the feed when this worker holds the lock; stands by otherwise.

    Example::

        feed = FollowFeed(settings.database_url, model, jobs_exchange, user_id="sync", ...)
        task = asyncio.create_task(feed.run())
    """

    def __init__(
        self,
        database_url: str,
        model: DomainModel,
        jobs: AbstractExchange,
        serve: Serve,
        *,
        name: str,
        user_id: str | None,
        interval: float,
        chunk: int,
        takeover: float,
        publish_timeout: float,
        window: int,
    ) -> None:
        self._url = database_url
        self._name = name
        self._impact = Impact(model)
        self._jobs = jobs
        self._serve_here = serve
        self._user_id = user_id
        self._interval = interval
        self._chunk = chunk
        self._takeover = takeover
        self._publish_timeout = publish_timeout
        self._window = window

    async def run(self) -> None:
        while True:
            try:
                conn = await connect(
                    self._url,
                    # A statement that hangs (a server gone mid-reply) ends the lead too.
                    command_timeout=self._takeover,
                    server_settings={
                        # A frozen leader's session ends, and its lock with it.
                        "idle_session_timeout": str(int(self._takeover * 1000)),
                        # Says which worker leads (pg_stat_activity, with the lock).
                        "application_name": f"{self._name} follow"[:63],
                    },
                )
            except ProgramError as error:
                log.warning("follow feed: no database", extra={"error": str(error)})
                await asyncio.sleep(RETRY)
                continue
            try:
                await _stand_by(conn)
                FOLLOW_LEADER.set(1)
                log.info("follow feed: leading")
                await self._lead(conn)
            except (*TRANSIENT_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("follow feed interrupted", extra={"error": repr(error)})
            except Exception:
                # A bug: said loudly, and the feed goes on rather than stop for good.
                log.exception("follow feed failed")
            finally:
                FOLLOW_LEADER.set(0)
                conn.terminate()
            await asyncio.sleep(RETRY)

    async def _lead(self, conn: asyncpg.Connection) -> None:
        while True:
            started = time.monotonic()
            if await overflowed_since(conn) is not None:
                marked = await start_over(conn)
                log.warning(
                    "follow feed overflowed; devices told to resync", extra={"devices": len(marked)}
                )
                resyncs = {device: Push(owner, cause="follow overflow") for device, owner in marked}
                await self._serve(f"follow.resync.{int(time.time())}", resyncs)
            captured = await read_changes(conn, self._chunk)
            if captured.seqs:
                assert captured.oldest is not None
                FOLLOW_LAG.set((datetime.now(UTC) - captured.oldest).total_seconds())
                FOLLOW_BACKLOG.set(await backlog(conn))
                pushes = await self._impact.pushes(conn, captured)
                await self._serve(f"follow.{captured.seqs[-1]}", pushes)
                await forget(conn, captured.seqs)
                FOLLOW_CHANGES.inc(len(captured.seqs))
            else:
                FOLLOW_LAG.set(0)
                FOLLOW_BACKLOG.set(0)
            # Read at most this often: what comes meanwhile is read together, so a hot row's
            # updates coalesce. An idle feed polls: NOTIFY from the triggers would take a
            # database-wide lock at every writer's commit (docs/decisions.md).
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    async def _serve(self, job_id: str, pushes: dict[str, Push]) -> None:
        """Serve ``pushes`` here. Those still held up by their device after
        ``SPILL_AFTER`` (busy in another worker, or behind a long job here) go to the jobs
        queue, so the feed moves on; those merely waiting for a slot stay (sending them
        elsewhere would only run them twice)."""
        tickets = {
            device_id: self._serve_here(device_id, _claimed(job_id, device_id, push))
            for device_id, push in pushes.items()
        }
        while waiting := [t for t in tickets.values() if not t.served.done()]:
            done, _ = await asyncio.wait([t.served for t in waiting], timeout=SPILL_AFTER)
            if not done and all(t.held_up for t in waiting if not t.served.done()):
                break
        late = {
            device_id: pushes[device_id]
            for device_id, ticket in tickets.items()
            if not (ticket.served.done() and ticket.served.result())
        }
        if late:
            log.info("follow pushes handed to the jobs queue", extra={"devices": len(late)})
            await self._publish(job_id, late)
        FOLLOW_PUSHES.inc(len(pushes))

    async def _publish(self, job_id: str, pushes: dict[str, Push]) -> None:
        messages = []
        for device_id, push in pushes.items():
            keys = list(push.keys)
            # At least one job per device: an empty one announces a resync mark.
            for part, start in enumerate(range(0, max(1, len(keys)), MAX_OBJECTS_PER_JOB)):
                the_id = job_id if part == 0 else f"{job_id}.{part}"
                part_keys = keys[start : start + MAX_OBJECTS_PER_JOB]
                body = push_body(the_id, device_id, push.user_id, part_keys)
                headers = {FOLLOW_HEADER: push.cause}
                messages.append(
                    json_message(body, message_id=the_id, user_id=self._user_id, headers=headers)
                )
        try:
            await publish_confirmed(
                self._jobs, messages, "", timeout=self._publish_timeout, window=self._window
            )
        except (Refused, Unroutable) as error:
            # The jobs queue is full or missing: nothing is forgotten, the chunk is read again.
            raise TimeoutError(f"pushes not accepted: {error}") from error
