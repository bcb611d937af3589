"""Device side: the SQLite apply rate and the agent's peak memory for a 100,000-object job.

    .venv/bin/python -m bench.agent [--objects 100000] [--batch-size 500] [--runs 3]

1. Store apply rate, the ceiling of the device side: ``OfflineStore.apply_batch`` over
   ``--objects`` WorkOrder upserts built in memory, in batches of ``--batch-size``, into a
   fresh SQLite file. The raw ceiling inserts the same rows (JSON encoded beforehand) with
   ``sqlite3`` ``executemany`` of an ``INSERT ... ON CONFLICT DO UPDATE`` into an
   equivalent table, one transaction per batch, same pragmas (WAL, synchronous=FULL), in a
   thread; a second raw figure encodes the JSON inside the timed loop, as the store must.
   Two more start from the batches' bodies (as the worker encodes them), one transaction
   per batch: the agent's path (``decode_batch``, then ``OfflineStore.apply_group``) and
   the pydantic one (``decode``, then ``apply_batch``). No broker, no PostgreSQL.
2. End to end with the agent as a separate process (``python -m device_agent``): one list
   job naming every seeded work order, an in-process worker publishing batches of
   ``--batch-size``. Online: the agent is connected first; objects/s from publish until
   the device has applied every batch, the agent's RSS right after it connected and its
   peak (``VmHWM``) at the end. Backlog: the job is published while the agent is offline,
   so every batch waits in the device queue; then the agent starts, and objects/s from
   its connecting until the last batch is applied (the agent's own pace, not the
   worker's) and its peak RSS.
3. Small batches: ``--small-batches`` one-object batches, encoded as the worker does and
   published straight to the device queue while the agent is offline; then the agent
   starts, and batches/s from its connecting until the last one is applied. One SQLite
   commit (an fsync) per batch bounds this unless batches share a commit.

Medians of ``--runs`` runs. Seeds ``work_order`` in the local PostgreSQL (truncating it,
as ``bench.pipeline`` does) and owns the local services while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.report import Figure
from bench.rig import MODEL, USER, accounts, seed_work_orders, service_env
from broker import ObjectList, Session, SyncClient
from broker.connection import connect, open_channel
from broker.models import ChangeBatch, SyncResult, UpsertChange
from broker.publishing import json_message, publish_confirmed
from broker.topology import CHANGES_EXCHANGE
from broker.wire import decode, decode_batch
from device_agent import AgentSettings, OfflineStore, tables
from device_agent.apply import batch_rows
from syncctl.devices import register_device, unregister_device
from worker import Worker, WorkerSettings, load_model
from worker.publisher import encode_batch

ENTITY = "WorkOrder"
# What the e2e rows hold besides what bench.pipeline seeds, so both parts carry the
# same shape of data: a due date and an amount with cents.
SHAPE_SQL = (
    "UPDATE work_order SET due = timestamptz '2026-01-01 08:00+00' + id * interval '1 minute', "
    "amount = id / 100.0"
)
RAW_UPSERT = """
INSERT INTO objects (entity, id, version, data, dirty) VALUES (?, ?, ?, ?, 0)
ON CONFLICT (entity, id) DO UPDATE
    SET version = excluded.version, data = excluded.data, dirty = 0
    WHERE excluded.version >= objects.version
