"""The device agent: consumes ``device.<id>`` and applies its batches, in delivery order.

Group commit: the batches already delivered (up to ``group_batches`` and about
``group_changes`` changes) are applied in ONE SQLite transaction, their statements merged
(a savepoint per batch only when the group fails: ``OfflineStore.apply_group``), so one
fsync makes them all durable. Ack policy: a batch is acked only after
that commit. A batch that is not valid for this device, or that the store cannot apply,
is logged and dropped (not requeued), so it cannot loop; its neighbours still apply.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Coroutine
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from broker.connection import connect, open_channel
from broker.delivery import retry_while_held
from broker.errors import ProgramError
from broker.health import operations_endpoint
from broker.settle import Reject, Settlement, settle
from broker.topology import device_queue_name, existing_queue
from broker.wire import ReadResync, WireError, decode_batch, quoted
from device_agent.apply import BatchRows, batch_rows
from device_agent.metrics import (
    BATCH_APPLY_SECONDS,
    BATCHES_PER_COMMIT,
    BATCHES_SKIPPED,
    record_applied,
    record_dropped,
)
from device_agent.settings import AgentSettings
from device_agent.store import OfflineStore, Outcome

__all__ = ["AppliedBatch", "DeviceAgent", "OnApplied", "device_queue", "open_store", "run_agent"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AppliedBatch:
    """What ``on_applied`` learns of a batch once it is committed."""

    batch_id: str
    job_id: str
    device_id: str
    changes: int
    # Its place in its job's stream of batches: 1 to ``total``.
    position: int = 1
    total: int = 1


OnApplied = Callable[[AppliedBatch], None]
# A batch that cannot be applied is rejected at once (one attempt): the device queue
# dead-letters it, and the worker marks the device for a full resync.
_SETTLEMENT = Settlement(what="batch", attempts=1)
T = TypeVar("T")


def _probe(path: Path) -> None:
    sqlite3.connect(path).close()


async def open_store(path: Path) -> OfflineStore:
    """The device's store; ``ProgramError`` when SQLite cannot open or write the file.

    The file is opened once in a plain thread first: when aiosqlite itself fails to
    connect, its thread finishes only after the caller returned, and posts to an event
    loop the exiting program has closed by then (a traceback at exit).
    """
    try:
        await asyncio.to_thread(_probe, path)
        return await OfflineStore.open(path)
    except (sqlite3.Error, OSError) as error:
        raise ProgramError(f"cannot open the device database {path}: {error}") from None


async def device_queue(
    connection: AbstractRobustConnection, settings: AgentSettings
) -> AbstractQueue:
    """The device's queue, checked first on a channel of its own (a missing queue, or one
    this account may not read, raises ``ProgramError`` without taking the agent's channel
    down), then declared passively on the agent's channel, which restores its consumer
    after a reconnect."""
    name = device_queue_name(settings.device_id)
    await existing_queue(
        connection,
        name,
        hint=f"is device {settings.device_id} registered? (syncctl device add "
        f"{settings.device_id} --user N)",
    )
    channel = await open_channel(connection, prefetch=settings.prefetch)
    # Passive: the queue is created when the device is registered; the agent may only
    # consume it.
    return await channel.declare_queue(name, passive=True)


async def _unless_stopped(
    work: Coroutine[Any, Any, T], stop: asyncio.Event, *, grace: float = 0.0
) -> T | None:
    """``work``'s result; or, once ``stop`` is set and ``grace`` seconds more have passed,
    ``None`` with ``work`` cancelled."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=grace)
        if task.done():
            return task.result()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        return None
    finally:
        stopping.cancel()


