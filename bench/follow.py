"""Follow (SPEC §12): from a committed change to applied on every device holding the object.

    .venv/bin/python -m bench.follow [--rates 1000 100 50] [--seconds 20] [--drain 30]
                                     [--devices 1000] [--held 5] [--workers 2]
                                     [--agent-processes 4] [--per-transaction 5]
                                     [--worker-setting NAME=VALUE ...] [--runs 1]
                                     [--profile DIR]

The issue's question: p50/p99 from a committed change to applied on every holding device
at 1,000 changes/s with 1,000 holding devices, and the changes/s sustained (SPEC §11:
p99 ≤ 1 s). Anchors: Electric about 5,000 row changes/s and 6 ms write to client;
PowerSync's replication 2,000-4,000 ops/s.

Set-up (untimed, about 45 s here):

- the model is ``bench/follow_model.yaml``: the example model's work orders with
  ``follow: true``, in tables of their own (``follow_work_order``...), so the other
  parts' work orders never fire capture triggers; created by ``init_database(...,
  create_tables=True)``, which installs the capture. ``--devices`` x ``--held`` work
  orders are seeded, ``USER`` is a Dispatcher (reads every member), and the outbox
  ``sync.change`` starts empty;
- ``--devices`` devices registered as registration does (the ``sync.device`` row and the
  device queue, no AMQP account, like ``bench/scaleout.py``), each with a real
  ``DeviceAgent`` and its own SQLite file. The agents run in ``--agent-processes``
  processes of their own (this module with ``--serve-devices``), so their event loops
  are not the one that paces the writer and times the changes; each reports, for every
  upsert of every batch it committed, the device, the object, its version and the
  moment (``time.monotonic()``: one clock for every process of the machine);
- ``--workers`` worker processes (``python -m worker``, ``bench/rig.py``) on that model,
  with the default ``SYNC_FOLLOW_INTERVAL`` and no per-device limits (and any
  ``--worker-setting``); one of them leads the feed;
- the **write ceilings** (figures): one-row autocommitted updates as fast as the
  writer's 8 connections go for 3 s, on the followed table (its capture trigger) and on
  a copy of it with the version trigger only; the feed leads, no device holds anything;
- each device holds ``--held`` work orders of its own: one ordinary sync job per device
  through the pipeline, so ``sync.holding`` is written by the workers as in real use;
  the bench waits until every device applied its objects, then for one followed change
  to reach its holder (the feed is leading);
- the **idle fleet** (a figure): the cores each process group uses for 5 s with every
  agent connected and nothing written, the floor under every phase's CPU figures.

A phase at ``rate`` changes/s: for ``--seconds`` s a writer commits updates of random
held work orders (``internal_note`` set to the writer's ``time.time_ns()``), each change
one ``UPDATE`` of one row (so each fires the capture trigger, as an app's separate
updates would), ``--per-transaction`` of them per transaction, transactions due at fixed
times on a pool of 8 connections; a transaction not begun by the end of the phase is not
written, so a writer that falls behind ends on time. The row's new version comes back
with ``RETURNING``; the commit is timed when ``COMMIT`` returns. Each change is applied
on its holder when the device commits a batch holding that object at that version or a
later one (a push reads the latest state, so a later change's push carries the earlier
change too). Then the bench waits up to ``--drain`` s after the last write for every
change to reach every holder; what has not arrived by then counts with the time it
waited (a lower bound) and is counted as unapplied, and the backlog is dropped
(``sync.jobs`` purged, ``sync.change`` emptied) before the next phase, which then
measures itself and not the one before.

Figures per phase (each run is one value; ``--runs`` repeats the phases on the same
fleet):

- p50, p99 of commit → applied over every (change, holding device) pair (target p99 ≤ 1 s);
- sustained changes/s: the changes whose effect reached all their holders by the end of
  the write phase, over the phase's length. Past saturation it counts changes that
  arrived many seconds late, which coalescing makes cheaper (a push refreshes every
  object of the device changed meanwhile), so read it with the latencies and with
  ``within_target_per_s`` (the changes that reached all their holders within 1 s);
- the write rate achieved (changes committed over the time from the first due time to
  the last commit).

Extra per figure: p95 and max, pairs unapplied, the time from the last write until every
change had arrived (``drained_s``, missing when the drain timed out), the batches and
upserts the devices applied; where the backlog forms: the most rows waiting in
``sync.change`` and the age of the oldest, the most jobs in ``sync.jobs`` (sampled twice
a second), and the share of the feed's time spent publishing pushes
(``feed_publishing_share``: its session idle after the routing query) and in the
database (``feed_database_share``), from ``pg_stat_activity`` every 50 ms; and the cores
used by each process group during the write phase (the workers, the agents' processes,
this process with the writer, RabbitMQ and PostgreSQL of these services, the whole
machine, and ``cpu_other``: what else ran on it).

A rate of 0 in ``--rates`` means half the sustained figure of the same run's first phase
(at least 50/s), as the pipeline's half-capacity latency does; past saturation that is
still above what the system keeps up with (see above), hence the fixed lower rates by
default. With ``--profile DIR`` py-spy samples every worker process, one agent process
and this one during each phase's writes, and the top functions are printed after the
figures (``bench/report.py``'s ``profile_summary``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from bench.report import Figure, as_details, as_table, profile_summary, progress
from bench.rig import (
    _UNLIMITED_DEVICES,
    ROOT,
    USER,
    declare_jobs_topology,
    profiled,
    registered_devices,
    running_workers,
    service_env,
)
from broker import ObjectRef, Session, SyncClient
from broker.connection import connect, open_channel
from broker.models import SyncResult
from broker.topology import (
    JOBS_QUEUE,
)
from device_agent import AgentSettings, DeviceAgent
from device_agent.agent import _Batch
from worker import load_model
from worker.devices import holders_sql
from worker.schema import init_database

__all__ = ["ReportingAgent", "follow", "prepare_followed", "serve_devices"]

MODEL = Path(__file__).with_name("follow_model.yaml")
ENTITY = "WorkOrder"
TABLE = "follow_work_order"
WRITERS = 8  # the writer's connections
CEILING_SECONDS = 3.0
IDLE_SECONDS = 5.0
SEED_IN_FLIGHT = 128  # seeding jobs awaited at once
STARTING = 16  # agents connecting at once, per agent process
FLUSH = 0.02  # how often an agent process writes what it applied
SAMPLE = 0.5  # how often the backlogs are sampled
FEED_SAMPLE = 0.05  # how often the feed's session is looked at
_OUTBOX = (
    "SELECT count(*), extract(epoch FROM clock_timestamp() - min(captured_at))::float8 "
    "FROM sync.change"
)
# The leading feed's session (its application_name ends in "follow"), not standing by.
_FEED_SESSION = (
    "SELECT state, query FROM pg_stat_activity WHERE application_name LIKE '% follow' "
    "AND query NOT LIKE '%pg_try_advisory_lock%'"
)
_ROUTING = holders_sql("")
MIN_HALF = 50.0
TARGET_P99_MS = 1000.0
LATENCY_FIGURES = (("p50", 0.50), ("p99", 0.99))
SETUP_TIMEOUT = 300.0
CPU_GROUPS = ("workers", "agents", "bench", "rabbitmq", "postgres")


# The device side: agent processes.


class ReportingAgent(DeviceAgent):
    """A ``DeviceAgent`` of an agent process (``serve_devices``), which gives it its
    device's index and the lines to report on stdout (``out``)."""

    index = -1
    out: list[str]


