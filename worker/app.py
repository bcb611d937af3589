"""The worker process: wires settings, PostgreSQL, RabbitMQ, the job and lost-batch consumers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from broker.connection import amqp_user, connect, open_channel
from broker.health import operations_endpoint
from broker.topology import (
    CHANGES_EXCHANGE,
    DEAD_CHANGES_QUEUE,
    DEAD_JOBS_EXCHANGE,
    JOBS_EXCHANGE,
    JOBS_QUEUE,
    declare_exchange,
    declare_topology,
)
from worker.consumer import JobConsumer
from worker.database import create_pool
from worker.errors import TRANSIENT_ERRORS
from worker.follow import FollowFeed
from worker.handler import JobHandler
from worker.limits import DeviceLimits
from worker.lost import LostBatchConsumer
from worker.model import DomainModel, load_model
from worker.model_changes import ModelResync, resync_pending, stamp
from worker.publisher import BatchPublisher
from worker.pushes import PushService
from worker.schema_check import check_schema, schema_problems
from worker.settings import WorkerSettings

__all__ = ["Worker", "run_worker"]

log = logging.getLogger(__name__)

Callback = Callable[[AbstractIncomingMessage], Awaitable[None]]
FORGET_EVERY = 60.0
_FORGET = "DELETE FROM sync.job_result WHERE answered_at < now() - make_interval(secs => $1)"
# A readiness probe that waits longer than this for a pool connection reports not ready.
READY_TIMEOUT = 2.0


async def _keep_connection_as_is(conn: asyncpg.Connection) -> None:
    """A job leaves no session state behind (its lock and reads live in its transaction,
    which ``async with`` ends), so the pool's default reset would be a wasted round trip
    per job: about a tenth of a small job's time in the profile."""