class DeviceAgent:
    """Applies change batches from the device's queue to its ``OfflineStore``.

    Example::

        agent = await DeviceAgent.start(AgentSettings(device_id="dev-1", db_path="dev-1.sqlite"))
        await agent.run(stop_event)
    """

    def __init__(
        self,
        settings: AgentSettings,
        connection: AbstractRobustConnection,
        queue: AbstractQueue,
        store: OfflineStore,
        on_applied: OnApplied | None = None,
    ) -> None:
        self._settings = settings
        self._connection = connection
        self._queue = queue
        self._store = store
        self._on_applied = on_applied

    @classmethod
    async def start(
        cls, settings: AgentSettings, *, on_applied: OnApplied | None = None
    ) -> DeviceAgent:
        """Connect and open the store; ``on_applied`` is called with each batch once it is
        committed (an app refreshes its screens there; benchmarks time it).

        Raises ``ProgramError`` when the agent cannot work: the database cannot be opened
        or written, the broker refuses the login, or the device has no queue.
        """
        store = await open_store(settings.db_path)
        try:
            batches, tombstones = await store.prune(timedelta(days=settings.prune_after_days))
            connection = await connect(settings.amqp_url, f"sync-agent:{settings.device_id}")
        except BaseException:
            await store.close()
            raise
        if batches or tombstones:
            log.info(
                "store pruned",
                extra={
                    "device_id": settings.device_id,
                    "applied_batches": batches,
                    "tombstones": tombstones,
                },
            )
        try:
            queue = await device_queue(connection, settings)
        except BaseException:
            await connection.close()
            await store.close()
            raise
        log.info(
            "agent started", extra={"device_id": settings.device_id, "db": str(settings.db_path)}
        )
        return cls(settings, connection, queue, store, on_applied)

    async def readiness(self) -> str | None:
        """``None`` while the agent can take batches, else why not (for ``/readyz``)."""
        return "not connected to RabbitMQ" if self._connection.is_closed else None

    async def run(self, stop: asyncio.Event) -> None:
        """Apply batches in delivery order until ``stop`` is set, then close.

        The group in hand when ``stop`` is set gets ``shutdown_grace`` seconds to finish;
        past that (say, SQLite keeps failing) it is let go unacked, and the broker hands
        it over again when the agent is back. Nothing is lost.
        """
        delivered = _Delivered()
        try:
            await self._queue.consume(delivered.put)
            while not stop.is_set():
                first = await _unless_stopped(delivered.get(), stop)
                if first is None:
                    break
                await _unless_stopped(
                    self._apply_delivered(first, delivered),
                    stop,
                    grace=self._settings.shutdown_grace,
                )
        finally:
            # Batches still in ``delivered`` were never acked: the broker redelivers them.
            await self._connection.close()
            await self._store.close()
            log.info("agent stopped", extra={"device_id": self._settings.device_id})

    async def _apply_delivered(self, first: AbstractIncomingMessage, delivered: _Delivered) -> None:
        """``first`` and the batches delivered behind it, up to the group's bounds."""
        started = time.perf_counter()
        group: list[_Batch] = []
        changes = 0
        message: AbstractIncomingMessage | None = first
        while message is not None:
            batch = await self._parse(message)
            if batch is not None:
                group.append(batch)
                changes += batch.applied.changes
            if (
                len(group) >= self._settings.group_batches
                or changes >= self._settings.group_changes
            ):
                break
            message = delivered.get_nowait()
        while group:
            outcomes = await self._apply(group)
            if outcomes is None:
                return  # the channel is gone: the broker redelivers the whole rest
            done, group = group[: len(outcomes)], group[len(outcomes) :]
            BATCHES_PER_COMMIT.observe(len(outcomes))
            await self._settle(list(zip(done, outcomes, strict=True)), started)

    async def _apply(self, group: list[_Batch]) -> list[Outcome] | None:
        """Apply ``group`` (or the front of it: see ``OfflineStore.apply_group``), waiting
        out SQLite errors of its first batch in place; ``None`` when it was let go.

        A requeued batch would be applied behind those fetched after it and could undo
        them, so SQLite errors (disk full, the app holding a write lock) are waited out.
        """
        return await retry_while_held(
            group[0].message,
            partial(self._store.apply_group, [batch.rows for batch in group]),
            transient=(sqlite3.Error,),
            what=f"batch {group[0].applied.batch_id}",
        )

    async def _settle(self, settled: list[tuple[_Batch, Outcome]], started: float) -> None:
        """Settle the batches of one commit: those that failed one by one, then the others
        with one ack, which covers them all (every delivery before them is settled)."""
        applied: list[tuple[_Batch, bool]] = []
        for batch, outcome in settled:
            if isinstance(outcome, Exception):
                # A bug or a value SQLite cannot store: requeueing would loop forever.
                record_dropped("unappliable")
                await settle(batch.message, _SETTLEMENT, outcome)
                log.error(
                    "batch dropped: cannot be applied",
                    extra={
                        "device_id": batch.applied.device_id,
                        "batch_id": batch.applied.batch_id,
                    },
                )
            else:
                applied.append((batch, outcome))
        if not applied:
            return
        await settle(applied[-1][0].message, _SETTLEMENT, earlier=True)
        for batch, outcome in applied:
            self._settled(batch, outcome, started, len(settled))

    def _settled(self, batch: _Batch, outcome: bool, started: float, group: int) -> None:
        read = batch.applied
        if outcome:
            record_applied(read.changes)
            BATCH_APPLY_SECONDS.observe(time.perf_counter() - started)
        else:
            BATCHES_SKIPPED.inc()
        self._report_resync(batch.resyncs)
        if outcome and self._on_applied is not None:
            self._on_applied(read)
        log.info(
            "batch applied" if outcome else "batch skipped: applied before",
            extra={
                "job_id": read.job_id,
                "device_id": read.device_id,
                "batch_id": read.batch_id,
                "changes": read.changes,
                "group": group,
                "ms": (time.perf_counter() - started) * 1000,
            },
        )

    def _report_resync(self, resyncs: tuple[ReadResync, ...]) -> None:
        for change in resyncs:
            # The store holds the flag for the app; this is for whoever runs the device.
            log.warning(
                "device needs a full resync",
                extra={
                    "device_id": self._settings.device_id,
                    "reason": change.reason,
                    "since": change.since.isoformat(),
                },
            )

    async def _parse(self, message: AbstractIncomingMessage) -> _Batch | None:
        """The batch, or ``None`` once a batch this device cannot take was rejected."""
        try:
            batch = decode_batch(message.body)
        except WireError as error:
            record_dropped("invalid")
            await settle(message, _SETTLEMENT, Reject(error.reason))
            log.error(
                "batch dropped",
                extra={
                    "device_id": self._settings.device_id,
                    "message_id": quoted(message.message_id),
                    "reason": error.reason,
                },
            )
            return None
        if batch.device_id != self._settings.device_id:
            record_dropped("wrong-device")
            await settle(message, _SETTLEMENT, Reject("wrong-device"))
            log.error(
                "batch dropped: addressed to another device",
                extra={
                    "device_id": self._settings.device_id,
                    "batch_id": batch.batch_id,
                    "addressed_to": batch.device_id,
                },
            )
            return None
        # Only the rows and what the logs need are kept: the decoded changes are let go.
        return _Batch(
            message,
            AppliedBatch(
                batch.batch_id,
                batch.job_id,
                batch.device_id,
                len(batch.changes),
                batch.position,
                batch.total,
            ),
            tuple(c for c in batch.changes if isinstance(c, ReadResync)),
            batch_rows(batch),
        )


@dataclass(frozen=True, slots=True)
class _Batch:
    message: AbstractIncomingMessage
    applied: AppliedBatch
    resyncs: tuple[ReadResync, ...]
    rows: BatchRows


class _Delivered:
    """The deliveries in hand (at most ``prefetch``), in delivery order."""

    def __init__(self) -> None:
        self._messages: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def put(self, message: AbstractIncomingMessage) -> None:
        self._messages.put_nowait(message)

    async def get(self) -> AbstractIncomingMessage:
        return await self._messages.get()

    def get_nowait(self) -> AbstractIncomingMessage | None:
        """The next delivery if one is in hand, else ``None`` (a group never waits)."""
        try:
            return self._messages.get_nowait()
        except asyncio.QueueEmpty:
            return None


async def run_agent(settings: AgentSettings, stop: asyncio.Event) -> None:
    """``sync-agent``: apply batches until ``stop``, with the operations endpoint if asked."""
    agent = await DeviceAgent.start(settings)
    async with operations_endpoint(settings, agent.readiness):
        await agent.run(stop)
