"""The one place that connects (and so reconnects) to RabbitMQ."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

__all__ = ["connect", "open_channel"]


async def connect(url: str, name: str) -> AbstractRobustConnection:
    """A robust connection named ``name`` in the broker's connection list.

    The robust connection reconnects by itself and replays the declarations and
    consumers made on it; nothing else in the project retries connections.
    """
    return await aio_pika.connect_robust(
        url, client_properties={"connection_name": name}, reconnect_interval=1.0
    )


async def open_channel(
    connection: AbstractRobustConnection, *, prefetch: int = 0
) -> AbstractRobustChannel:
    """A channel with publisher confirms on and unroutable mandatory publishes raising."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch:
        await channel.set_qos(prefetch_count=prefetch)
    return channel
