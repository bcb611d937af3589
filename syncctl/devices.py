"""Device registration: the PostgreSQL row, the durable device queue and the device's AMQP
account, together."""

from __future__ import annotations

import re

import asyncpg
from aio_pika.abc import AbstractChannel

from broker.models import DEVICE_ID_PATTERN
from broker.topology import (
    DEFAULT_QUEUE_LIMITS,
    QueueLimits,
    declare_device_queue,
    delete_device_queue,
)
from syncctl.accounts import BrokerAccounts

__all__ = ["list_devices", "register_device", "unregister_device"]


async def register_device(
    conn: asyncpg.Connection,
    channel: AbstractChannel,
    accounts: BrokerAccounts,
    device_id: str,
    user_id: int,
    *,
    offline: bool = True,
    limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
) -> str:
    """Register (or re-register) a device for a user, create its queue and its account.

    The queue exists from registration on, so batches wait in it while the device is
    offline. Returns the account's new secret: the caller shows it once, never logs it.
    Raises ``ValueError`` for an id that jobs and batches could never carry.
    """
    if not re.fullmatch(DEVICE_ID_PATTERN, device_id):
        raise ValueError(f"not a valid device id: {device_id!r} (must match {DEVICE_ID_PATTERN})")
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
    return await accounts.create_device_account(device_id)


async def unregister_device(
    conn: asyncpg.Connection, channel: AbstractChannel, accounts: BrokerAccounts, device_id: str
) -> bool:
    """Revoke the account, delete the queue and the registration; ``False`` when it was not
    registered."""
    await accounts.delete_device_account(device_id)
    await delete_device_queue(channel, device_id)
    status: str = await conn.execute("DELETE FROM sync.device WHERE device_id = $1", device_id)
    return status != "DELETE 0"


async def list_devices(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT device_id, user_id, offline, registered_at, resync_reason, resync_since "
            "FROM sync.device ORDER BY device_id"
        )
    )