class Worker:
    """Consumes ``sync.jobs`` (and ``sync.changes.dead``) until ``stop()``; then finishes
    the messages in hand.

    Example::

        worker = await Worker.start(WorkerSettings(), model)
        ...
        await worker.stop()
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        pool: asyncpg.Pool,
        model: DomainModel,
        jobs: JobConsumer,
        *,
        settings: WorkerSettings,
    ) -> None:
        self._connection = connection
        self._model = model
        self._jobs = jobs
        self._shutdown_grace = settings.shutdown_grace
        self._pool = pool
        self._consuming: list[tuple[AbstractQueue, str]] = []
        self._in_hand: set[asyncio.Task[None]] = set()
        self._forgetting = asyncio.create_task(
            forget_answers(pool, hours=settings.job_memory_hours)
        )
        # The follow feed, and bringing holders in line with a changed model.
        self._background: list[asyncio.Task[None]] = []

    @classmethod
    async def start(cls, settings: WorkerSettings, model: DomainModel | None = None) -> Worker:
        model = model or await load_model(settings.model_path())
        idle_timeout = str(int(settings.lock_idle_timeout * 1000))
        pool = await create_pool(
            settings.database_url,
            min_size=1,
            # One per device run, plus the lost-batch consumer and the answers' pruning.
            max_size=settings.concurrency + 2,
            server_settings={
                # The fetches are short; JIT compiling them costs more than it saves.
                "jit": "off",
                # PostgreSQL writes datetimes into the changes in UTC (worker.access).
                "timezone": "UTC",
                # A frozen worker must not hold a device's lock for ever: its session ends
                # when idle this long, and the lock with it (worker.handler).
                "idle_session_timeout": idle_timeout,
                "idle_in_transaction_session_timeout": idle_timeout,
            },
            # The pool closes idle connections well before PostgreSQL would end them.
            max_inactive_connection_lifetime=settings.lock_idle_timeout / 2,
            reset=_keep_connection_as_is,
        )
        try:
            async with pool.acquire() as conn:
                await check_schema(conn, model)
                changed = await stamp(conn, model) if model.followed else []
                # Only then a session of its own for it: most starts find nothing to do.
                resyncing = model.followed and await resync_pending(conn, model)
            connection = await connect(settings.amqp_url, settings.name)
        except BaseException:
            await pool.close()
            raise
        channel = await open_channel(connection, prefetch=settings.prefetch)
        await declare_topology(channel)
        publisher = BatchPublisher(
            channel,
            await declare_exchange(channel, CHANGES_EXCHANGE),
            batch_size=settings.batch_size,
            timeout=settings.publish_timeout,
            window=settings.confirm_window,
        )
        consumer = JobConsumer(
            JobHandler(pool, model, publisher, chunk_size=settings.chunk_size),
            model,
            await declare_exchange(channel, DEAD_JOBS_EXCHANGE),
            channel.default_exchange,
            reports=(await connection.channel(publisher_confirms=False)).default_exchange,
            trusted_publishers=settings.trusted_publishers,
            limits=DeviceLimits(
                rate=settings.device_rate,
                burst=settings.device_burst,
                in_hand=settings.device_in_hand,
            ),
            slots=settings.concurrency,
            max_group=settings.max_group,
            publish_timeout=settings.publish_timeout,
        )
        worker = cls(connection, pool, model, consumer, settings=settings)
        await worker._consume(await channel.get_queue(JOBS_QUEUE.name), consumer.on_message)
        lost = LostBatchConsumer(pool)
        await worker._consume(await channel.get_queue(DEAD_CHANGES_QUEUE.name), lost.on_message)
        if model.followed:
            pushes = PushService(
                consumer.serve_push,
                await declare_exchange(channel, JOBS_EXCHANGE),
                user_id=amqp_user(settings.amqp_url),
                publish_timeout=settings.publish_timeout,
                window=settings.confirm_window,
            )
            feed = FollowFeed(
                settings.database_url,
                model,
                pushes,
                name=settings.name,
                interval=settings.follow_interval,
                chunk=settings.follow_chunk,
                takeover=settings.follow_takeover,
            )
            worker._background.append(asyncio.create_task(feed.run()))
            if resyncing:
                resync = ModelResync(
                    settings.database_url,
                    model,
                    pushes,
                    name=settings.name,
                    rate=settings.model_resync_rate,
                    takeover=settings.follow_takeover,
                )
                worker._background.append(asyncio.create_task(resync.run()))
        if changed:
            log.info("model change: holders to bring in line", extra={"entities": changed})
        log.info("worker started", extra={"worker": settings.name, "prefetch": settings.prefetch})
        return worker

    async def readiness(self) -> str | None:
        """``None`` when the worker can take jobs, else why not (for ``/readyz``)."""
        if self._connection.is_closed:
            return "not connected to RabbitMQ"
        try:
            async with self._pool.acquire(timeout=READY_TIMEOUT) as conn:
                problems = await schema_problems(conn, self._model)
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as error:
            return f"PostgreSQL: {error!r}"
        return f"the model does not match the database: {problems[0]}" if problems else None

    async def _consume(self, queue: AbstractQueue, on_message: Callback) -> None:
        self._consuming.append((queue, await queue.consume(self._track(on_message))))

    def _track(self, on_message: Callback) -> Callback:
        async def tracked(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._in_hand.add(task)
            try:
                await on_message(message)
            finally:
                self._in_hand.discard(task)

        return tracked

    async def stop(self) -> None:
        """Stop taking jobs, finish those in hand, then close the connections.

        Jobs still in hand after the grace period (say, waiting out a database outage) are
        cancelled unacked, so the broker hands them to another worker.
        """
        for task in self._background:
            task.cancel()
        # Ended before anything else closes: a feed still ending would report after us.
        await asyncio.gather(*self._background, return_exceptions=True)
        for queue, tag in self._consuming:
            await queue.cancel(tag)
        started = time.monotonic()
        if self._in_hand:
            _, late = await asyncio.wait(self._in_hand, timeout=self._shutdown_grace)
            for task in late:
                task.cancel()
        left = max(0.0, self._shutdown_grace - (time.monotonic() - started))
        await self._jobs.scheduler.drain(timeout=left)
        self._forgetting.cancel()
        await self._connection.close()
        await self._pool.close()
        log.info("worker stopped")


async def forget_answers(pool: asyncpg.Pool, *, hours: float) -> None:
    """Forget the answers of jobs older than ``hours``, every minute (each worker does;
    the deletes are idempotent)."""
    while True:
        try:
            deleted = await pool.execute(_FORGET, hours * 3600)
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as error:
            log.warning("old job answers not pruned", extra={"error": repr(error)})
        else:
            if deleted != "DELETE 0":
                log.info("old job answers pruned", extra={"rows": int(deleted.split()[1])})
        await asyncio.sleep(FORGET_EVERY)


async def run_worker(settings: WorkerSettings, stop: asyncio.Event) -> None:
    worker = await Worker.start(settings)
    try:
        async with operations_endpoint(settings, worker.readiness):
            await stop.wait()
    finally:
        await worker.stop()
