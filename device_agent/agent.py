"""The device agent: consumes ``device.<id>`` and applies each batch in one transaction.

Ack policy: a batch is acked only after its SQLite transaction committed. A batch that is
not valid for this device is logged and dropped (not requeued), so it cannot loop.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from broker.connection import connect, open_channel
from broker.delivery import ack, nack, retry_while_held
from broker.models import ChangeBatch, ResyncChange
from broker.topology import device_queue_name
from broker.wire import WireError, decode, quoted
from device_agent.settings import AgentSettings
from device_agent.store import OfflineStore

__all__ = ["DeviceAgent"]

log = logging.getLogger(__name__)

OnApplied = Callable[[ChangeBatch], None]


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
        committed (an app refreshes its screens there; benchmarks time it)."""
        store = await OfflineStore.open(settings.db_path)
        batches, tombstones = await store.prune(timedelta(days=settings.prune_after_days))
        if batches or tombstones:
            log.info(
                "store pruned",
                extra={
                    "device_id": settings.device_id,
                    "applied_batches": batches,
                    "tombstones": tombstones,
                },
            )
        connection = await connect(settings.amqp_url, f"sync-agent:{settings.device_id}")
        channel = await open_channel(connection, prefetch=settings.prefetch)
        # Passive: the queue is created when the device is registered; the agent may
        # only consume it.
        queue = await channel.declare_queue(device_queue_name(settings.device_id), passive=True)
        log.info(
            "agent started", extra={"device_id": settings.device_id, "db": str(settings.db_path)}
        )
        return cls(settings, connection, queue, store, on_applied)

    async def run(self, stop: asyncio.Event) -> None:
        """Apply batches in delivery order until ``stop`` is set, then close."""
        try:
            async with self._queue.iterator() as batches:
                stopping = asyncio.ensure_future(stop.wait())
                while not stop.is_set():
                    next_batch = asyncio.ensure_future(anext(batches))
                    done, _ = await asyncio.wait(
                        {next_batch, stopping}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if next_batch not in done:
                        next_batch.cancel()
                        break
                    await self.on_message(next_batch.result())
                stopping.cancel()
        finally:
            await self._connection.close()
            await self._store.close()
            log.info("agent stopped", extra={"device_id": self._settings.device_id})

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        batch = self._parse(message)
        if batch is None:
            await nack(message, requeue=False)
            return
        applied = await self._apply(message, batch)
        if applied is None:
            return
        if not await ack(message):
            return
        self._report_resync(batch)
        if applied and self._on_applied is not None:
            self._on_applied(batch)
        log.info(
            "batch applied" if applied else "batch skipped: applied before",
            extra={
                "job_id": batch.job_id,
                "device_id": batch.device_id,
                "batch_id": batch.batch_id,
                "changes": len(batch.changes),
                "ms": (time.perf_counter() - started) * 1000,
            },
        )

    async def _apply(self, message: AbstractIncomingMessage, batch: ChangeBatch) -> bool | None:
        """Apply ``batch``, retrying SQLite errors in place; ``None`` when it was let go.

        A requeued batch would be applied behind those fetched after it and could undo
        them, so SQLite errors (disk full, the app holding a write lock) are waited out.
        """
        try:
            return await retry_while_held(
                message,
                partial(self._store.apply_batch, batch),
                transient=(sqlite3.Error,),
                what=f"batch {batch.batch_id}",
            )
        except Exception:
            # A bug or a value SQLite cannot store: requeueing would loop forever.
            log.exception(
                "batch dropped: cannot be applied",
                extra={"device_id": batch.device_id, "batch_id": batch.batch_id},
            )
            await nack(message, requeue=False)
            return None

    def _report_resync(self, batch: ChangeBatch) -> None:
        for change in batch.changes:
            if isinstance(change, ResyncChange):
                # The store holds the flag for the app; this is for whoever runs the device.
                log.warning(
                    "device needs a full resync",
                    extra={
                        "device_id": self._settings.device_id,
                        "reason": change.reason,
                        "since": change.since.isoformat(),
                    },
                )

    def _parse(self, message: AbstractIncomingMessage) -> ChangeBatch | None:
        try:
            batch = decode(ChangeBatch, message.body)
        except WireError as error:
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
            log.error(
                "batch dropped: addressed to another device",
                extra={
                    "device_id": self._settings.device_id,
                    "batch_id": batch.batch_id,
                    "addressed_to": batch.device_id,
                },
            )
            return None
        return batch
