"""Raw ceilings: AMQP, PostgreSQL and SQLite alone, in the units the pipeline reports.

    .venv/bin/python -m bench.ceilings [--runs 3]

Each figure bounds one part of the pipeline, measured with the project's own clients and
settings but none of its logic, so a pipeline figure divided by the slowest ceiling of its
unit reads as "how close to the hardware":

- AMQP, 500-object batches (objects/s = messages/s x 500): confirmed publish of persistent
  bodies the size of one real 500-object ``ChangeBatch`` (~110 KB) to a device queue
  (durable classic v2, declared and bound as registration does), confirms in windows of
  the worker's ``confirm_window`` via ``publish_confirmed``; then consume with the agent's
  prefetch, acking each message.
- AMQP, small messages (jobs/s, one message per job): the same with one-object batches
  (~400 bytes).
- PostgreSQL (asyncpg, ``jit=off`` as the worker's pool): 100,000 rows fetched by
  ``id = ANY($1)`` in chunks of the worker's ``chunk_size`` (objects/s); and single-row
  fetches by id, one after the other on one connection (jobs/s, a round-trip ceiling).
- SQLite (WAL, ``synchronous=FULL``, in a thread): ``bench.agent``'s raw ``executemany``
  upsert of 100,000 pre-encoded rows, one transaction per 500 (objects/s); and
  single-row transactions, one fsync each (jobs/s: one device's per-batch commit ceiling).

Runs take turns across all figures, so drift on a shared machine spreads over all of them.
Everything it creates (a ``bench-ceiling-*`` device queue, the ``bench_ceiling`` table,
SQLite files in a temp folder) is removed at the end.

    .venv/bin/python -m bench.ceilings --broker [--runs 3]

The broker part (``python -m bench --only broker``) takes a small job's broker traffic
apart, in jobs/s with one 1-object message per job, each figure read against the
confirmed publish to a device queue (classic v2, persistent) measured beside it:

- confirmed publish to a quorum queue declared as ``sync.jobs``, to a classic v2 device
  queue, and of transient messages to that device queue (no disk write at all);
- a small job's broker path with no PostgreSQL or SQLite: the job published (confirmed)
  to the jobs queue; a consumer with the worker's prefetch publishes a persistent batch
  to the device queue (confirmed), then acks the job; a consumer with the agent's
  prefetch acks the batch. Then the same path with a classic jobs queue, with a
  transient batch, and with a direct reply-to result the publisher waits for (as
  ``wait=True``; the pipeline's small jobs use ``wait=False``, no result).

Each figure also records the cores used meanwhile by this process (the client, "worker"
and "agent" connections) and by the broker, to tell which one is the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import aio_pika
import asyncpg
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from bench.agent import _batches, _raw_pass, _raw_rows
from bench.report import Figure, as_table, progress
from bench.rig import service_env
from broker.connection import connect, open_channel
from broker.models import ChangeBatch
from broker.publishing import json_message, publish_confirmed
from broker.topology import (
    CHANGES_EXCHANGE,
    JOBS_QUEUE,
    QueueSpec,
    declare_device_queue,
    declare_exchange,
    declare_queue,
)
from device_agent import AgentSettings
from worker.settings import WorkerSettings

__all__ = ["broker_paths", "ceilings", "main"]

BATCH_SIZE: int = WorkerSettings.model_fields["batch_size"].default
CHUNK_SIZE: int = WorkerSettings.model_fields["chunk_size"].default
WINDOW: int = WorkerSettings.model_fields["confirm_window"].default
PUBLISH_TIMEOUT: float = WorkerSettings.model_fields["publish_timeout"].default
PREFETCH: int = AgentSettings.model_fields["prefetch"].default
WORKER_PREFETCH: int = WorkerSettings.model_fields["prefetch"].default

# Sized so each pass takes a few tenths of a second here: shorter ones are mostly noise.
BIG_MESSAGES = 1_000  # 500,000 objects in 500-object batches, ~110 MB
SMALL_MESSAGES = 8_000  # below the device queue's max length (10,000)
PG_ROWS = 100_000
PG_PASSES = 5  # over all PG_ROWS ids per measured pass
PG_SINGLE = 10_000
SQLITE_ROWS = 100_000
SQLITE_SINGLE = 2_000
CONSUME_TIMEOUT = 120.0

TABLE = "bench_ceiling"
CREATE_SQL = f"""
CREATE TABLE {TABLE} (
    id bigint PRIMARY KEY,
    version bigint NOT NULL,
    autocommitted boolean NOT NULL,
    title text,
    status text,
    amount numeric,
    ref bigint
)
"""
SEED_SQL = (
    f"INSERT INTO {TABLE} (id, version, autocommitted, title, status, amount, ref) "
    "SELECT g, g, false, 'order ' || g, (ARRAY['Open', 'Planned', 'Done'])[1 + g % 3], "
    "(g % 100000) / 100.0, 1 + g % 1000 FROM generate_series(1, $1::bigint) g"
)
COLUMNS = "id, version, autocommitted, title, status, amount, ref"
CHUNK_SQL = f"SELECT {COLUMNS} FROM {TABLE} WHERE id = ANY($1::bigint[])"
ROW_SQL = f"SELECT {COLUMNS} FROM {TABLE} WHERE id = $1"

BIG_PUBLISH = f"ceiling: AMQP confirmed publish ({BATCH_SIZE}-object batches)"
BIG_CONSUME = f"ceiling: AMQP consume+ack ({BATCH_SIZE}-object batches)"
SMALL_PUBLISH = "ceiling: AMQP confirmed publish (1-object batches)"
SMALL_CONSUME = "ceiling: AMQP consume+ack (1-object batches)"
PG_CHUNKS = f"ceiling: PostgreSQL fetch by id = ANY, chunks of {CHUNK_SIZE:,}"
PG_ROW = "ceiling: PostgreSQL single-row fetch, sequential"
SQLITE_BATCHES = f"ceiling: SQLite upsert, {BATCH_SIZE}-row transactions"
SQLITE_ROW = "ceiling: SQLite single-row transactions"


def _body(objects: int, device_id: str) -> bytes:
    """The JSON of one real change batch of ``objects`` WorkOrder upserts."""
    batch: ChangeBatch = _batches(objects, objects)[0]
    return batch.model_copy(update={"device_id": device_id}).model_dump_json().encode()


class _Amqp:
    """A bench device queue bound to the changes exchange, a publishing and a consuming
    channel; publishes and drains it."""

    def __init__(self, exchange: AbstractExchange, queue: AbstractQueue, device_id: str) -> None:
        self.exchange = exchange
        self.queue = queue
        self.device_id = device_id

    @classmethod
    async def open(cls, stack: AsyncExitStack, amqp_url: str) -> _Amqp:
        device_id = f"bench-ceiling-{uuid.uuid4().hex[:8]}"
        connection = await connect(amqp_url, "bench-ceilings")
        stack.push_async_callback(connection.close)
        channel = await open_channel(connection)
        exchange = await declare_exchange(channel, CHANGES_EXCHANGE)
        await declare_device_queue(channel, device_id)
        stack.push_async_callback(channel.queue_delete, f"device.{device_id}")
        # The agent's side: its own channel, with its prefetch.
        consumer = await open_channel(connection, prefetch=PREFETCH)
        queue = await consumer.get_queue(f"device.{device_id}")
        return cls(exchange, queue, device_id)

    async def publish(self, body: bytes, count: int) -> float:
        """Seconds to publish ``count`` persistent ``body`` messages, all confirmed."""
        messages = [json_message(body, message_id=uuid.uuid4().hex) for _ in range(count)]
        started = time.perf_counter()
        await publish_confirmed(
            self.exchange,
            messages,
            self.device_id,
            timeout=PUBLISH_TIMEOUT,
            window=WINDOW,
        )
        return time.perf_counter() - started

    async def consume(self, count: int) -> float:
        """Seconds from subscribing until ``count`` messages are acked, one ack each."""
        done = asyncio.get_running_loop().create_future()
        received = 0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if received == count and not done.done():
                done.set_result(None)

        started = time.perf_counter()
        tag = await self.queue.consume(on_message)
        try:
            async with asyncio.timeout(CONSUME_TIMEOUT):
                await done
            return time.perf_counter() - started
        finally:
            await self.queue.cancel(tag)


async def _seed_pg(conn: asyncpg.Connection) -> None:
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(CREATE_SQL)
    await conn.execute(SEED_SQL, PG_ROWS)
    await conn.execute(f"VACUUM ANALYZE {TABLE}")


async def _pg_chunks(conn: asyncpg.Connection, chunks: list[list[int]]) -> float:
    """Seconds for ``PG_PASSES`` passes over every id, one read-only transaction each."""
    elapsed = 0.0
    for _ in range(PG_PASSES):
        async with conn.transaction(readonly=True):
            started = time.perf_counter()
            count = 0
            for chunk in chunks:
                count += len(await conn.fetch(CHUNK_SQL, chunk))
            elapsed += time.perf_counter() - started
        assert count == PG_ROWS, f"{count} of {PG_ROWS} rows fetched"
    return elapsed


async def _pg_rows(conn: asyncpg.Connection, ids: list[int]) -> float:
    started = time.perf_counter()
    for row_id in ids:
        assert await conn.fetchrow(ROW_SQL, row_id) is not None
    return time.perf_counter() - started


Measure = Callable[[], Awaitable[float]]  # one pass: returns a rate in its figure's unit


def _measures(
    amqp: _Amqp, conn: asyncpg.Connection, folder: Path, big: bytes, small: bytes
) -> dict[str, Measure]:
    ids = list(range(1, PG_ROWS + 1))
    chunks = [ids[start : start + CHUNK_SIZE] for start in range(0, PG_ROWS, CHUNK_SIZE)]
    singles = ids[:: PG_ROWS // PG_SINGLE][:PG_SINGLE]
    progress(f"building {SQLITE_ROWS:,} upserts for SQLite")
    batches = _batches(SQLITE_ROWS, BATCH_SIZE)
    rows = _raw_rows(batches)
    one_row = _batches(SQLITE_SINGLE, 1)
    one_rows = _raw_rows(one_row)
    passes = 0

    def sqlite_file() -> Path:
        nonlocal passes
        passes += 1
        return folder / f"ceiling-{passes}.sqlite"

    async def big_publish() -> float:
        return BIG_MESSAGES * BATCH_SIZE / await amqp.publish(big, BIG_MESSAGES)

    async def big_consume() -> float:
        return BIG_MESSAGES * BATCH_SIZE / await amqp.consume(BIG_MESSAGES)

    async def small_publish() -> float:
        return SMALL_MESSAGES / await amqp.publish(small, SMALL_MESSAGES)

    async def small_consume() -> float:
        return SMALL_MESSAGES / await amqp.consume(SMALL_MESSAGES)

    async def pg_chunks() -> float:
        return PG_PASSES * PG_ROWS / await _pg_chunks(conn, chunks)

    async def pg_row() -> float:
        return len(singles) / await _pg_rows(conn, singles)

    async def sqlite_batches() -> float:
        return SQLITE_ROWS / await asyncio.to_thread(_raw_pass, sqlite_file(), batches, rows)

    async def sqlite_row() -> float:
        return SQLITE_SINGLE / await asyncio.to_thread(_raw_pass, sqlite_file(), one_row, one_rows)

    # Publish before consume: each consume drains what the publish before it queued.
    return {
        BIG_PUBLISH: big_publish,
        BIG_CONSUME: big_consume,
        SMALL_PUBLISH: small_publish,
        SMALL_CONSUME: small_consume,
        PG_CHUNKS: pg_chunks,
        PG_ROW: pg_row,
        SQLITE_BATCHES: sqlite_batches,
        SQLITE_ROW: sqlite_row,
    }


UNITS = {
    BIG_PUBLISH: "objects/s",
    BIG_CONSUME: "objects/s",
    SMALL_PUBLISH: "jobs/s",
    SMALL_CONSUME: "jobs/s",
    PG_CHUNKS: "objects/s",
    PG_ROW: "jobs/s",
    SQLITE_BATCHES: "objects/s",
    SQLITE_ROW: "jobs/s",
}


def _notes(big: bytes, small: bytes) -> dict[str, str]:
    queue = "persistent, to a durable classic v2 device queue"
    return {
        BIG_PUBLISH: f"{BIG_MESSAGES} x {len(big):,} B bodies, {queue}, confirm window "
        f"{WINDOW}; objects/s = messages/s x {BATCH_SIZE}",
        BIG_CONSUME: f"{BIG_MESSAGES} x {len(big):,} B, prefetch {PREFETCH}, one ack each; "
        f"objects/s = messages/s x {BATCH_SIZE}",
        SMALL_PUBLISH: f"{SMALL_MESSAGES:,} x {len(small)} B bodies, {queue}, confirm window "
        f"{WINDOW}; one message per job",
        SMALL_CONSUME: f"{SMALL_MESSAGES:,} x {len(small)} B, prefetch {PREFETCH}, one ack each",
        PG_CHUNKS: f"asyncpg, {PG_PASSES} passes over {PG_ROWS:,} rows of 7 columns, "
        "one read-only transaction each",
        PG_ROW: f"asyncpg, {PG_SINGLE:,} fetches by primary key on one connection",
        SQLITE_BATCHES: f"bench.agent raw executemany upsert, {SQLITE_ROWS:,} pre-encoded rows, "
        "WAL, synchronous=FULL",
        SQLITE_ROW: f"{SQLITE_SINGLE} transactions of one upsert each, WAL, synchronous=FULL",
    }


async def _warm_up(amqp: _Amqp, measures: dict[str, Measure], small: bytes) -> None:
    """One short AMQP round and one pass of each PostgreSQL figure, not counted."""
    progress("warm-up")
    await amqp.publish(small, WINDOW)
    await amqp.consume(WINDOW)
    for name in (PG_CHUNKS, PG_ROW):
        await measures[name]()


async def ceilings(env: dict[str, str], *, runs: int = 3) -> list[Figure]:
    """Raw AMQP, PostgreSQL and SQLite ceilings, ``runs`` values each (kind "ceiling")."""
    async with AsyncExitStack() as stack:
        amqp = await _Amqp.open(stack, env["SYNC_AMQP_URL"])
        big, small = _body(BATCH_SIZE, amqp.device_id), _body(1, amqp.device_id)
        # As the worker's pool does: JIT only slows these short fetches down.
        conn = await asyncpg.connect(env["SYNC_DATABASE_URL"], server_settings={"jit": "off"})
        stack.push_async_callback(conn.close)
        progress(f"seeding {TABLE} with {PG_ROWS:,} rows")
        stack.push_async_callback(conn.execute, f"DROP TABLE IF EXISTS {TABLE}")
        await _seed_pg(conn)
        folder = Path(tempfile.mkdtemp(prefix="bench-ceilings-"))
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        measures = _measures(amqp, conn, folder, big, small)
        await _warm_up(amqp, measures, small)
        values: dict[str, list[float]] = {name: [] for name in measures}
        for run in range(1, runs + 1):
            for name, measure in measures.items():
                values[name].append(await measure())
                progress(f"run {run}/{runs}: {name}: {values[name][-1]:,.0f} {UNITS[name]}")
        notes = _notes(big, small)
    return [
        Figure(name, UNITS[name], tuple(values[name]), kind="ceiling", note=notes[name])
        for name in measures
    ]


# The broker part: a small job's broker traffic, message by message.

PATH_JOBS = 2_000  # per pass; below the device queue's max length
CLASSIC_PUBLISH = "broker: confirmed publish, 1-object, classic v2 (device queue)"
QUORUM_PUBLISH = "broker: confirmed publish, 1-object, quorum (as sync.jobs)"
TRANSIENT_PUBLISH = "broker: confirmed publish, 1-object, classic v2, transient"
PATH = "broker: small job's path, quorum jobs queue -> device queue"
PATH_CLASSIC_JOBS = "broker: small job's path, classic jobs queue"
PATH_TRANSIENT_BATCH = "broker: small job's path, transient batch"
PATH_REPLY = "broker: small job's path + direct reply-to result"


def _broker_pid() -> int:
    """The local node's OS pid, from the pid file ``scripts/services.sh`` has it write."""
    pid_file = Path(__file__).resolve().parent.parent / ".services/rabbitmq/rabbitmq.pid"
    return int(pid_file.read_text().split()[0])


