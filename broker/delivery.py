"""Settling deliveries when the channel may already be gone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aio_pika.abc import AbstractIncomingMessage

from broker.errors import CHANNEL_GONE

__all__ = ["ack", "delivery_count", "nack", "retry_while_held"]

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_BACKOFF = 0.2
MAX_BACKOFF = 5.0


def delivery_count(message: AbstractIncomingMessage) -> int:
    """Earlier failed deliveries of ``message``, as counted by its quorum queue."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    return count if isinstance(count, int) else 0


async def ack(message: AbstractIncomingMessage, *, multiple: bool = False) -> bool:
    """Ack ``message`` (with ``multiple``, every unsettled delivery of its channel up to it
    as well); ``False`` when the channel is gone and the broker will redeliver it.

    Callers make a redelivery harmless (the agent records batch ids, a job is read again),
    so a lost ack is logged, not raised.
    """
    try:
        await message.ack(multiple=multiple)
    except CHANNEL_GONE as error:
        log.warning(
            "ack lost; the broker redelivers",
            extra={"message_id": message.message_id, "error": repr(error)},
        )
        return False
    return True


async def nack(message: AbstractIncomingMessage, *, requeue: bool) -> None:
    """Return or drop ``message``; a closed channel has returned it already."""
    try:
        await message.nack(requeue=requeue)
    except CHANNEL_GONE as error:
        log.warning("nack lost", extra={"message_id": message.message_id, "error": repr(error)})


async def retry_while_held(
    message: AbstractIncomingMessage,
    operation: Callable[[], Awaitable[T]],
    *,
    transient: tuple[type[BaseException], ...],
    what: str,
) -> T | None:
    """Run ``operation``, retrying ``transient`` errors with backoff while the delivery is ours.

    Retrying in place, not requeueing, keeps the message ahead of those fetched after it
    and does not count as a redelivery. Returns ``None`` once the channel is gone: the
    broker then requeues the message in its place. Other errors propagate.
    """
    backoff = FIRST_BACKOFF
    while True:
        try:
            return await operation()
        except transient as error:
            if message.channel.is_closed:
                log.warning(
                    "channel lost; the broker redelivers",
                    extra={"what": what, "error": repr(error)},
                )
                return None
            log.warning(
                "transient error; retrying",
                extra={"what": what, "error": repr(error), "retry_in_s": backoff},
            )
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF)
