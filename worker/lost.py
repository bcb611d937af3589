"""Marks a device for a full resync when the broker dead-lettered one of its batches.

A device queue dead-letters a batch when the batch waited longer than the queue's TTL,
and a classic one also when it is full (the batch was refused; the worker that saw the
refusal marks the device too, for quorum device queues, which do not dead-letter it).
Either way the device can no longer reach the latest state from its queue alone. The
device is marked in ``sync.device``; its next job starts with a ``ResyncChange``, which
tells the agent (see ``worker.handler``).
"""

from __future__ import annotations

import logging
from functools import partial

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from broker.delivery import retry_while_held
from broker.settle import Reject, Settlement, settle
from broker.topology import device_queue_name
from worker.devices import mark_lost
from worker.errors import TRANSIENT_ERRORS
from worker.metrics import LOST_BATCHES

__all__ = ["LostBatchConsumer", "lost_device"]

log = logging.getLogger(__name__)

_QUEUE_PREFIX = device_queue_name("")
MARK_ATTEMPTS = 5
MARK_RETRY_DELAY = 1.0


def lost_device(message: AbstractIncomingMessage) -> tuple[str, str] | None:
    """The device and the broker's reason (``maxlen``, ``expired``) of a dead-lettered batch."""
    headers = message.headers or {}
    queue = str(headers.get("x-first-death-queue", ""))
    if not queue.startswith(_QUEUE_PREFIX):
        return None
    reason = str(headers.get("x-first-death-reason", "unknown"))
    return queue.removeprefix(_QUEUE_PREFIX), reason


class LostBatchConsumer:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # Not transient (say, the schema lacks the resync columns): retried slowly, a few
        # times, then given up loudly rather than looped on for ever.
        self._settlement = Settlement(
            what="lost-batch", attempts=MARK_ATTEMPTS, retry_delay=MARK_RETRY_DELAY
        )

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        lost = lost_device(message)
        if lost is None:
            await settle(message, self._settlement, Reject("names no device queue"))
            log.error(
                "dead-lettered batch names no device queue; dropped",
                extra={"message_id": message.message_id},
            )
            return
        device_id, reason = lost
        try:
            marked = await retry_while_held(
                message,
                partial(self._mark, device_id, reason),
                transient=TRANSIENT_ERRORS,
                what=f"lost batch {message.message_id}",
            )
        except Exception as error:
            if await settle(message, self._settlement, error) is not None:
                log.error(
                    "lost batch: giving up; the device must resync everything by hand",
                    extra={"device_id": device_id, "batch_id": message.message_id},
                )
            return
        if marked is None:
            return
        await settle(message, self._settlement)
        LOST_BATCHES.inc()
        log.warning(
            "batch lost; device marked for resync",
            extra={"device_id": device_id, "batch_id": message.message_id, "reason": reason},
        )

    async def _mark(self, device_id: str, reason: str) -> bool:
        await mark_lost(self._pool, device_id, reason)
        return True