"""
TIMEOUT = 600.0
SMALL_BATCHES = 2_000

RawRow = tuple[str, int, int, str]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# 1. Store apply rate.


def _work_order(n: int) -> dict[str, Any]:
    """A WorkOrder as the worker sends it to a Dispatcher: every member, JSON-ready."""
    return {
        "title": f"order {n}",
        "status": ("Open", "Planned", "Done")[n % 3],
        "due": f"2026-{1 + n % 12:02d}-{1 + n % 28:02d}T08:{n % 60:02d}:00Z",
        "amount": f"{n % 100_000 / 100:.2f}",
        "internal_note": None,
        "WorkOrder_Technician": 1 + n % 50,
        "WorkOrder_Customer": 1 + n % 1_000,
    }


def _batches(objects: int, batch_size: int) -> list[ChangeBatch]:
    changes = [
        UpsertChange(entity=ENTITY, id=n, version=n, data=_work_order(n))
        for n in range(1, objects + 1)
    ]
    job_id = uuid.uuid4().hex
    starts = range(0, objects, batch_size)
    return [
        ChangeBatch(
            batch_id=uuid.uuid4().hex,
            job_id=job_id,
            device_id="bench-agent",
            position=position,
            total=len(starts),
            changes=tuple(changes[start : start + batch_size]),
        )
        for position, start in enumerate(starts, 1)
    ]


def _raw_rows(batches: list[ChangeBatch]) -> list[list[RawRow]]:
    return [
        [
            (c.entity, c.id, c.version, json.dumps(c.data))
            for c in batch.changes
            if isinstance(c, UpsertChange)
        ]
        for batch in batches
    ]


async def _store_pass(path: Path, batches: list[ChangeBatch]) -> float:
    store = await OfflineStore.open(path)
    try:
        started = time.perf_counter()
        for batch in batches:
            assert await store.apply_batch(batch)
        elapsed = time.perf_counter() - started
        assert len(await store.ids(ENTITY)) == sum(len(b.changes) for b in batches)
    finally:
        await store.close()
    return elapsed


def _raw_pass(path: Path, batches: list[ChangeBatch], chunks: list[list[RawRow]] | None) -> float:
    """Seconds to insert ``batches``; JSON encoded in the timed loop unless ``chunks``."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(tables.OBJECTS_TABLE)
        started = time.perf_counter()
        for n, batch in enumerate(batches):
            rows = chunks[n] if chunks is not None else _raw_rows([batch])[0]
            db.execute("BEGIN IMMEDIATE")
            db.executemany(RAW_UPSERT, rows)
            db.execute("COMMIT")
        elapsed = time.perf_counter() - started
        (count,) = db.execute("SELECT count(*) FROM objects").fetchone()
        assert count == sum(len(batch.changes) for batch in batches)
    finally:
        db.close()
    return elapsed


async def _body_pass(path: Path, bodies: list[bytes], reader: str) -> float:
    """Seconds to decode and apply ``bodies``, one transaction each, the agent's way
    (``reader`` "agent") or through pydantic models ("models")."""
    store = await OfflineStore.open(path)
    try:
        started = time.perf_counter()
        for body in bodies:
            if reader == "agent":
                assert await store.apply_group([batch_rows(decode_batch(body))]) == [True]
            else:
                assert await store.apply_batch(decode(ChangeBatch, body))
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
    return elapsed


STORE, RAW, RAW_JSON = "store", "raw", "raw+json"
AGENT_PATH, MODEL_PATH = "body: agent", "body: models"


async def apply_rates(objects: int, batch_size: int, runs: int) -> dict[str, list[float]]:
    """Objects/s of the store and of raw sqlite3 (JSON encoded before or inside the timed
    loop), one figure per run each."""
    _progress(f"building {objects:,} upserts in batches of {batch_size:,}")
    batches = _batches(objects, batch_size)
    chunks = _raw_rows(batches)
    bodies = [
        encode_batch(
            batch.job_id,
            batch.device_id,
            [c.model_dump_json() for c in batch.changes],
            position=batch.position,
            total=batch.total,
        ).body
        for batch in batches
    ]
    rates: dict[str, list[float]] = {
        STORE: [],
        RAW: [],
        RAW_JSON: [],
        AGENT_PATH: [],
        MODEL_PATH: [],
    }
    folder = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    try:
        # Runs take turns, so drift on a shared machine spreads over all three.
        for run in range(1, runs + 1):
            elapsed = await _store_pass(folder / f"store-{run}.sqlite", batches)
            rates[STORE].append(objects / elapsed)
            for name, given in ((RAW, chunks), (RAW_JSON, None)):
                path = folder / f"{name}-{run}.sqlite"
                rates[name].append(
                    objects / await asyncio.to_thread(_raw_pass, path, batches, given)
                )
            for name, reader in ((AGENT_PATH, "agent"), (MODEL_PATH, "models")):
                path = folder / f"{reader}-{run}.sqlite"
                rates[name].append(objects / await _body_pass(path, bodies, reader))
            _progress(
                f"run {run}/{runs}: objects/s store {rates[STORE][-1]:,.0f}, "
                f"raw {rates[RAW][-1]:,.0f}, raw+json {rates[RAW_JSON][-1]:,.0f}, "
                f"from the body: agent {rates[AGENT_PATH][-1]:,.0f}, "
                f"models {rates[MODEL_PATH][-1]:,.0f}"
            )
    finally:
        shutil.rmtree(folder)
    return rates