def _message(body: bytes, *, persistent: bool, message_id: str) -> aio_pika.Message:
    if persistent:
        return json_message(body, message_id=message_id)
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        message_id=message_id,
    )


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class _Paths:
    """Probe queues (a quorum one declared as ``sync.jobs``, a classic one as a device's)
    and three connections standing in for the client, the worker and the agent."""

    def __init__(
        self,
        client: AbstractChannel,
        worker: AbstractChannel,
        agent: AbstractChannel,
        device_id: str,
        jobs: dict[str, str],
    ) -> None:
        self.client, self.worker, self.agent = client, worker, agent
        self.device_id = device_id
        self.jobs = jobs  # queue type -> jobs queue name
        self.changes: AbstractExchange | None = None

    @classmethod
    async def open(cls, stack: AsyncExitStack, amqp_url: str) -> _Paths:
        tag = uuid.uuid4().hex[:8]
        connections: list[AbstractRobustConnection] = []
        for role in ("client", "worker", "agent"):
            connection = await connect(amqp_url, f"bench-broker-{role}")
            stack.push_async_callback(connection.close)
            connections.append(connection)
        client = await open_channel(connections[0])
        worker = await open_channel(connections[1], prefetch=WORKER_PREFETCH)
        agent = await open_channel(connections[2], prefetch=PREFETCH)
        device_id = f"bench-broker-{tag}"
        await declare_device_queue(client, device_id)
        stack.push_async_callback(client.queue_delete, f"device.{device_id}")
        jobs = {}
        for kind, arguments in (
            ("quorum", JOBS_QUEUE.arguments),
            ("classic", {"x-queue-type": "classic", "x-queue-version": 2}),
        ):
            name = f"bench-broker-jobs-{kind}-{tag}"
            await declare_queue(client, QueueSpec(name, arguments=dict(arguments)))
            stack.push_async_callback(client.queue_delete, name)
            jobs[kind] = name
        paths = cls(client, worker, agent, device_id, jobs)
        paths.changes = await declare_exchange(worker, CHANGES_EXCHANGE)
        return paths

    async def publish(self, queue: str, body: bytes, count: int, *, persistent: bool) -> float:
        """Seconds to publish ``count`` messages to ``queue``, all confirmed; then purged."""
        messages = [
            _message(body, persistent=persistent, message_id=uuid.uuid4().hex) for _ in range(count)
        ]
        exchange = self.client.default_exchange
        started = time.perf_counter()
        await publish_confirmed(exchange, messages, queue, timeout=PUBLISH_TIMEOUT, window=WINDOW)
        elapsed = time.perf_counter() - started
        await (await self.client.get_queue(queue)).purge()
        return elapsed

    async def path(self, jobs_kind: str, body: bytes, *, persistent: bool, reply: bool) -> float:
        """Seconds for ``PATH_JOBS`` jobs to pass the broker as a small job does, until the
        last batch is acked (and, with ``reply``, the last result is received)."""
        assert self.changes is not None
        changes = self.changes
        loop = asyncio.get_running_loop()
        batches_acked: asyncio.Future[None] = loop.create_future()
        replies_in: asyncio.Future[None] = loop.create_future()
        counts = {"acked": 0, "replies": 0}

        async def on_job(message: AbstractIncomingMessage) -> None:
            batch = _message(body, persistent=persistent, message_id=uuid.uuid4().hex)
            await publish_confirmed(
                changes, [batch], self.device_id, timeout=PUBLISH_TIMEOUT, window=1
            )
            if reply and message.reply_to:
                result = json_message(b"{}", correlation_id=message.correlation_id)
                await self.worker.default_exchange.publish(
                    result, message.reply_to, mandatory=False, timeout=PUBLISH_TIMEOUT
                )
            await message.ack()

        async def on_batch(message: AbstractIncomingMessage) -> None:
            await message.ack()
            counts["acked"] += 1
            if counts["acked"] == PATH_JOBS and not batches_acked.done():
                batches_acked.set_result(None)

        async def on_reply(message: AbstractIncomingMessage) -> None:
            counts["replies"] += 1
            if counts["replies"] == PATH_JOBS and not replies_in.done():
                replies_in.set_result(None)

        jobs_queue = await self.worker.get_queue(self.jobs[jobs_kind])
        device_queue = await self.agent.get_queue(f"device.{self.device_id}")
        tags = [
            (jobs_queue, await jobs_queue.consume(on_job)),
            (device_queue, await device_queue.consume(on_batch)),
        ]
        reply_queue = None
        if reply:
            reply_queue = await self.client.get_queue("amq.rabbitmq.reply-to")
            tags.append((reply_queue, await reply_queue.consume(on_reply, no_ack=True)))
        else:
            replies_in.set_result(None)
        messages = [
            json_message(
                body,
                message_id=uuid.uuid4().hex,
                correlation_id=uuid.uuid4().hex,
                reply_to="amq.rabbitmq.reply-to" if reply else None,
            )
            for _ in range(PATH_JOBS)
        ]
        started = time.perf_counter()
        try:
            await publish_confirmed(
                self.client.default_exchange,
                messages,
                self.jobs[jobs_kind],
                timeout=PUBLISH_TIMEOUT,
                window=WINDOW,
            )
            async with asyncio.timeout(CONSUME_TIMEOUT):
                await asyncio.gather(batches_acked, replies_in)
            return time.perf_counter() - started
        finally:
            for queue, tag in tags:
                await queue.cancel(tag)


