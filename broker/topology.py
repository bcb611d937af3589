"""The RabbitMQ topology as data: exchanges, queues and bindings, declared in one place.

Programs declare what they need once after connecting; the robust connection replays the
declarations after a reconnect. Handlers never declare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
    ExchangeType,
)
from pamqp.commands import Queue

from broker.errors import AccessRefused, ProgramError

__all__ = [
    "CHANGES_EXCHANGE",
    "DEAD_CHANGES_EXCHANGE",
    "DEAD_CHANGES_QUEUE",
    "DEAD_JOBS_EXCHANGE",
    "DEAD_JOBS_QUEUE",
    "DEAD_LETTER_MAX_LENGTH",
    "DEAD_LETTER_TTL_SECONDS",
    "DEFAULT_QUEUE_LIMITS",
    "DEVICE_QUEUE_MAX_LENGTH",
    "DEVICE_QUEUE_TTL_SECONDS",
    "JOBS_EXCHANGE",
    "JOBS_QUEUE",
    "JOB_DELIVERY_LIMIT",
    "DeviceQueueType",
    "ExchangeSpec",
    "QueueLimits",
    "QueueSpec",
    "declare_device_queue",
    "declare_exchange",
    "declare_queue",
    "declare_topology",
    "delete_device_queue",
    "device_queue",
    "device_queue_name",
    "existing_queue",
]

# A job that fails this many deliveries is dead-lettered by the broker, so a poison job
# cannot loop.
JOB_DELIVERY_LIMIT = 5
# A device offline for long holds at most this many batches, each for at most this long;
# past either limit the batches are dead-lettered and the device must resync everything.
DEVICE_QUEUE_MAX_LENGTH = 10_000
DEVICE_QUEUE_TTL_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: ExchangeType


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    bind_to: str | None = None
    routing_key: str = ""


JOBS_EXCHANGE = ExchangeSpec("sync.jobs", ExchangeType.FANOUT)
DEAD_JOBS_EXCHANGE = ExchangeSpec("sync.jobs.dead", ExchangeType.FANOUT)
CHANGES_EXCHANGE = ExchangeSpec("sync.changes", ExchangeType.DIRECT)
DEAD_CHANGES_EXCHANGE = ExchangeSpec("sync.changes.dead", ExchangeType.FANOUT)

JOBS_QUEUE = QueueSpec(
    "sync.jobs",
    arguments={
        "x-queue-type": "quorum",
        "x-delivery-limit": JOB_DELIVERY_LIMIT,
        "x-dead-letter-exchange": DEAD_JOBS_EXCHANGE.name,
        # At-least-once dead-lettering needs reject-publish overflow; it keeps a poison
        # job in the queue until the dead-letter queue has confirmed it.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    },
    bind_to=JOBS_EXCHANGE.name,
)
# Dead letters are kept for inspection, within bounds: past them the oldest go first, so
# a flood of bad jobs can neither fill the broker nor block the good ones.
DEAD_LETTER_MAX_LENGTH = 10_000
DEAD_LETTER_TTL_SECONDS = 7 * 24 * 3600
_DEAD_LETTER_BOUNDS = {
    "x-max-length": DEAD_LETTER_MAX_LENGTH,
    "x-overflow": "drop-head",
    "x-message-ttl": DEAD_LETTER_TTL_SECONDS * 1000,
}
DEAD_JOBS_QUEUE = QueueSpec(
    "sync.jobs.dead",
    arguments={"x-queue-type": "quorum", **_DEAD_LETTER_BOUNDS},
    bind_to=DEAD_JOBS_EXCHANGE.name,
)


# Batches a device lost; the worker marks the device for a full resync from them.
DEAD_CHANGES_QUEUE = QueueSpec(
    "sync.changes.dead",
    arguments={"x-queue-type": "quorum", **_DEAD_LETTER_BOUNDS},
    bind_to=DEAD_CHANGES_EXCHANGE.name,
)


def device_queue_name(device_id: str) -> str:
    return f"device.{device_id}"


@dataclass(frozen=True)
class QueueLimits:
    """How many batches a device queue holds, and for how long, before dead-lettering."""

    max_length: int = DEVICE_QUEUE_MAX_LENGTH
    ttl_seconds: float = DEVICE_QUEUE_TTL_SECONDS


DEFAULT_QUEUE_LIMITS = QueueLimits()


DeviceQueueType = Literal["classic", "quorum"]

# Classic v2: one copy on the node that declared it (a policy may spread them), cheap
# while idle; a full one refuses the new batch and dead-letters it. Quorum: a replica on
# every node of the cluster, the leader on the node with the fewest leaders; a full one
# refuses the new batch without dead-lettering it (RabbitMQ 3.10 takes
# reject-publish-dlx for a quorum queue but drops the oldest batch then), and holds one
# batch past its length before it refuses. docs/cluster.md has both, measured.
_DEVICE_QUEUE_TYPES: dict[DeviceQueueType, dict[str, Any]] = {
    "classic": {
        "x-queue-type": "classic",
        "x-queue-version": 2,
        "x-overflow": "reject-publish-dlx",
    },
    "quorum": {
        "x-queue-type": "quorum",
        "x-queue-leader-locator": "balanced",
        "x-overflow": "reject-publish",
    },
}


def device_queue(
    device_id: str,
    limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
    queue_type: DeviceQueueType = "classic",
) -> QueueSpec:
    """A device's queue: durable, holds batches while the device is offline.

    When full it refuses new batches (the worker sees a nack and marks the device for a
    resync); batches older than the TTL are dead-lettered, and the worker learns from
    ``sync.changes.dead`` that the device must resync.
    """
    return QueueSpec(
        device_queue_name(device_id),
        arguments={
            **_DEVICE_QUEUE_TYPES[queue_type],
            "x-max-length": limits.max_length,
            "x-message-ttl": int(limits.ttl_seconds * 1000),
            "x-dead-letter-exchange": DEAD_CHANGES_EXCHANGE.name,
        },
        bind_to=CHANGES_EXCHANGE.name,
        routing_key=device_id,
    )


async def declare_exchange(channel: AbstractChannel, spec: ExchangeSpec) -> AbstractExchange:
    return await channel.declare_exchange(spec.name, spec.type, durable=True)


async def declare_queue(channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
    try:
        queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        raise ProgramError(
            f"queue {spec.name} exists with other arguments than this version declares "
            f"({error}): move its messages away and delete it, then declare again"
        ) from None
    if spec.bind_to is not None:
        await queue.bind(spec.bind_to, routing_key=spec.routing_key)
    return queue


async def declare_topology(channel: AbstractChannel) -> None:
    """Declare the shared exchanges and queues; safe to run any number of times."""
    for exchange in (JOBS_EXCHANGE, DEAD_JOBS_EXCHANGE, CHANGES_EXCHANGE, DEAD_CHANGES_EXCHANGE):
        await declare_exchange(channel, exchange)
    for queue in (DEAD_JOBS_QUEUE, JOBS_QUEUE, DEAD_CHANGES_QUEUE):
        await declare_queue(channel, queue)


async def declare_device_queue(
    channel: AbstractChannel,
    device_id: str,
    limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
    queue_type: DeviceQueueType = "classic",
) -> AbstractQueue:
    for exchange in (CHANGES_EXCHANGE, DEAD_CHANGES_EXCHANGE):
        await declare_exchange(channel, exchange)
    return await declare_queue(channel, device_queue(device_id, limits, queue_type))


async def delete_device_queue(channel: AbstractChannel, device_id: str) -> None:
    await channel.queue_delete(device_queue_name(device_id))


async def existing_queue(
    connection: AbstractConnection, name: str, *, hint: str
) -> Queue.DeclareOk:
    """Depth and consumers of the queue ``name`` as the operator declared it. A missing
    queue raises ``ProgramError`` with ``hint``; one this account may not use raises
    ``AccessRefused``.

    The passive declare runs on a channel of its own: the broker closes the channel it
    fails on, and no channel in use should go down with it.
    """
    try:
        async with await connection.channel(publisher_confirms=False) as probe:
            queue = await probe.declare_queue(name, passive=True)
            return queue.declaration_result
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise ProgramError(f"queue {name} does not exist: {hint}") from None
    except aiormq.exceptions.ChannelAccessRefused:
        raise AccessRefused(f"this account may not use queue {name}") from None