class _TimedAgent(ReportingAgent):
    """A ``DeviceAgent`` that reports each batch it committed (``b``, device index) and
    each upsert in it (``a``, device index, object id, version, ``time.monotonic()`` just
    after the commit and the ack)."""

    def _settled(self, batch: _Batch, outcome: bool, started: float, group: int) -> None:
        super()._settled(batch, outcome, started, group)
        if outcome:
            now = time.monotonic()
            self.out.append(f"b {self.index}\n")
            self.out.extend(
                f"a {self.index} {object_id} {version} {now:.6f}\n"
                for _, object_id, version, _ in batch.rows.upserts
            )


class _StdinClosed(asyncio.Protocol):
    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop.set()


async def _flush(out: list[str], stop: asyncio.Event) -> None:
    while True:
        if out:
            text = "".join(out)
            out.clear()
            sys.stdout.write(text)
            sys.stdout.flush()
        if stop.is_set():
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FLUSH)


async def serve_devices(spec_path: Path, agent_class: type[ReportingAgent] = _TimedAgent) -> None:
    """An agent process: an ``agent_class`` agent per device of the spec file
    (``amqp_url``, ``devices``: [index, device id, SQLite path], and optionally ``urls``:
    device id -> the URL its agent logs in with, instead of ``amqp_url``); prints
    ``ready`` once all are started, then what they report; stops when stdin closes or on
    SIGTERM."""
    spec = json.loads(await asyncio.to_thread(spec_path.read_text))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await loop.connect_read_pipe(lambda: _StdinClosed(stop), sys.stdin)
    out: list[str] = []
    gate = asyncio.Semaphore(STARTING)
    runs: list[asyncio.Task[None]] = []

    async def start(index: int, device_id: str, path: str) -> None:
        async with gate:
            url = spec.get("urls", {}).get(device_id, spec["amqp_url"])
            settings = AgentSettings(amqp_url=url, device_id=device_id, db_path=path)
            agent = await agent_class.start(settings)
        assert isinstance(agent, agent_class)
        agent.index, agent.out = index, out
        runs.append(asyncio.create_task(agent.run(stop)))

    flusher = asyncio.create_task(_flush(out, stop))
    try:
        async with asyncio.TaskGroup() as group:
            for index, device_id, path in spec["devices"]:
                group.create_task(start(index, device_id, path))
        out.append("ready\n")
        await stop.wait()
    finally:
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
        await flusher


