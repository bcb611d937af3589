"""Serving pushes: jobs the server makes for itself, each refreshing what one device holds
(``worker.follow`` for captured changes, ``worker.model_changes`` for a changed model).

A push runs in this worker's device scheduler, under the device's lock like any job, so
pushes and jobs reach the device in the order they read and the latest state wins. A
push not answered within ``SPILL_AFTER`` (its device is busy elsewhere, say) is published
to ``sync.jobs`` instead, for any worker to serve, so one slow device never holds up the
others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from itertools import groupby
from typing import Protocol

from aio_pika.abc import AbstractExchange

from broker.errors import Refused, Unroutable
from broker.models import MAX_OBJECTS_PER_JOB, ObjectKey, ObjectList, Session, SyncJob
from broker.publishing import json_message, publish_confirmed
from worker.handler import Claimed
from worker.impact import Push

__all__ = ["FOLLOW_HEADER", "SPILL_AFTER", "PushService", "Serve", "Ticket", "push_body"]

log = logging.getLogger(__name__)

# Marks a push job, with what caused it; honoured from trusted publishers only.
FOLLOW_HEADER = "x-sync-follow"
# How long pushes held up by their device wait before they are spilled.
SPILL_AFTER = 1.0


class Ticket(Protocol):
    """A push served in this worker (``worker.consumer.PushTicket``)."""

    @property
    def served(self) -> asyncio.Future[bool]: ...
    @property
    def held_up(self) -> bool: ...


Serve = Callable[[str, Claimed], Ticket]


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


class PushService:
    """Serves pushes here, and spills those held up by their device.

    Example::

        pushes = PushService(consumer.serve_push, jobs_exchange, user_id="sync", ...)
        await pushes.serve("follow.42", {"dev-1": Push(7, {("Order", 1): None}, "Order 1")})
    """

    def __init__(
        self,
        serve: Serve,
        jobs: AbstractExchange,
        *,
        user_id: str | None,
        publish_timeout: float,
        window: int,
    ) -> None:
        self._serve_here = serve
        self._jobs = jobs
        self._user_id = user_id
        self._publish_timeout = publish_timeout
        self._window = window

    async def serve(self, job_id: str, pushes: dict[str, Push]) -> None:
        """Serve ``pushes``; returns once each was answered or is in the jobs queue. Those
        still held up by their device after ``SPILL_AFTER`` (busy in another worker, or
        behind a long job here) go to the jobs queue; those merely waiting for a slot stay
        (sending them elsewhere would only run them twice)."""
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
            log.info("pushes handed to the jobs queue", extra={"devices": len(late)})
            await self._publish(job_id, late)

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
            # The jobs queue is full or missing: the caller keeps what caused the pushes
            # and tries again.
            raise TimeoutError(f"pushes not accepted: {error}") from error
