"""The one place that connects (and so reconnects) to RabbitMQ.

A URL may name several nodes of a cluster, comma-separated
(``amqp://u:p@host1:5672/,amqp://u:p@host2:5672/``): the first connection goes to the
first node that answers, and a connection whose node dies reconnects to the next.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import unquote, urlsplit

import aiormq
from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from yarl import URL

from broker.accounts import DEVICE_LIMITS
from broker.errors import AccessRefused, BrokerUnavailable, ConfigurationError

__all__ = [
    "CONNECT_TIMEOUT",
    "amqp_urls",
    "amqp_user",
    "checked_url",
    "connect",
    "node_of",
    "open_channel",
    "where",
]

log = logging.getLogger(__name__)

AMQP_URL_FORM = "RabbitMQ URL (amqp://user:password@host:port/vhost)"

# A broker that does not answer within this long is reported as out of reach.
CONNECT_TIMEOUT = 10.0


def where(url: str) -> str:
    """``host:port`` of a service URL (of each node, for several), for messages: never
    the password."""
    places = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        places.append(f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname))
    return ", ".join(places)


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


def amqp_urls(amqp_url: str) -> list[str]:
    """The nodes' URLs of a comma-separated ``amqp_url``, checked; all must log in as
    the same user (a message's ``user_id`` is checked against it on any node)."""
    urls = [
        checked_url(one.strip(), ("amqp", "amqps"), AMQP_URL_FORM) for one in amqp_url.split(",")
    ]
    if len({urlsplit(url).username for url in urls}) > 1:
        raise ConfigurationError("the RabbitMQ URLs of one connection must name the same user")
    return urls


def amqp_user(amqp_url: str) -> str:
    """The AMQP user a connection to ``amqp_url`` logs in as; the broker checks a
    message's ``user_id`` against it."""
    username = urlsplit(amqp_url.split(",")[0].strip()).username
    return unquote(username) if username else "guest"


class _NodesConnection(RobustConnection):
    """A robust connection that tries the next node at each reconnection attempt, so a
    connection whose node died comes back on a live one, where the robust channels
    replay their declarations and consumers."""

    def __init__(self, urls: list[URL], **kwargs: Any) -> None:
        super().__init__(urls[0], **kwargs)
        self._nodes = urls
        self._node = 0
        self._attempts = 0

    async def _RobustConnection__connect_transport(self) -> None:
        # aio-pika's one step per connection attempt (the reconnect loop calls it).
        if self._attempts and len(self._nodes) > 1:
            self._node = (self._node + 1) % len(self._nodes)
            # The password may have changed since (update_secret): keep the current one.
            self.url = self._nodes[self._node].with_password(self.url.password)
            log.info("RabbitMQ: trying another node", extra={"node": node_of(self)})
        self._attempts += 1
        await super()._RobustConnection__connect_transport()  # type: ignore[misc]


def _reason(error: BaseException) -> str:
    """Why a connection could not be made, in words (``connection refused``)."""
    if isinstance(error, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    # Socket errors come wrapped by the driver as (errno, text).
    code = error.args[0] if error.args and isinstance(error.args[0], int) else None
    if code is not None:
        return os.strerror(code).lower()
    return str(error) or type(error).__name__


def node_of(connection: AbstractRobustConnection) -> str:
    """``host:port`` of the node ``connection`` is (or is trying to be) connected to."""
    url: URL = getattr(connection, "url")  # noqa: B009 (the abstract class does not name it)
    return f"{url.host}:{url.port}"


async def connect(url: str, name: str) -> AbstractRobustConnection:
    """A robust connection named ``name`` in the broker's connection list.

    The robust connection reconnects by itself (to the next node, when ``url`` names
    several) and replays the declarations and consumers made on it; nothing else in the
    project retries connections. The first connection tries each node once: a wrong URL,
    a refused login or no node in reach raise ``ConfigurationError``, ``AccessRefused``
    or ``BrokerUnavailable`` at once.
    """
    urls = amqp_urls(url)
    unreachable: list[str] = []
    for first in range(len(urls)):
        order = [URL(one) for one in urls[first:] + urls[:first]]
        connection = _NodesConnection(
            order,
            client_properties={"connection_name": name},
            reconnect_interval=1.0,
        )
        try:
            await connection.connect(timeout=CONNECT_TIMEOUT)
        except aiormq.exceptions.ProbableAuthenticationError:
            await connection.close()
            user = unquote(urlsplit(urls[first]).username or "guest")
            raise AccessRefused(
                f"RabbitMQ at {where(urls[first])} refused the login of {user!r}: check the "
                "user and its password (a device logs in as device.<id> with the secret "
                "`syncctl device add` printed)"
            ) from None
        except aiormq.exceptions.InvalidFrameError:
            await connection.close()
            # The login passed and the broker answered the connection's open with a close:
            # aiormq keeps only the frame's name, not the broker's reason.
            user = unquote(urlsplit(urls[first]).username or "guest")
            raise AccessRefused(
                f"RabbitMQ at {where(urls[first])} refused to open a connection for {user!r}: "
                "its connection limit is reached (a device account holds at most "
                f"{DEVICE_LIMITS['max-connections']}; a dead one is closed after two missed "
                "heartbeats) or it may not use the virtual host"
            ) from None
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as error:
            await connection.close()
            unreachable.append(f"{where(urls[first])}: {_reason(error)}")
        else:
            return connection
    raise BrokerUnavailable(f"cannot reach RabbitMQ at {'; '.join(unreachable)}")


async def open_channel(
    connection: AbstractRobustConnection, *, prefetch: int = 0
) -> AbstractRobustChannel:
    """A channel with publisher confirms on and unroutable mandatory publishes raising."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch:
        await channel.set_qos(prefetch_count=prefetch)
    return channel