async def broker_paths(env: dict[str, str], *, runs: int = 3) -> list[Figure]:
    """A small job's broker traffic taken apart, in jobs/s against the confirmed publish to
    a device queue (kind "info", so the pipeline's ceilings stay as they are)."""
    broker_pid = _broker_pid()
    async with AsyncExitStack() as stack:
        paths = await _Paths.open(stack, env["SYNC_AMQP_URL"])
        small = _body(1, paths.device_id)
        device = f"device.{paths.device_id}"

        def publish(queue: str, persistent: bool) -> Measure:
            async def measure() -> float:
                return SMALL_MESSAGES / await paths.publish(
                    queue, small, SMALL_MESSAGES, persistent=persistent
                )

            return measure

        def path(jobs_kind: str, persistent: bool, reply: bool) -> Measure:
            async def measure() -> float:
                seconds = await paths.path(jobs_kind, small, persistent=persistent, reply=reply)
                return PATH_JOBS / seconds

            return measure

        measures = {
            CLASSIC_PUBLISH: publish(device, True),
            QUORUM_PUBLISH: publish(paths.jobs["quorum"], True),
            TRANSIENT_PUBLISH: publish(device, False),
            PATH: path("quorum", True, False),
            PATH_CLASSIC_JOBS: path("classic", True, False),
            PATH_TRANSIENT_BATCH: path("quorum", False, False),
            PATH_REPLY: path("quorum", True, True),
        }
        progress("broker: warm-up")
        await paths.publish(device, small, WINDOW, persistent=True)
        values: dict[str, list[float]] = {name: [] for name in measures}
        cores: dict[str, dict[str, list[float]]] = {
            name: {"cpu_bench": [], "cpu_broker": []} for name in measures
        }
        for run in range(1, runs + 1):
            for name, measure in measures.items():
                wall, mine, theirs = (
                    time.perf_counter(),
                    time.process_time(),
                    _cpu_seconds(broker_pid),
                )
                values[name].append(await measure())
                wall = time.perf_counter() - wall
                cores[name]["cpu_bench"].append((time.process_time() - mine) / wall)
                cores[name]["cpu_broker"].append((_cpu_seconds(broker_pid) - theirs) / wall)
                progress(
                    f"run {run}/{runs}: {name}: {values[name][-1]:,.0f} jobs/s; cores: "
                    f"this process {cores[name]['cpu_bench'][-1]:.2f}, "
                    f"broker {cores[name]['cpu_broker'][-1]:.2f} "
                    f"({cores[name]['cpu_broker'][-1] / values[name][-1] * 1e6:.0f} µs per job)"
                )
    notes = {
        CLASSIC_PUBLISH: f"{SMALL_MESSAGES:,} x {len(small)} B, persistent, "
        f"confirm window {WINDOW}",
        QUORUM_PUBLISH: f"{SMALL_MESSAGES:,} x {len(small)} B to a quorum queue with "
        f"sync.jobs' arguments, confirm window {WINDOW}",
        TRANSIENT_PUBLISH: f"{SMALL_MESSAGES:,} x {len(small)} B, delivery mode 1, confirm "
        f"window {WINDOW}",
        PATH: f"{PATH_JOBS:,} jobs, {WINDOW} in flight; batch confirmed before the job's ack; "
        f"prefetch {WORKER_PREFETCH} (worker) and {PREFETCH} (agent)",
        PATH_CLASSIC_JOBS: "as above, jobs queue classic v2 (not replicated)",
        PATH_TRANSIENT_BATCH: "as above, batch with delivery mode 1",
        PATH_REPLY: "as above, result by direct reply-to before the job's ack, awaited",
    }
    return [
        Figure(
            name,
            "jobs/s",
            tuple(values[name]),
            kind="info",
            note=notes[name],
            baseline=CLASSIC_PUBLISH,
            extra={
                **{key: statistics.median(v) for key, v in cores[name].items()},
                # CPU per job tells the broker's cost apart from this process's, whichever
                # of the two is the bound.
                "broker_cpu_us_per_job": statistics.median(
                    used / rate * 1e6
                    for used, rate in zip(cores[name]["cpu_broker"], values[name], strict=True)
                ),
            },
        )
        for name in measures
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--broker", action="store_true", help="the broker part instead")
    args = parser.parse_args()
    env = service_env()
    started = time.perf_counter()
    part = broker_paths if args.broker else ceilings
    figures = asyncio.run(part(env, runs=args.runs))
    progress(f"done in {time.perf_counter() - started:.1f} s")
    print(as_table(figures))


if __name__ == "__main__":
    main()
