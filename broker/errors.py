"""Typed errors of the messaging layer: callers catch classes, never match message text."""

from __future__ import annotations

import aiormq

__all__ = [
    "CHANNEL_GONE",
    "PUBLISH_FAILED",
    "AccessRefused",
    "BrokerUnavailable",
    "ConfigurationError",
    "ProgramError",
    "Refused",
    "Unroutable",
]

# What acking, nacking or publishing raises once the channel or connection is gone. The
# broker then requeues the delivery by itself, so the right response is to let go of it.
CHANNEL_GONE: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)
# What a publish raises when the broker is out of reach or too slow to confirm.
PUBLISH_FAILED: tuple[type[BaseException], ...] = (TimeoutError, *CHANNEL_GONE)


class ProgramError(Exception):
    """Ends a program with this message for its operator, never a traceback.

    ``status`` is the exit status: 2 for a wrong setting or usage, 1 for a failure.
    """

    status = 1


class ConfigurationError(ProgramError):
    """Permanent: a setting is missing or wrong; the message says which and what to do."""

    status = 2


class AccessRefused(ProgramError):
    """Permanent: a service refused the credentials, or the account may not do this."""


class BrokerUnavailable(ProgramError):
    """Transient: the broker is out of reach, a publish was not confirmed in time, or the
    connection is gone."""


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
