"""Device registration: the PostgreSQL row and the durable device queue, together."""

from __future__ import annotations

import asyncpg
from aio_pika.abc import AbstractChannel

from broker.topology import (
    DEFAULT_QUEUE_LIMITS,
    QueueLimits,
    declare_device_queue,
    delete_device_queue,
)

__all__ = ["list_devices", "register_device", "unregister_device"]


async def register_device(
    conn: asyncpg.Connection,
    channel: AbstractChannel,
    device_id: str,
    user_id: int,
    *,
    offline: bool = True,
    limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
) -> None:
    """Register (or re-register) a device for a user and create its queue.

    The queue exists from registration on, so batches wait in it while the device is
    offline.
    """
    await conn.execute(
        "INSERT INTO sync.device (device_id, user_id, offline) VALUES ($1, $2, $3) "
        "ON CONFLICT (device_id) DO UPDATE SET user_id = excluded.user_id, "
        "offline = excluded.offline",
        device_id,
        user_id,
        offline,
    )
    if offline:
        await declare_device_queue(channel, device_id, limits)


async def unregister_device(
    conn: asyncpg.Connection, channel: AbstractChannel, device_id: str
) -> bool:
    """Remove the registration and delete the queue; ``False`` when it was not registered."""
    status: str = await conn.execute("DELETE FROM sync.device WHERE device_id = $1", device_id)
    await delete_device_queue(channel, device_id)
    return status != "DELETE 0"


async def list_devices(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT device_id, user_id, offline, registered_at, resync_reason, resync_since "
            "FROM sync.device ORDER BY device_id"
        )
    )
