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
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue

from bench.agent import _batches, _raw_pass, _raw_rows
from bench.report import Figure, as_table, progress
from bench.rig import service_env
from broker.connection import connect, open_channel
from broker.models import ChangeBatch
from broker.publishing import json_message, publish_confirmed
from broker.topology import CHANGES_EXCHANGE, declare_device_queue, declare_exchange
from device_agent import AgentSettings
from worker.settings import WorkerSettings

__all__ = ["ceilings", "main"]

BATCH_SIZE: int = WorkerSettings.model_fields["batch_size"].default
CHUNK_SIZE: int = WorkerSettings.model_fields["chunk_size"].default
WINDOW: int = WorkerSettings.model_fields["confirm_window"].default
PUBLISH_TIMEOUT: float = WorkerSettings.model_fields["publish_timeout"].default
PREFETCH: int = AgentSettings.model_fields["prefetch"].default

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    env = service_env()
    started = time.perf_counter()
    figures = asyncio.run(ceilings(env, runs=args.runs))
    progress(f"ceilings done in {time.perf_counter() - started:.1f} s")
    print(as_table(figures))


if __name__ == "__main__":
    main()