@dataclass
class Applied:
    """What the devices applied, from the agent processes' reports."""

    # (device index, object id) -> times and the running maximum of the versions applied
    times: dict[tuple[int, int], list[float]] = field(default_factory=lambda: defaultdict(list))
    versions: dict[tuple[int, int], list[int]] = field(default_factory=lambda: defaultdict(list))
    upserts: int = 0
    batches: int = 0

    def add(self, device: int, object_id: int, version: int, at: float) -> None:
        key = (device, object_id)
        versions = self.versions[key]
        self.times[key].append(at)
        versions.append(max(version, versions[-1]) if versions else version)
        self.upserts += 1

    def latest(self, device: int, object_id: int) -> int:
        versions = self.versions.get((device, object_id))
        return versions[-1] if versions else 0

    def when(self, device: int, object_id: int, version: int) -> float | None:
        """When the device first held the object at ``version`` or later."""
        versions = self.versions.get((device, object_id))
        if not versions or versions[-1] < version:
            return None
        return self.times[device, object_id][bisect.bisect_left(versions, version)]


async def _read_reports(process: asyncio.subprocess.Process, applied: Applied) -> None:
    assert process.stdout is not None
    async for line in process.stdout:
        parts = line.split()
        if len(parts) == 5 and parts[0] == b"a":
            applied.add(int(parts[1]), int(parts[2]), int(parts[3]), float(parts[4]))
        elif parts and parts[0] == b"b":
            applied.batches += 1


@asynccontextmanager
async def _agent_processes(
    env: dict[str, str], devices: Sequence[str], folder: Path, count: int, applied: Applied
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """``count`` agent processes sharing ``devices`` (index -> id), started and ready."""
    processes: list[asyncio.subprocess.Process] = []
    readers: list[asyncio.Task[None]] = []
    try:
        for n in range(count):
            spec = folder / f"agents-{n}.json"
            mine = [[i, d, str(folder / f"{d}.sqlite")] for i, d in enumerate(devices)][n::count]
            spec.write_text(json.dumps({"amqp_url": env["SYNC_AMQP_URL"], "devices": mine}))
            with (folder / f"agents-{n}.log").open("wb") as log:
                process = await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "bench.follow", "--serve-devices", str(spec)),
                    env={**os.environ, **env},
                    cwd=ROOT,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                )
            processes.append(process)
        for process in processes:
            assert process.stdout is not None
            async with asyncio.timeout(SETUP_TIMEOUT):
                line = await process.stdout.readline()
            if line != b"ready\n":
                raise RuntimeError(f"agent process {process.pid} failed; logs in {folder}")
            readers.append(asyncio.create_task(_read_reports(process, applied)))
        yield processes
    finally:
        for process in processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in processes:
            try:
                async with asyncio.timeout(60):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        await asyncio.gather(*readers, return_exceptions=True)


# The server side: database, devices, holdings.


async def prepare_followed(database_url: str, objects: int) -> list[int]:
    """The follow model's tables with their capture, ``objects`` fresh work orders, an
    empty outbox; ``USER`` a Dispatcher. Returns the work orders' ids."""
    conn = await asyncpg.connect(database_url)
    try:
        await init_database(conn, await load_model(MODEL), create_tables=True)
        await conn.execute(f"TRUNCATE {TABLE} RESTART IDENTITY")
        await conn.execute("DELETE FROM sync.user_role WHERE user_id = $1", USER)
        await conn.execute("INSERT INTO sync.user_role VALUES ($1, 'Dispatcher')", USER)
        rows = await conn.fetch(
            f"INSERT INTO {TABLE} (title, status, amount, internal_note) "
            "SELECT 'order ' || g, 'Open', g, '' FROM generate_series(1, $1) g RETURNING id",
            objects,
        )
        await _drop_backlog(conn)
    finally:
        await conn.close()
    return [row["id"] for row in rows]


