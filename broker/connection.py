"""The one place that connects (and so reconnects) to RabbitMQ."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from broker.accounts import DEVICE_LIMITS
from broker.errors import AccessRefused, BrokerUnavailable, ConfigurationError

__all__ = ["CONNECT_TIMEOUT", "amqp_user", "checked_url", "connect", "open_channel", "where"]

AMQP_URL_FORM = "RabbitMQ URL (amqp://user:password@host:port/vhost)"

# A broker that does not answer within this long is reported as out of reach.
CONNECT_TIMEOUT = 10.0


def where(url: str) -> str:
    """``host:port`` of a service URL, for messages: never the password."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def checked_url(url: str, schemes: tuple[str, ...], form: str) -> str:
    """``url`` when it has one of ``schemes`` and a host; else ``ConfigurationError``
    saying what was expected (``form``), never echoing the password."""
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigurationError(
            f"not a {form}: scheme {parts.scheme or 'missing'!r}, "
            f"host {parts.hostname or 'missing'!r}"
        )
    return url


def amqp_user(amqp_url: str) -> str:
    """The AMQP user a connection to ``amqp_url`` logs in as; the broker checks a
    message's ``user_id`` against it."""
    username = urlsplit(amqp_url).username
    return unquote(username) if username else "guest"


async def connect(url: str, name: str) -> AbstractRobustConnection:
    """A robust connection named ``name`` in the broker's connection list.

    The robust connection reconnects by itself and replays the declarations and
    consumers made on it; nothing else in the project retries connections. The first
    connection does not retry: a wrong URL, a refused login or a broker out of reach
    raise ``ConfigurationError``, ``AccessRefused`` or ``BrokerUnavailable`` at once.
    """
    try:
        return await aio_pika.connect_robust(
            checked_url(url, ("amqp", "amqps"), AMQP_URL_FORM),
            client_properties={"connection_name": name},
            reconnect_interval=1.0,
            timeout=CONNECT_TIMEOUT,
        )
    except aiormq.exceptions.ProbableAuthenticationError:
        user = unquote(urlsplit(url).username or "guest")
        raise AccessRefused(
            f"RabbitMQ at {where(url)} refused the login of {user!r}: check the user and "
            "its password (a device logs in as device.<id> with the secret `syncctl device "
            "add` printed)"
        ) from None
    except aiormq.exceptions.InvalidFrameError:
        # The login passed and the broker answered the connection's open with a close:
        # aiormq keeps only the frame's name, not the broker's reason.
        user = unquote(urlsplit(url).username or "guest")
        raise AccessRefused(
            f"RabbitMQ at {where(url)} refused to open a connection for {user!r}: its "
            "connection limit is reached (a device account holds at most "
            f"{DEVICE_LIMITS['max-connections']}; a dead one is closed after two missed "
            "heartbeats) or it may not use the virtual host"
        ) from None
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as error:
        raise BrokerUnavailable(f"cannot reach RabbitMQ at {where(url)}: {error!r}") from None


async def open_channel(
    connection: AbstractRobustConnection, *, prefetch: int = 0
) -> AbstractRobustChannel:
    """A channel with publisher confirms on and unroutable mandatory publishes raising."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch:
        await channel.set_qos(prefetch_count=prefetch)
    return channel