# 2. End to end, the agent as a separate process.


@dataclass(frozen=True)
class OnlineRun:
    """The agent connected before the job is published."""

    rate: float  # objects/s, publish until the last batch applied
    worker_done: float  # s from publish until the worker's result
    device_done: float  # s from publish until the last batch applied
    batches: int
    start_rss: float  # MB, VmRSS right after the agent connected
    peak_rss: float  # MB, VmHWM once every batch is applied
    end_rss: float  # MB, VmRSS then


@dataclass(frozen=True)
class BacklogRun:
    """The whole job waits in the device queue; then the agent starts."""

    rate: float  # objects/s, agent connected until the last batch applied
    drained: float  # s, the same span
    peak_rss: float  # MB, VmHWM once every batch is applied


def _proc_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"{field} not in /proc/{pid}/status")


def _read(log: Path) -> str:
    return log.read_text(errors="replace")


@asynccontextmanager
async def _device(env: dict[str, str]) -> AsyncIterator[tuple[str, Path]]:
    """A registered device (queue included) and a temp folder; both gone afterwards."""
    device_id = f"bench-{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    conn = await asyncpg.connect(env["SYNC_DATABASE_URL"])
    connection = await connect(env["SYNC_AMQP_URL"], "bench-agent")
    try:
        channel = await open_channel(connection)
        await register_device(conn, channel, accounts(env), device_id, USER)
        try:
            yield device_id, folder
        finally:
            await unregister_device(conn, channel, accounts(env), device_id)
    finally:
        await connection.close()
        await conn.close()
        shutil.rmtree(folder)