async def _drop_backlog(conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM sync.change")
    await conn.execute("UPDATE sync.follow_state SET overflowed_at = NULL")


@dataclass
class Fleet:
    """The devices, what each holds, and what they applied."""

    devices: list[str]
    held: list[list[int]]  # by device index
    holders: dict[int, list[int]]  # object id -> device indexes
    applied: Applied
    worker_pids: list[int] = field(default_factory=list)
    agent_pids: list[int] = field(default_factory=list)

    async def wait(self, need: dict[int, int], deadline: float) -> bool:
        """Until every holder of each object of ``need`` applied it at that version or
        later (``True``), or ``deadline`` (``time.monotonic()``) passed (``False``)."""
        pending = [(d, o, v) for o, v in need.items() for d in self.holders[o]]
        while True:
            pending = [(d, o, v) for d, o, v in pending if self.applied.latest(d, o) < v]
            if not pending:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)


async def _seed_holdings(client: SyncClient, fleet: Fleet) -> None:
    """One ordinary sync job per device for its objects; then until every device applied
    them."""
    gate = asyncio.Semaphore(SEED_IN_FLIGHT)

    async def one(index: int) -> SyncResult:
        async with gate:
            return await client.synchronize_to_device(
                Session(user_id=USER, device_id=fleet.devices[index]),
                objects=[ObjectRef(ENTITY, i) for i in fleet.held[index]],
                timeout=SETUP_TIMEOUT,
            )

    results = await asyncio.gather(*(one(n) for n in range(len(fleet.devices))))
    bad = [r for r, held in zip(results, fleet.held, strict=True) if r.synced != len(held)]
    if bad:
        raise RuntimeError(f"{len(bad)} seeding jobs did not sync all, e.g. {bad[0]}")
    need = dict.fromkeys(fleet.holders, 1)
    if not await fleet.wait(need, time.monotonic() + SETUP_TIMEOUT):
        raise RuntimeError("the seeding jobs' batches did not all reach the devices")


async def _warm_up(pool: asyncpg.Pool, fleet: Fleet) -> None:
    """One followed change to its holder: the feed is leading."""
    object_id = next(iter(fleet.holders))
    version = await pool.fetchval(
        f"UPDATE {TABLE} SET internal_note = 'warm-up' WHERE id = $1 RETURNING version", object_id
    )
    if not await fleet.wait({object_id: version}, time.monotonic() + 60):
        raise RuntimeError("no followed change reached its device within 60 s")


# The writer.


@dataclass(frozen=True, slots=True)
class Change:
    object_id: int
    version: int
    due: float
    committed: float


@dataclass(frozen=True)
class Writes:
    changes: list[Change]
    start: float
    end: float  # when the writes were due to end; none starts later

    @property
    def rate(self) -> float:
        """Changes committed per second, from the first due time to the last commit."""
        if not self.changes:
            return 0.0
        return len(self.changes) / (max(c.committed for c in self.changes) - self.start)


async def _write(
    pool: asyncpg.Pool,
    ids: Sequence[int],
    rate: float,
    seconds: float,
    *,
    per_transaction: int,
    table: str = TABLE,
) -> Writes:
    """Changes at ``rate`` per second (``inf``: as fast as the connections go) for
    ``seconds``, ``per_transaction`` one-row updates per transaction, each its own
    statement (so each fires the capture trigger, as an app's separate updates would),
    on ``WRITERS`` connections. Transactions are due at fixed times; one not begun by
    the end is not written, so a writer that falls behind ends on time."""
    rng = random.Random(len(ids))
    start = time.monotonic() + 0.05
    end = start + seconds
    interval = per_transaction / rate
    transactions = int(rate * seconds) // per_transaction if rate != math.inf else sys.maxsize
    numbers = itertools.count()
    changes: list[Change] = []
    statement = f"UPDATE {table} SET internal_note = $2 WHERE id = $1 RETURNING version"

    async def connection() -> None:
        async with pool.acquire() as conn:
            while (number := next(numbers)) < transactions:
                due = start + number * interval
                if due - time.monotonic() > 0:
                    await asyncio.sleep(due - time.monotonic())
                if time.monotonic() >= end:
                    return
                objects = [rng.choice(ids) for _ in range(per_transaction)]
                marker = str(time.time_ns())
                if per_transaction == 1:
                    versions = [await conn.fetchval(statement, objects[0], marker)]
                else:
                    async with conn.transaction():
                        versions = [await conn.fetchval(statement, o, marker) for o in objects]
                committed = time.monotonic()
                changes.extend(
                    Change(o, v, due, committed) for o, v in zip(objects, versions, strict=True)
                )

    await asyncio.gather(*(connection() for _ in range(WRITERS)))
    return Writes(changes, start, end)


