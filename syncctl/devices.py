"""Device registration: the PostgreSQL row, the durable device queue and the device's AMQP
account, together."""

from __future__ import annotations

import re

import asyncpg
from aio_pika.abc import AbstractChannel

from broker.errors import ConfigurationError
from broker.models import DEVICE_ID_PATTERN, MAX_ID
from broker.topology import (
    DEFAULT_QUEUE_LIMITS,
    DeviceQueueType,
    QueueLimits,
    declare_device_queue,
    delete_device_queue,
)
from syncctl.accounts import BrokerAccounts
from worker.devices import delete_device, find_device, list_devices, save_device

__all__ = ["find_device", "list_devices", "register_device", "unregister_device"]


def _check(device_id: str, user_id: int) -> None:
    if not re.fullmatch(DEVICE_ID_PATTERN, device_id):
        raise ConfigurationError(
            f"not a valid device id: {device_id!r} (must match {DEVICE_ID_PATTERN})"
        )
    if not 1 <= user_id <= MAX_ID:
        raise ConfigurationError(f"not a valid user id: {user_id} (must be 1 to {MAX_ID})")


async def register_device(
    conn: asyncpg.Connection,
    channel: AbstractChannel,
    accounts: BrokerAccounts,
    device_id: str,
    user_id: int,
    *,
    offline: bool = True,
    limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
    queue_type: DeviceQueueType = "classic",
    if_missing: bool = False,
) -> str | None:
    """Register (or re-register) a device for a user, create its queue and its account.

    The queue exists from registration on, so batches wait in it while the device is
    offline. Returns the account's new secret: the caller shows it once, never logs it.
    With ``if_missing``, a device already registered with its account keeps its secret
    (its queue is declared again) and ``None`` is returned.

    Everything is checked before anything is written (the id, the user, the management
    API), and a registration that fails part-way leaves nothing half-made behind: the row
    is rolled back and a queue made for a new device is deleted again.
    """
    _check(device_id, user_id)
    await accounts.check()
    known = await find_device(conn, device_id)
    if if_missing and known is not None and await accounts.has_device_account(device_id):
        if known["offline"]:
            await declare_device_queue(channel, device_id, limits, queue_type)
        return None
    async with conn.transaction():
        await save_device(conn, device_id, user_id, offline=offline, max_batches=limits.max_length)
        if offline:
            await declare_device_queue(channel, device_id, limits, queue_type)
        try:
            return await accounts.create_device_account(device_id)
        except BaseException:
            if known is None and offline:
                await delete_device_queue(channel, device_id)
            raise


async def unregister_device(
    conn: asyncpg.Connection, channel: AbstractChannel, accounts: BrokerAccounts, device_id: str
) -> bool:
    """Revoke the account, delete the queue, the registration and what the server knew the
    device held; ``False`` when it was not registered."""
    await accounts.delete_device_account(device_id)
    await delete_device_queue(channel, device_id)
    return await delete_device(conn, device_id)
