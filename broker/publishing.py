"""Confirmed publishing: bounded by a timeout, mandatory, confirmed in windows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange

from broker.errors import PUBLISH_FAILED, BrokerUnavailable, Refused, Unroutable

__all__ = ["Confirmed", "json_message", "publish_confirmed"]


def json_message(body: bytes, *, persistent: bool = True, **properties: Any) -> aio_pika.Message:
    """A JSON message, persistent unless it is worth nothing after a broker restart (a
    progress report)."""
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=(
            aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        ),
        **properties,
    )


# Told the index (in ``messages``) of each message the broker confirmed, as it comes.
Confirmed = Callable[[int], None]


def _ignored(index: int) -> None:
    return None


async def _publish_one(
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
    timeout: float,
    confirmed: Callable[[], None],
) -> None:
    try:
        await exchange.publish(message, routing_key, mandatory=True, timeout=timeout)
    except aiormq.exceptions.PublishError as error:
        raise Unroutable(routing_key) from error
    except aiormq.exceptions.DeliveryError as error:
        # A nack: our queues nack only when full (overflow reject-publish).
        raise Refused(routing_key) from error
    except PUBLISH_FAILED as error:
        raise BrokerUnavailable(f"publish to {exchange.name!r} failed: {error!r}") from error
    confirmed()


async def publish_confirmed(
    exchange: AbstractExchange,
    messages: Sequence[aio_pika.Message],
    routing_key: str,
    *,
    timeout: float,
    window: int,
    confirmed: Confirmed | None = None,
) -> None:
    """Publish ``messages`` in order, keeping up to ``window`` unconfirmed at a time.

    Returns once the broker confirmed every message; ``confirmed(index)`` is called as
    each one is (it must not block). The channel must have been opened with
    ``publisher_confirms=True, on_return_raises=True``.

    Example::

        await publish_confirmed(changes, [json_message(b"{}")], "dev-1", timeout=5, window=64)
    """
    report = confirmed or _ignored
    for start in range(0, len(messages), window):
        chunk = messages[start : start + window]
        # A job names each object once, so the batches of one window commute; only
        # successive jobs of a device must arrive in order, and they do (one at a time).
        outcomes = await asyncio.gather(
            *(
                _publish_one(
                    exchange, message, routing_key, timeout, partial(report, start + offset)
                )
                for offset, message in enumerate(chunk)
            ),
            return_exceptions=True,
        )
        # Every publish of the window has settled (each is bounded by the timeout), so
        # none is left running unobserved when one failed.
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