async def _write_ceilings(pool: asyncpg.Pool, ids: Sequence[int]) -> dict[str, float]:
    """One-row autocommitted updates per second, as fast as ``WRITERS`` connections go:
    on the followed table (the capture trigger) and on a copy without it."""
    plain = f"{TABLE}_uncaptured"
    await pool.execute(f"DROP TABLE IF EXISTS {plain}")
    await pool.execute(f"CREATE TABLE {plain} (LIKE {TABLE} INCLUDING ALL)")
    try:
        await pool.execute(f"INSERT INTO {plain} SELECT * FROM {TABLE}")
        await pool.execute(
            f"CREATE TRIGGER sync_version BEFORE INSERT OR UPDATE ON {plain} "
            "FOR EACH ROW EXECUTE FUNCTION sync.bump_version()"
        )
        ceilings = {}
        for name, table in (("captured", TABLE), ("uncaptured", plain)):
            writes = await _write(
                pool, ids, math.inf, CEILING_SECONDS, per_transaction=1, table=table
            )
            ceilings[name] = writes.rate
    finally:
        await pool.execute(f"DROP TABLE IF EXISTS {plain}")
    return ceilings


# Sampling: backlogs and CPU.


@asynccontextmanager
async def _backlogs(
    pool: asyncpg.Pool, connection: AbstractRobustConnection
) -> AsyncIterator[dict[str, list[float]]]:
    """Samples, while in the block: the rows waiting in ``sync.change`` and the age of the
    oldest (``SAMPLE``), the jobs in ``sync.jobs`` (``SAMPLE``), and what the feed's
    session is doing (``FEED_SAMPLE``): 1.0 in ``publishing`` when it is idle after the
    routing query (``worker.impact``'s holders statement: the feed is building and
    publishing the pushes, waiting for the broker's confirms), in ``database`` when a
    statement of it runs or its transaction is open."""
    samples: dict[str, list[float]] = {
        "outbox": [],
        "outbox_age": [],
        "jobs": [],
        "publishing": [],
        "database": [],
    }

    stop = asyncio.Event()
    channel = await open_channel(connection)
    underlay = await channel.get_underlay_channel()

    async def backlog() -> None:
        while not stop.is_set():
            rows, age = await pool.fetchrow(_OUTBOX)
            samples["outbox"].append(rows)
            samples["outbox_age"].append(age or 0.0)
            declared = await underlay.queue_declare(JOBS_QUEUE.name, passive=True)
            samples["jobs"].append(declared.message_count or 0)
            await _pause(stop, SAMPLE)

    async def feed() -> None:
        while not stop.is_set():
            for state, query in await pool.fetch(_FEED_SESSION):
                samples["publishing"].append(state == "idle" and query.startswith(_ROUTING))
                samples["database"].append(state != "idle")
            await _pause(stop, FEED_SAMPLE)

    # Stopped by an event, not cancelled: a cancellation that lands in asyncpg's pool or
    # aio-pika can be swallowed, and the block would then never end.
    samplers = {asyncio.create_task(backlog()), asyncio.create_task(feed())}
    try:
        yield samples
    finally:
        stop.set()
        _, late = await asyncio.wait(samplers, timeout=10)
        for sampler in late:
            sampler.cancel()
        await channel.close()


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


Ticks = dict[int | str, tuple[str, int]]


def _postmaster() -> int:
    pid_file = ROOT / ".services" / "postgres" / "data" / "postmaster.pid"
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def _group(pid: int, stat: str, fleet: Fleet, postmaster: int) -> str | None:
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    parent = int(stat[stat.rindex(")") + 2 :].split()[1])
    if pid in fleet.worker_pids:
        return "workers"
    if pid in fleet.agent_pids:
        return "agents"
    if pid == os.getpid():
        return "bench"
    if comm == "postgres" and postmaster in (pid, parent):
        return "postgres"
    if comm == "beam.smp":
        # This checkout's broker only: the machine is shared with other services.
        with suppress(OSError):
            if str(ROOT / ".services").encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return "rabbitmq"
    return None


def _cpu_ticks(fleet: Fleet) -> Ticks:
    """CPU ticks used so far by each process of interest, and by the machine (``busy``)."""
    ticks: Ticks = {}
    postmaster = _postmaster()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        group = _group(int(entry.name), stat, fleet, postmaster)
        if group:
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks[int(entry.name)] = (group, int(fields[11]) + int(fields[12]))
    with open("/proc/stat") as stat_file:
        machine = [int(value) for value in stat_file.readline().split()[1:]]
    ticks["busy"] = ("busy", sum(machine) - machine[3] - machine[4])
    return ticks


def _cores(before: Ticks, after: Ticks, elapsed: float) -> dict[str, float]:
    used = dict.fromkeys((*CPU_GROUPS, "busy"), 0.0)
    for key, (group, ticks) in after.items():
        used[group] += ticks - before.get(key, (group, 0))[1]
    tick = os.sysconf("SC_CLK_TCK")
    cores = {f"cpu_{group}": value / tick / elapsed for group, value in used.items()}
    cores["cpu_other"] = cores["cpu_busy"] - sum(cores[f"cpu_{g}"] for g in CPU_GROUPS)
    return cores


