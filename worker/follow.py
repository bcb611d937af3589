"""The follow feed (SPEC §12): one worker at a time (``worker.leading``) reads the
captured changes (``worker.capture``), finds the devices holding what they may change
(``worker.impact``) and serves, per device, a push (``worker.pushes``): an ordinary job
for the objects the device holds, run under the device's lock like any job. The feed
deletes captured rows only after every push of them was answered or confirmed by the
broker, so a leader killed at any point loses nothing; a row routed twice makes a push
that changes nothing on the device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import asyncpg

from worker.capture import backlog, forget, overflowed_since, read_changes, start_over
from worker.impact import Impact, Push
from worker.leading import FEED_LOCK, lead
from worker.metrics import FOLLOW_BACKLOG, FOLLOW_CHANGES, FOLLOW_LAG, FOLLOW_LEADER, FOLLOW_PUSHES
from worker.model import DomainModel
from worker.pushes import PushService

__all__ = ["FollowFeed"]

log = logging.getLogger(__name__)


class FollowFeed:
    """Leads the feed when this worker holds the lock; stands by otherwise.

    Example::

        feed = FollowFeed(settings.database_url, model, pushes, name="worker-1", ...)
        task = asyncio.create_task(feed.run())
    """

    def __init__(
        self,
        database_url: str,
        model: DomainModel,
        pushes: PushService,
        *,
        name: str,
        interval: float,
        chunk: int,
        takeover: float,
    ) -> None:
        self._url = database_url
        self._name = name
        self._impact = Impact(model)
        self._pushes = pushes
        self._interval = interval
        self._chunk = chunk
        self._takeover = takeover

    async def run(self) -> None:
        await lead(
            self._url,
            lock=FEED_LOCK,
            name=self._name,
            what="follow feed",
            takeover=self._takeover,
            work=self._lead,
        )

    async def _lead(self, conn: asyncpg.Connection) -> None:
        FOLLOW_LEADER.set(1)
        try:
            await self._follow(conn)
        finally:
            FOLLOW_LEADER.set(0)

    async def _follow(self, conn: asyncpg.Connection) -> None:
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
        await self._pushes.serve(job_id, pushes)
        FOLLOW_PUSHES.inc(len(pushes))
