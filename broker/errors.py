"""Typed errors of the messaging layer: callers catch classes, never match message text."""

from __future__ import annotations

import aiormq

__all__ = ["CHANNEL_GONE", "PUBLISH_FAILED", "BrokerUnavailable", "Refused", "Unroutable"]

# What acking, nacking or publishing raises once the channel or connection is gone. The
# broker then requeues the delivery by itself, so the right response is to let go of it.
CHANNEL_GONE: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)
# What a publish raises when the broker is out of reach or too slow to confirm.
PUBLISH_FAILED: tuple[type[BaseException], ...] = (TimeoutError, *CHANNEL_GONE)


class BrokerUnavailable(Exception):
    """Transient: a publish was not confirmed in time, nacked, or the connection is gone."""


class Unroutable(Exception):
    """Contract: the broker has no queue for the routing key (for example, no device queue)."""

    def __init__(self, routing_key: str) -> None:
        super().__init__(f"no queue is bound for routing key {routing_key!r}")
        self.routing_key = routing_key


class Refused(Exception):
    """Contract: the queue refused the message (nack), which here means it is full."""

    def __init__(self, routing_key: str) -> None:
        super().__init__(f"the queue for routing key {routing_key!r} refused the message")
        self.routing_key = routing_key