# One phase.


@dataclass(frozen=True)
class Phase:
    rate: float  # offered
    latencies: list[float]  # ms, sorted, one per (change, holder)
    sustained: float
    write_rate: float
    extra: dict[str, float]


def _percentile(values: Sequence[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))]


@dataclass(frozen=True)
class Measured:
    latencies: list[float]  # ms, sorted, one per (change, holder)
    unapplied: int  # (change, holder) pairs not applied when the wait ended
    sustained: float  # changes/s that reached all their holders by the end of the writes
    within_target: float  # changes/s that reached all their holders within the target


def _measure(fleet: Fleet, writes: Writes, waited_until: float) -> Measured:
    latencies: list[float] = []
    unapplied = reached = within = 0
    for change in writes.changes:
        last = 0.0
        for device in fleet.holders[change.object_id]:
            at = fleet.applied.when(device, change.object_id, change.version)
            if at is None:
                unapplied += 1
                at = waited_until
            latencies.append((at - change.committed) * 1000)
            last = max(last, at)
        reached += last <= writes.end
        within += (last - change.committed) * 1000 <= TARGET_P99_MS
    seconds = writes.end - writes.start
    return Measured(sorted(latencies), unapplied, reached / seconds, within / seconds)


async def _phase(context: Context, rate: float, seconds: float, drain: float, name: str) -> Phase:
    fleet = context.fleet
    upserts, batches = fleet.applied.upserts, fleet.applied.batches
    pids = {"bench": os.getpid(), "agents0": fleet.agent_pids[0]}
    pids.update({f"worker{n}": pid for n, pid in enumerate(fleet.worker_pids)})
    async with _backlogs(context.monitor, context.connection) as backlogs:
        before = _cpu_ticks(fleet)
        async with profiled(context.profile, name, pids):
            writes = await _write(
                context.pool, context.ids, rate, seconds, per_transaction=context.per_transaction
            )
        cores = _cores(before, _cpu_ticks(fleet), time.monotonic() - writes.start)
    need: dict[int, int] = {}
    for change in writes.changes:
        need[change.object_id] = max(need.get(change.object_id, 0), change.version)
    written = time.monotonic()
    drained = await fleet.wait(need, written + drain)
    waited_until = time.monotonic()
    measured = _measure(fleet, writes, waited_until)
    latencies = measured.latencies
    extra = {
        "offered_changes_per_s": rate,
        "changes": float(len(writes.changes)),
        "unapplied_pairs": float(measured.unapplied),
        "within_target_per_s": measured.within_target,
        "p95_ms": _percentile(latencies, 0.95),
        "max_ms": latencies[-1],
        "writer_late_p99_ms": _percentile(
            sorted((c.committed - c.due) * 1000 for c in writes.changes), 0.99
        ),
        "batches_applied": float(fleet.applied.batches - batches),
        "upserts_applied": float(fleet.applied.upserts - upserts),
        "outbox_max": max(backlogs["outbox"], default=0.0),
        "outbox_oldest_max_s": max(backlogs["outbox_age"], default=0.0),
        "jobs_queue_max": max(backlogs["jobs"], default=0.0),
        "feed_publishing_share": statistics.fmean(backlogs["publishing"] or [0.0]),
        "feed_database_share": statistics.fmean(backlogs["database"] or [0.0]),
        **cores,
    }
    if drained:
        extra["drained_s"] = waited_until - written
    else:
        await _clear(context)
    return Phase(rate, latencies, measured.sustained, writes.rate, extra)


async def _clear(context: Context) -> None:
    """Drop a backlog the drain did not clear, so the next phase measures itself."""
    progress("follow: drain timed out; dropping the backlog (outbox and sync.jobs)")
    async with context.pool.acquire() as conn:
        await _drop_backlog(conn)
    channel = await open_channel(context.connection)
    try:
        await (await channel.get_queue(JOBS_QUEUE.name)).purge()
    finally:
        await channel.close()
    await asyncio.sleep(3)


@dataclass
class Context:
    fleet: Fleet
    ids: list[int]
    pool: asyncpg.Pool  # the writer's
    monitor: asyncpg.Pool  # the samplers'
    connection: AbstractRobustConnection
    profile: Path | None
    per_transaction: int
    # one-row autocommitted updates/s: on the followed table, and on a copy without capture
    ceilings: dict[str, float] = field(default_factory=dict)
    # cores used per process group with the fleet connected and nothing written
    idle: dict[str, float] = field(default_factory=dict)


# The part.


