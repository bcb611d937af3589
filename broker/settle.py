"""The one place a delivery is settled: acked, handed back, or dead-lettered with a reason.

Handlers return (the delivery is acked), raise ``Reject(reason)`` (it can never succeed:
dead-lettered, never retried) or raise ``Retry`` (try again: handed back to the queue,
whose delivery count says how often it was tried; past the limit it is rejected with the
reason). Anything else a handler raises is a bug or a broken dependency, settled as a
``Retry`` so a poison message cannot loop forever. As aio-pika's ``ProcessContext`` and
arq's ``Retry`` do, consumers never ack or nack by hand.

Example::

    policy = Settlement(what="job", attempts=5, dead_letters=dead_jobs, timeout=10)
    await settle(message, policy, error)   # error: None, Reject, Retry or any exception
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from broker.delivery import ack, delivery_count, nack
from broker.errors import BrokerUnavailable, Refused
from broker.publishing import json_message, publish_confirmed

__all__ = ["REASON_HEADER", "Reject", "Retry", "Settlement", "settle"]

log = logging.getLogger(__name__)

# The header that carries a dead letter's reason.
REASON_HEADER = "x-sync-reason"


class Reject(Exception):
    """The delivery can never succeed as sent; ``reason`` goes to the dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Retry(Exception):
    """Try the delivery again later; ``cause`` names what failed (for the final reason)."""

    def __init__(self, cause: BaseException | str) -> None:
        super().__init__(cause)
        self.cause = cause if isinstance(cause, str) else type(cause).__name__


Headers = Callable[[AbstractIncomingMessage], Mapping[str, str]]


def _no_headers(message: AbstractIncomingMessage) -> Mapping[str, str]:
    return {}


@dataclass(frozen=True)
class Settlement:
    """How a consumer settles: what its messages are called in reasons, how many
    deliveries a message gets, and where rejected ones go.

    With ``dead_letters`` a rejected message is published there (its body, the reason in
    ``x-sync-reason`` and ``headers(message)``), confirmed, then acked. Without, it is
    nacked without requeue, and the queue's own dead-letter exchange takes it.
    """

    what: str
    attempts: int
    dead_letters: AbstractExchange | None = None
    timeout: float = 10.0
    headers: Headers = _no_headers
    # Before a message is handed back: a pause, so a failing dependency is not hammered.
    retry_delay: float = 0.0
    id_of: Callable[[AbstractIncomingMessage], str] = field(
        default=lambda message: str(message.message_id)
    )


Answer = Callable[[str | None], Awaitable[None]]


async def _no_answer(reason: str | None) -> None:
    return None


async def settle(
    message: AbstractIncomingMessage,
    policy: Settlement,
    error: BaseException | None = None,
    *,
    answer: Answer = _no_answer,
    earlier: bool = False,
) -> str | None:
    """Settle ``message`` after its handler returned (``error`` is ``None``) or raised.

    ``answer(reason)`` runs just before the ack: with ``None`` on success, with the reason
    once a rejection is dead-lettered; never for a message handed back. Answering before
    the ack means a process that dies in between leaves the message to be redelivered
    (and answered again), never acked and unanswered. Returns the rejection's reason, or
    ``None``.

    ``earlier=True``, on success: the ack covers every delivery of the channel before
    ``message`` not settled yet (one frame for a group a consumer handled in delivery
    order; it must have settled those that failed first).
    """
    if error is None:
        await answer(None)
        await ack(message, multiple=earlier)
        return None
    if isinstance(error, Reject):
        return await _reject(message, policy, error.reason, answer)
    retry = error if isinstance(error, Retry) else Retry(error)
    attempt = delivery_count(message) + 1
    log.error(
        "delivery failed",
        exc_info=None if isinstance(error, Retry) else error,
        extra={
            "what": policy.what,
            "message_id": policy.id_of(message),
            "attempt": attempt,
            "attempts": policy.attempts,
            "cause": retry.cause,
        },
    )
    if attempt < policy.attempts:
        await asyncio.sleep(policy.retry_delay)
        await nack(message, requeue=True)
        return None
    # The last attempt rejects the message itself, so whoever waits learns why (the
    # queue's delivery limit is the backstop if this process dies first).
    return await _reject(
        message, policy, f"{policy.what}-failed: {retry.cause} on {attempt} attempts", answer
    )


async def _reject(
    message: AbstractIncomingMessage, policy: Settlement, reason: str, answer: Answer
) -> str | None:
    if policy.dead_letters is None:
        await answer(reason)
        await nack(message, requeue=False)
        return reason
    dead = json_message(
        message.body,
        message_id=policy.id_of(message),
        headers={REASON_HEADER: reason, **policy.headers(message)},
    )
    try:
        await publish_confirmed(
            policy.dead_letters, [dead], routing_key="", timeout=policy.timeout, window=1
        )
    except (BrokerUnavailable, Refused):
        log.warning(
            "dead-letter publish failed; message handed back",
            extra={"what": policy.what, "message_id": policy.id_of(message)},
        )
        await nack(message, requeue=True)
        return None
    await answer(reason)
    await ack(message)
    return reason
