"""The one place that connects to PostgreSQL: driver errors become messages an operator
can act on (a wrong URL, a refused login, a server out of reach)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from broker.connection import checked_url, where
from broker.errors import AccessRefused, ConfigurationError, ProgramError

__all__ = ["CONNECT_TIMEOUT", "DatabaseUnavailable", "connect", "create_pool"]

CONNECT_TIMEOUT = 10.0


class DatabaseUnavailable(ProgramError):
    """Transient: PostgreSQL is out of reach or not accepting connections now."""


def _user(url: str) -> str:
    return unquote(urlsplit(url).username or "") or "(default)"


def _checked(url: str) -> str:
    return checked_url(
        url,
        ("postgresql", "postgres"),
        "PostgreSQL URL (postgresql://user:password@host:port/database)",
    )


def _mapped(url: str, error: Exception) -> ProgramError:
    if isinstance(
        error, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
    ):
        return AccessRefused(
            f"PostgreSQL at {where(url)} refused the login of {_user(url)!r}: {error}"
        )
    if isinstance(error, asyncpg.InvalidCatalogNameError):
        return ConfigurationError(f"PostgreSQL at {where(url)}: {error}")
    if isinstance(error, asyncpg.ClientConfigurationError):
        return ConfigurationError(f"bad PostgreSQL URL: {error}")
    return DatabaseUnavailable(f"cannot reach PostgreSQL at {where(url)}: {error!r}")


_CONNECT_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.ClientConfigurationError,
)


async def connect(url: str, **options: Any) -> asyncpg.Connection:
    """One connection; raises ``ConfigurationError``, ``AccessRefused`` or
    ``DatabaseUnavailable`` instead of driver errors."""
    try:
        return await asyncpg.connect(_checked(url), timeout=CONNECT_TIMEOUT, **options)
    except _CONNECT_ERRORS as error:
        raise _mapped(url, error) from None


async def create_pool(url: str, **options: Any) -> asyncpg.Pool:
    """A connection pool, its first connection opened (and errors mapped) as in ``connect``."""
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            _checked(url), timeout=CONNECT_TIMEOUT, **options
        )
    except _CONNECT_ERRORS as error:
        raise _mapped(url, error) from None
    return pool