@asynccontextmanager
async def _context(
    env: dict[str, str],
    *,
    devices: int,
    held: int,
    workers: int,
    agent_processes: int,
    per_transaction: int,
    worker_settings: dict[str, str],
    profile: Path | None,
) -> AsyncIterator[Context]:
    """Everything a phase needs, set up as the module's docstring says; torn down after."""
    await declare_jobs_topology(env["SYNC_AMQP_URL"])
    ids = await prepare_followed(env["SYNC_DATABASE_URL"], devices * held)
    prefix = f"follow-{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}-{n:04d}" for n in range(devices)]
    fleet = Fleet(
        names,
        [ids[n * held : (n + 1) * held] for n in range(devices)],
        {ids[n * held + k]: [n] for n in range(devices) for k in range(held)},
        Applied(),
    )
    folder = Path(tempfile.mkdtemp(prefix="bench-follow-"))
    try:
        async with AsyncExitStack() as stack:
            started = time.monotonic()
            await stack.enter_async_context(registered_devices(env, USER, names))
            agents = await stack.enter_async_context(
                _agent_processes(env, names, folder, agent_processes, fleet.applied)
            )
            fleet.agent_pids = [process.pid for process in agents]
            progress(f"follow: {devices} devices with agents in {time.monotonic() - started:.0f} s")
            processes = await stack.enter_async_context(
                running_workers(
                    env,
                    workers,
                    folder,
                    "follow",
                    **{"model": str(MODEL), **_UNLIMITED_DEVICES, **worker_settings},
                )
            )
            fleet.worker_pids = [process.pid for process in processes]
            pool = await asyncpg.create_pool(
                env["SYNC_DATABASE_URL"], min_size=WRITERS, max_size=WRITERS
            )
            stack.push_async_callback(pool.close)
            # Before any device holds anything: the feed leads, but routes to no one.
            ceilings = await _write_ceilings(pool, ids)
            progress(
                "follow: one-row transactions, as fast as they go: "
                + ", ".join(f"{name} {value:,.0f}/s" for name, value in ceilings.items())
            )
            client = await stack.enter_async_context(
                await SyncClient.connect(env["SYNC_AMQP_URL"], name="bench-follow")
            )
            started = time.monotonic()
            await _seed_holdings(client, fleet)
            progress(
                f"follow: {devices * held:,} holdings seeded by sync jobs in "
                f"{time.monotonic() - started:.0f} s"
            )
            monitor = await asyncpg.create_pool(env["SYNC_DATABASE_URL"], min_size=2, max_size=2)
            stack.push_async_callback(monitor.close)
            connection = await connect(env["SYNC_AMQP_URL"], "bench-follow-sampler")
            stack.push_async_callback(connection.close)
            await _warm_up(pool, fleet)
            idle = await _idle_cores(fleet)
            progress(
                f"follow: the fleet idle for {IDLE_SECONDS:g} s: "
                + ", ".join(f"{k} {v:.2f}" for k, v in idle.items())
            )
            yield Context(
                fleet, ids, pool, monitor, connection, profile, per_transaction, ceilings, idle
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _phase_figures(label: str, runs: Sequence[Phase], setup: str) -> list[Figure]:
    rates = ", ".join(f"{phase.rate:,.0f}" for phase in runs)
    note = f"{setup}; offered {rates} changes/s"
    extra = {key: statistics.median(p.extra.get(key, 0.0) for p in runs) for key in runs[0].extra}
    timed_out = sum("drained_s" not in p.extra for p in runs)
    if timed_out:
        note += f"; the drain timed out in {timed_out} of {len(runs)} run(s)"
        extra.pop("drained_s", None)
    write_name = f"follow at {label}: write rate achieved"
    figures = []
    for name, fraction in LATENCY_FIGURES:
        values = tuple(_percentile(p.latencies, fraction) for p in runs)
        figure_extra = {**extra, "target_p99_ms": TARGET_P99_MS}
        if name == "p99":
            figure_extra["meets_target"] = float(statistics.median(values) <= TARGET_P99_MS)
        figures.append(
            Figure(
                f"follow at {label}: commit to applied, {name}",
                "ms",
                values,
                higher_is_better=False,
                note=note,
                extra=figure_extra,
            )
        )
    figures.append(
        Figure(
            f"follow at {label}: sustained",
            "changes/s",
            tuple(p.sustained for p in runs),
            note=f"{note}; changes that reached all their holders by the end of the writes",
            extra=extra,
            baseline=write_name,
        )
    )
    figures.append(
        Figure(write_name, "changes/s", tuple(p.write_rate for p in runs), kind="info", note=note)
    )
    return figures


async def _idle_cores(fleet: Fleet) -> dict[str, float]:
    before, started = _cpu_ticks(fleet), time.monotonic()
    await asyncio.sleep(IDLE_SECONDS)
    return _cores(before, _cpu_ticks(fleet), time.monotonic() - started)


def _idle_figure(idle: dict[str, float], setup: str) -> Figure:
    ours = idle["cpu_busy"] - idle["cpu_other"]
    return Figure(
        "follow: cores used by the idle fleet (nothing written)",
        "cores",
        (ours,),
        kind="info",
        higher_is_better=False,
        note=f"{setup}; {IDLE_SECONDS:g} s after the warm-up, this checkout's processes",
        extra=idle,
    )


def _ceiling_figures(ceilings: dict[str, float]) -> list[Figure]:
    note = (
        f"one-row autocommitted updates on {WRITERS} connections, as fast as they go, for "
        f"{CEILING_SECONDS:g} s, with the workers running and no device holding anything"
    )
    uncaptured = "follow: write ceiling, table without capture"
    return [
        Figure(
            "follow: write ceiling, followed table (capture trigger)",
            "changes/s",
            (ceilings["captured"],),
            kind="ceiling",
            note=note,
            baseline=uncaptured,
        ),
        Figure(
            uncaptured,
            "changes/s",
            (ceilings["uncaptured"],),
            kind="ceiling",
            note=f"{note}; a copy of the table with the version trigger only",
        ),
    ]


def _label(rate: float) -> str:
    return f"{rate:,.0f} changes/s" if rate else "half sustained"


async def follow(
    env: dict[str, str],
    *,
    rates: Sequence[float] = (1000.0, 100.0, 50.0),
    seconds: float = 20.0,
    drain: float = 30.0,
    devices: int = 1000,
    held: int = 5,
    workers: int = 2,
    agent_processes: int = 4,
    per_transaction: int = 5,
    worker_settings: dict[str, str] | None = None,
    runs: int = 1,
    profile: Path | None = None,
) -> list[Figure]:
    """p50/p99 commit → applied on every holder and the changes/s sustained, per rate of
    ``rates`` (0: half the first rate's sustained figure), ``runs`` times on one fleet;
    and the write ceilings."""
    phases: dict[str, list[Phase]] = {_label(rate): [] for rate in rates}
    async with _context(
        env,
        devices=devices,
        held=held,
        workers=workers,
        agent_processes=agent_processes,
        per_transaction=per_transaction,
        worker_settings=worker_settings or {},
        profile=profile,
    ) as context:
        for run in range(1, runs + 1):
            first: Phase | None = None
            for rate in rates:
                offered = rate or max(MIN_HALF, (first.sustained if first else 0.0) / 2)
                progress(f"follow run {run}/{runs}: {offered:,.0f} changes/s for {seconds:g} s")
                phase = await _phase(context, offered, seconds, drain, f"r{offered:.0f}-{run}")
                first = first or phase
                phases[_label(rate)].append(phase)
                progress(
                    f"follow: p50 {_percentile(phase.latencies, 0.5):,.0f} ms, p99 "
                    f"{_percentile(phase.latencies, 0.99):,.0f} ms, sustained "
                    f"{phase.sustained:,.0f}/s, written {phase.write_rate:,.0f}/s; "
                    + ", ".join(f"{k} {v:,.2f}" for k, v in phase.extra.items())
                )
    setup = (
        f"{devices} devices holding {held} work orders each (agents in {agent_processes} "
        f"processes), {workers} worker process(es); {per_transaction} one-row updates "
        f"per transaction on {WRITERS} connections"
    )
    if worker_settings:
        setup += "; workers with " + ", ".join(f"{k}={v}" for k, v in worker_settings.items())
    figures = [f for label, runs_ in phases.items() for f in _phase_figures(label, runs_, setup)]
    return [*figures, _idle_figure(context.idle, setup), *_ceiling_figures(context.ceilings)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", type=float, nargs="+", default=[1000.0, 100.0, 50.0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--drain", type=float, default=30.0)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--held", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--agent-processes", type=int, default=4)
    parser.add_argument("--per-transaction", type=int, default=5)
    parser.add_argument(
        "--worker-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a WorkerSettings field for the workers, e.g. confirm_window=512 (repeatable)",
    )
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile", type=Path, help="folder for py-spy's raw stacks")
    parser.add_argument("--serve-devices", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_devices is not None:
        asyncio.run(serve_devices(args.serve_devices))
        return
    started = time.monotonic()
    figures = asyncio.run(
        follow(
            service_env(),
            rates=args.rates,
            seconds=args.seconds,
            drain=args.drain,
            devices=args.devices,
            held=args.held,
            workers=args.workers,
            agent_processes=args.agent_processes,
            per_transaction=args.per_transaction,
            worker_settings=dict(item.split("=", 1) for item in args.worker_setting),
            runs=args.runs,
            profile=args.profile,
        )
    )
    print(as_table(figures))
    print(as_details(figures))
    print(f"(ran {time.monotonic() - started:.0f} s)")
    if args.profile is not None:
        print(profile_summary(args.profile))


if __name__ == "__main__":
    main()
