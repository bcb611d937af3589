"""Settling deliveries when the channel may already be gone."""

from __future__ import annotations

import logging

from aio_pika.abc import AbstractIncomingMessage

from broker.errors import CHANNEL_GONE

__all__ = ["ack", "nack"]

log = logging.getLogger(__name__)


async def ack(message: AbstractIncomingMessage) -> bool:
    """Ack ``message``; ``False`` when the channel is gone and the broker will redeliver it.

    Callers make a redelivery harmless (the agent records batch ids, a job is read again),
    so a lost ack is logged, not raised.
    """
    try:
        await message.ack()
    except CHANNEL_GONE as error:
        log.warning("ack lost message_id=%s: %r; the broker redelivers", message.message_id, error)
        return False
    return True


async def nack(message: AbstractIncomingMessage, *, requeue: bool) -> None:
    """Return or drop ``message``; a closed channel has returned it already."""
    try:
        await message.nack(requeue=requeue)
    except CHANNEL_GONE as error:
        log.warning("nack lost message_id=%s: %r", message.message_id, error)
