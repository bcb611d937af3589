"""Typed worker errors: contract errors are never retried, transient ones are."""

from __future__ import annotations

import asyncpg

from broker.errors import BrokerUnavailable

__all__ = ["TRANSIENT_ERRORS", "JobRejected"]


class JobRejected(Exception):
    """The job can never succeed as sent; ``reason`` goes to the caller and the DLQ."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Errors that say "try again later": the connection to PostgreSQL or RabbitMQ is gone or
# the server is not accepting work right now. Anything else is a bug or bad input.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    BrokerUnavailable,
    ConnectionError,
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    # PostgreSQL ended a run that sat idle too long (its worker was frozen): try again.
    asyncpg.IdleInTransactionSessionTimeoutError,
)