@asynccontextmanager
async def _agent(
    env: dict[str, str], device_id: str, folder: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m device_agent`` for ``device_id``, yielded once it has connected; then
    SIGTERM and wait. Its log (one line per batch) goes to ``folder / "agent.log"``."""
    log = folder / "agent.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "device_agent", "--device", device_id, "--db", str(folder / "device.sqlite")),
            env={**os.environ, **env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        async with asyncio.timeout(60):
            while "agent started" not in await asyncio.to_thread(_read, log):
                if process.returncode is not None:
                    tail = (await asyncio.to_thread(_read, log)).splitlines()[-20:]
                    raise RuntimeError(f"agent exited {process.returncode}: " + "\n".join(tail))
                await asyncio.sleep(0.01)
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def _publish(env: dict[str, str], device_id: str, ids: list[int]) -> SyncResult:
    """One list job naming every id; returns once the worker has published every batch."""
    session = Session(user_id=USER, device_id=device_id)
    async with await SyncClient.connect(env["SYNC_AMQP_URL"], name="bench-agent") as client:
        result = await client.synchronize_to_device(
            session, lists=[ObjectList(ENTITY, ids)], timeout=TIMEOUT
        )
    assert result.status == "done", result
    assert result.synced == len(ids), f"{result.synced} of {len(ids)} synced"
    return result


async def _applied(store: OfflineStore, result: SyncResult, folder: Path, count: int) -> None:
    """Wait until the device has applied every batch of ``result``, then check it all."""
    await store.wait_for_batches(result.batch_ids, timeout=TIMEOUT, interval=0.01)
    assert len(await store.ids(ENTITY)) == count
    logged = (await asyncio.to_thread(_read, folder / "agent.log")).count("batch applied")
    assert logged == len(result.batch_ids), f"{logged} of {len(result.batch_ids)} logged"


async def _online(env: dict[str, str], ids: list[int]) -> OnlineRun:
    async with _device(env) as (device_id, folder), _agent(env, device_id, folder) as agent:
        await asyncio.sleep(0.5)  # let it settle: consumer set up, nothing to apply yet
        start_rss = _proc_mb(agent.pid, "VmRSS")
        _progress(f"  online: agent connected, RSS {start_rss:.1f} MB; publishing")
        async with await OfflineStore.open(folder / "device.sqlite") as store:
            started = time.perf_counter()
            result = await _publish(env, device_id, ids)
            worker_done = time.perf_counter() - started
            await _applied(store, result, folder, len(ids))
            device_done = time.perf_counter() - started
        peak_rss, end_rss = _proc_mb(agent.pid, "VmHWM"), _proc_mb(agent.pid, "VmRSS")
    return OnlineRun(
        len(ids) / device_done,
        worker_done,
        device_done,
        len(result.batch_ids),
        start_rss,
        peak_rss,
        end_rss,
    )


async def _backlog(env: dict[str, str], ids: list[int]) -> BacklogRun:
    async with _device(env) as (device_id, folder):
        _progress("  backlog: publishing with the agent offline")
        result = await _publish(env, device_id, ids)
        async with (
            await OfflineStore.open(folder / "device.sqlite") as store,
            _agent(env, device_id, folder) as agent,
        ):
            started = time.perf_counter()
            await _applied(store, result, folder, len(ids))
            drained = time.perf_counter() - started
            peak_rss = _proc_mb(agent.pid, "VmHWM")
    return BacklogRun(len(ids) / drained, drained, peak_rss)


async def agent_runs(
    env: dict[str, str], objects: int, batch_size: int, runs: int
) -> tuple[list[OnlineRun], list[BacklogRun]]:
    _progress(f"seeding {objects:,} work orders")
    ids = await seed_work_orders(env["SYNC_DATABASE_URL"], objects)
    conn = await asyncpg.connect(env["SYNC_DATABASE_URL"])
    try:
        await conn.execute(SHAPE_SQL)
    finally:
        await conn.close()
    settings = WorkerSettings(
        amqp_url=env["SYNC_AMQP_URL"],
        database_url=env["SYNC_DATABASE_URL"],
        model=MODEL,
        batch_size=batch_size,
    )
    worker = await Worker.start(settings, await load_model(MODEL))
    online: list[OnlineRun] = []
    backlog: list[BacklogRun] = []
    try:
        for run in range(1, runs + 1):
            _progress(f"run {run}/{runs}: end to end, agent as a process")
            online.append(o := await _online(env, ids))
            _progress(
                f"  online: {o.rate:,.0f} objects/s ({o.batches} batches; worker done at "
                f"{o.worker_done:.1f} s, device at {o.device_done:.1f} s); agent RSS "
                f"{o.start_rss:.1f} MB at start, peak {o.peak_rss:.1f} MB, {o.end_rss:.1f} MB "
                "at the end"
            )
            backlog.append(b := await _backlog(env, ids))
            _progress(
                f"  backlog: drained in {b.drained:.2f} s, {b.rate:,.0f} objects/s; "
                f"agent peak RSS {b.peak_rss:.1f} MB"
            )
    finally:
        await worker.stop()
    return online, backlog


# 3. A backlog of one-object batches.


async def _small_backlog(env: dict[str, str], count: int) -> float:
    """Batches/s of an agent process draining ``count`` one-object batches."""
    async with _device(env) as (device_id, folder):
        job_id = uuid.uuid4().hex
        bodies = [
            encode_batch(
                job_id,
                device_id,
                [
                    UpsertChange(
                        entity=ENTITY, id=n, version=n, data=_work_order(n)
                    ).model_dump_json()
                ],
                position=n,
                total=count,
            )
            for n in range(1, count + 1)
        ]
        connection = await connect(env["SYNC_AMQP_URL"], "bench-agent-small")
        try:
            channel = await open_channel(connection)
            exchange = await channel.get_exchange(CHANGES_EXCHANGE.name)
            messages = [json_message(b.body, message_id=b.batch_id) for b in bodies]
            await publish_confirmed(
                exchange, messages, routing_key=device_id, timeout=TIMEOUT, window=256
            )
        finally:
            await connection.close()
        async with (
            await OfflineStore.open(folder / "device.sqlite") as store,
            _agent(env, device_id, folder),
        ):
            started = time.perf_counter()
            await store.wait_for_batches(
                [b.batch_id for b in bodies], timeout=TIMEOUT, interval=0.01
            )
            drained = time.perf_counter() - started
            assert len(await store.ids(ENTITY)) == count
    return count / drained


async def small_backlog_runs(env: dict[str, str], count: int, runs: int) -> list[float]:
    rates: list[float] = []
    for run in range(1, runs + 1):
        rates.append(await _small_backlog(env, count))
        _progress(f"run {run}/{runs}: {count:,} one-object batches, {rates[-1]:,.0f} batches/s")
    return rates


# Report.


def _row(label: str, values: list[float], unit: str, digits: int = 0) -> str:
    median, low, high = statistics.median(values), min(values), max(values)
    figures = f"{median:>10,.{digits}f} {low:>10,.{digits}f} {high:>10,.{digits}f}"
    return f"{label:<46} {figures}  {unit}".rstrip()


def _report(
    objects: int,
    batch_size: int,
    rates: dict[str, list[float]],
    online: list[OnlineRun],
    backlog: list[BacklogRun],
    small: list[float],
    small_count: int,
) -> None:
    store = rates[STORE]
    fields = AgentSettings.model_fields
    prefetch = fields["prefetch"].default
    group = (fields["group_batches"].default, fields["group_changes"].default)
    rows = [
        ("store apply_batch (SQLite, in process)", store, "objects/s", 0),
        ("raw sqlite3 executemany, same pragmas", rates[RAW], "objects/s", 0),
        ("raw sqlite3, JSON encoded in the loop", rates[RAW_JSON], "objects/s", 0),
        ("body -> applied: decode_batch + apply_group", rates[AGENT_PATH], "objects/s", 0),
        ("body -> applied: decode (pydantic) + apply_batch", rates[MODEL_PATH], "objects/s", 0),
        *(
            (f"store / {name}", [s / r for s, r in zip(store, rates[name], strict=True)], "", 2)
            for name in (RAW, RAW_JSON)
        ),
        ("online: publish -> last batch applied", [r.rate for r in online], "objects/s", 0),
        ("  worker result after", [r.worker_done for r in online], "s", 1),
        ("  last batch applied after", [r.device_done for r in online], "s", 1),
        ("  batches", [float(r.batches) for r in online], "", 0),
        ("  agent RSS after connecting", [r.start_rss for r in online], "MB", 1),
        ("  agent peak RSS (VmHWM)", [r.peak_rss for r in online], "MB", 1),
        ("  agent RSS at the end", [r.end_rss for r in online], "MB", 1),
        ("backlog: agent connected -> last applied", [r.rate for r in backlog], "objects/s", 0),
        ("  agent peak RSS (VmHWM)", [r.peak_rss for r in backlog], "MB", 1),
        (f"backlog of {small_count:,} one-object batches", small, "batches/s", 0),
    ]
    print(f"\ndevice side, {objects:,} WorkOrder objects, batches of {batch_size:,}")
    print(f"{'figure':<46} {'median':>10} {'min':>10} {'max':>10}")
    for label, values, unit, digits in rows:
        print(_row(label, values, unit, digits))
    print(
        f"(median, min and max of {len(store)} runs; the agent runs with prefetch {prefetch}, "
        f"groups of up to {group[0]} batches or {group[1]:,} changes per commit; "
        "every figure includes SQLite fsyncs)"
    )


async def device_side(
    env: dict[str, str],
    *,
    objects: int = 100_000,
    batch_size: int = 500,
    runs: int = 3,
    small_batches: int = SMALL_BATCHES,
) -> list[Figure]:
    """The suite's figures: store apply rate, the agent draining backlogs, its memory."""
    rates = await apply_rates(objects, batch_size, runs)
    online, backlog = await agent_runs(env, objects, batch_size, runs)
    small = await small_backlog_runs(env, small_batches, runs)
    job = f"{objects:,}-object job, batches of {batch_size}"
    return [
        Figure("agent: store apply_batch (in process)", "objects/s", tuple(rates[STORE])),
        Figure(
            "agent: batch body decoded and applied (in process)",
            "objects/s",
            tuple(rates[AGENT_PATH]),
        ),
        Figure("agent process: draining a backlog", "objects/s", tuple(r.rate for r in backlog)),
        Figure(
            "agent process: draining a backlog of one-object batches",
            "batches/s",
            tuple(small),
            note=f"{small_batches:,} batches",
        ),
        Figure(
            "agent process: peak RSS",
            "MB",
            tuple(max(r.peak_rss for r in runs_) for runs_ in zip(online, backlog, strict=True)),
            kind="info",
            higher_is_better=False,
            note=job,
        ),
    ]


async def main(objects: int, batch_size: int, runs: int, small_batches: int) -> None:
    env = service_env()
    rates = await apply_rates(objects, batch_size, runs)
    online, backlog = await agent_runs(env, objects, batch_size, runs)
    small = await small_backlog_runs(env, small_batches, runs)
    _report(objects, batch_size, rates, online, backlog, small, small_batches)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument(
        "--batch-size", type=int, default=WorkerSettings.model_fields["batch_size"].default
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small-batches", type=int, default=SMALL_BATCHES)
    args = parser.parse_args()
    asyncio.run(main(args.objects, args.batch_size, args.runs, args.small_batches))
