"""Scale-out: sync jobs/s with 1, 2 and 4 worker processes, in three modes.

    .venv/bin/python -m bench.scaleout [--modes plain devices bound] [--workers 1 2 4]
                                       [--jobs N] [--delay-ms 20] [--runs 1] [--seed 1]

Modes (figure names ``<mode>: N worker(s)``; every mode runs every check below):

- ``plain`` (``scale-out``): 20 devices, 1,000 jobs per worker count (2,000 before the
  other modes came; halved to keep the part short), workers with
  prefetch 16 straight on PostgreSQL. Target (SPEC §11): 4 workers never slower than one,
  read as ≥ 0.95x the 1-worker figure (the noise of this shared machine).
- ``devices`` (``scale-out (1000 devices)``): the same stream over 1,000 devices, each
  with its own in-process agent (1,000 AMQP connections, about 400 MB peak RSS in this
  process and 30 s to start them on this machine, 16 at once). 600 jobs (fewer than in
  ``plain``: these passes run at about 60 jobs/s and the fleet's start-up counts too), so
  the jobs spread over most of the devices, one or two each. Same target.
- ``bound`` (``scale-out (worker-bound)``): 20 devices, 300 jobs, and the workers reach
  PostgreSQL through ``bench.pgproxy`` delaying each client-to-server chunk by
  ``--delay-ms`` (20 ms: every round trip costs at least that), with prefetch 2. A job
  makes five or six round trips, so one worker does about 2 / (6 x 20 ms) ≈ 16 jobs/s,
  well below what the machine does (about 60-100 jobs/s of these jobs on the two shared
  cores). With 5 ms one worker did 32 jobs/s and four 57 (1.8x, the machine's limit);
  prefetch 16 would hide the delay the same way. Target: 4 workers ≥ 3x one worker.

The job counts are what keeps the whole part within about 4 minutes here (``--jobs``
sets one count for every mode); each figure's ``extra`` has its ratio to the 1-worker
figure of the same mode (``ratio_to_1_worker``), the target (``target_ratio``, on the
4-worker figure ``meets_target`` 1 or 0 too).

Set-up: seeds 20,000 work orders (``seed_work_orders``, which truncates ``work_order``
and makes ``USER`` a Dispatcher); registers each mode's devices as registration does
(the ``sync.device`` row and the device queue, ``declare_device_queue``) but without
their AMQP accounts: the in-process agents log in with the operator URL, and creating
1,000 accounts through the management API takes minutes of this process's CPU. One
``DeviceAgent`` per device, each with its own SQLite file; the agents' ``on_applied``
hook says when each batch is committed. The 20 devices serve ``plain`` and ``bound``.

Per worker count N: purges ``sync.jobs`` (with a warning when some other consumer is
attached to it: its jobs would be ours and its CPU would skew the figure), starts N
``python -m worker`` processes (batches of 5 objects, so that a job makes one to four
batches and the ordering check has something to check), warms up with one job on each
of up to 20 devices, then publishes the jobs with up to 256 results awaited at once. Each
job names 1-20 random work orders for a random device; after every 10th job, the titles
of 3 random work orders change in PostgreSQL. The figure runs from the first publish
until every result is back and every batch of every result is applied on its device.
Then, untimed: the titles of 50 objects sent in this pass change, and a sweep job per
device names each object whose last update may have come after every job that named it
for that device was published (so the device may rightly hold an older state); then:

- no loss: every result is ``done`` and synced all it named; every object named is on its
  device;
- no duplicate effect: per device, the rows added to ``applied_batches`` are exactly the
  distinct batch ids of the device's results;
- no reordering: per device, in ``applied_batches`` rowid order (the order of
  application), the batches of one job are contiguous; and every object sent to a device
  during this pass has PostgreSQL's current version and title there (a job published
  after an object's last update read it after that update, and so did the latest-reading
  job naming it).

A violated check raises, naming it; the checks passed are in each figure's note. The
workers get SIGTERM and are waited for after each N. CPU use of the workers, this process
(client, agents and the proxy), RabbitMQ and PostgreSQL during the timed span is in each
figure's ``extra`` (in cores), with the mean number of jobs waiting for a device's
advisory lock (``pg_locks``; 0 for a worker that takes no such lock), so what bounds the
scaling shows. Owns the local services while it runs, like the other benches.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench.pgproxy import delaying_proxy
from bench.report import Figure, as_details, as_table, progress
from bench.rig import (
    USER,
    AppliedBatches,
    declare_jobs_topology,
    in_process_agents,
    registered_devices,
    running_workers,
    seed_work_orders,
    service_env,
)
from broker import ObjectRef, Session, SyncClient
from broker.connection import connect, open_channel
from broker.models import SyncResult
from broker.topology import JOBS_QUEUE

__all__ = ["MODES", "Mode", "scaleout"]

ENTITY = "WorkOrder"
SEEDED = 20_000
BATCH_SIZE = 5
IN_FLIGHT = 256  # results awaited at once: well above 4 workers x prefetch 16
MAX_NAMED = 20
UPDATE_EVERY = 10  # jobs published between two title updates
UPDATED = 3  # work orders per update
FINAL_UPDATES = 50  # work orders updated before the sweep
WARM_UP = 20  # devices with a warm-up job per pass
TIMEOUT = 600.0
ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "scripts" / "services.sh"
CPU_GROUPS = ("workers", "bench", "rabbitmq", "postgres")


@dataclass(frozen=True)
class Mode:
    label: str  # the figures' names: f"{label}: N worker(s)"
    devices: int
    jobs: int
    prefetch: int
    delay_ms: float  # per client-to-server chunk on the workers' PostgreSQL link; 0: none
    target: float  # the 4-worker figure over the 1-worker one, at least


MODES = {
    "plain": Mode("scale-out", devices=20, jobs=1000, prefetch=16, delay_ms=0, target=0.95),
    "devices": Mode(
        "scale-out (1000 devices)", devices=1000, jobs=600, prefetch=16, delay_ms=0, target=0.95
    ),
    "bound": Mode(
        "scale-out (worker-bound)", devices=20, jobs=300, prefetch=2, delay_ms=20, target=3.0
    ),
}


@dataclass
class Device:
    device_id: str
    path: Path
    session: Session
    # object id -> perf_counter() when the last job naming it was published, this pass
    sent: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    device: Device
    named: tuple[int, ...]
    published: float  # perf_counter() just before the publish
    result: SyncResult


@dataclass(frozen=True)
class Pass:
    """One worker count, one run."""

    jobs_per_s: float
    objects_per_s: float
    # Cores used during the timed span per group ("busy": the machine), the mean number
    # of jobs waiting for their device's lock, seconds until the last result and until
    # the last batch applied.
    extra: dict[str, float]
    note: str


@dataclass
class Fleet:
    devices: list[Device]
    applied: AppliedBatches


@dataclass
class Updates:
    """The bench's own title updates: when each object was last updated (after commit)."""

    conn: asyncpg.Connection
    last: dict[int, float] = field(default_factory=dict)

    async def update(self, ids: Sequence[int], revision: int) -> None:
        await self.conn.execute(
            "UPDATE work_order SET title = 'order ' || id || ' rev ' || $2::int WHERE id = ANY($1)",
            list(ids),
            revision,
        )
        now = time.perf_counter()
        for object_id in ids:
            self.last[object_id] = now


# The broker and the worker processes.


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["bash", str(SERVICES), "rabbitmqctl", "-q", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


async def _jobs_consumers() -> int:
    listing = await asyncio.to_thread(_rabbitmqctl, "list_consumers", "queue_name")
    return sum(1 for line in listing.splitlines() if line.strip() == JOBS_QUEUE.name)


async def _purge_jobs(amqp_url: str) -> None:
    connection = await connect(amqp_url, "bench-scaleout-purge")
    try:
        channel = await open_channel(connection)
        queue = await channel.get_queue(JOBS_QUEUE.name, ensure=True)
        await queue.purge()
    finally:
        await connection.close()


@asynccontextmanager
async def _database_url(database_url: str, delay_ms: float) -> AsyncIterator[str]:
    """``database_url``, or the same through a delaying proxy."""
    if not delay_ms:
        yield database_url
        return
    parts = urlsplit(database_url)
    async with delaying_proxy(parts.port or 5432, delay_ms=delay_ms) as port:
        netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
        yield urlunsplit(parts._replace(netloc=netloc))


# The devices.


@asynccontextmanager
async def _fleet(env: dict[str, str], count: int, folder: Path) -> AsyncIterator[Fleet]:
    """``count`` registered devices, each with a running in-process agent; all gone after."""
    prefix = f"bench-scaleout-{uuid.uuid4().hex[:6]}"
    devices = [
        Device(d, folder / f"{d}.sqlite", Session(user_id=USER, device_id=d))
        for d in (f"{prefix}-{n:04d}" for n in range(count))
    ]
    applied = AppliedBatches()
    started = time.perf_counter()
    async with (
        registered_devices(env, USER, [d.device_id for d in devices]),
        in_process_agents(env["SYNC_AMQP_URL"], {d.device_id: d.path for d in devices}, applied),
    ):
        progress(f"scale-out: {count} devices with agents in {time.perf_counter() - started:.0f} s")
        yield Fleet(devices, applied)


def _read_device(path: Path, mark: int) -> tuple[list[tuple[str, str]], dict[int, tuple[int, str]]]:
    """(batch id, job id) of the batches applied after rowid ``mark``, in application
    order; and the version and title of every work order on the device."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        applied = db.execute(
            "SELECT batch_id, job_id FROM applied_batches WHERE rowid > ? ORDER BY rowid", (mark,)
        ).fetchall()
        state = db.execute(
            "SELECT id, version, json_extract(data, '$.title') FROM objects WHERE entity = ?",
            (ENTITY,),
        ).fetchall()
    finally:
        db.close()
    return [(str(b), str(j)) for b, j in applied], {int(i): (int(v), str(t)) for i, v, t in state}


def _marks(devices: Sequence[Device]) -> dict[str, int]:
    """Per device, the last rowid of ``applied_batches``: rows after it were applied later."""
    marks = {}
    for device in devices:
        db = sqlite3.connect(f"file:{device.path}?mode=ro", uri=True)
        try:
            marks[device.device_id] = int(
                db.execute("SELECT coalesce(max(rowid), 0) FROM applied_batches").fetchone()[0]
            )
        finally:
            db.close()
    return marks


# Publishing.


async def _job(client: SyncClient, device: Device, named: Sequence[int]) -> Job:
    published = time.perf_counter()
    result = await client.synchronize_to_device(
        device.session, objects=[ObjectRef(ENTITY, i) for i in named], timeout=TIMEOUT
    )
    return Job(device, tuple(named), published, result)


def _record(jobs: Iterable[Job]) -> None:
    """Each device's ``sent``: when the last job naming each object was published."""
    for job in jobs:
        for object_id in job.named:
            known = job.device.sent.get(object_id, 0.0)
            job.device.sent[object_id] = max(known, job.published)


async def _stream(
    client: SyncClient,
    updates: Updates,
    devices: Sequence[Device],
    ids: Sequence[int],
    count: int,
    rng: random.Random,
) -> list[Job]:
    """``count`` jobs, at most ``IN_FLIGHT`` awaited at once, titles changing meanwhile."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(device: Device, named: list[int]) -> Job:
        try:
            return await _job(client, device, named)
        finally:
            gate.release()

    tasks: list[asyncio.Task[Job]] = []
    async with asyncio.TaskGroup() as group:
        for n in range(1, count + 1):
            await gate.acquire()
            device = rng.choice(devices)
            named = rng.sample(ids, rng.randint(1, MAX_NAMED))
            tasks.append(group.create_task(one(device, named)))
            if n % UPDATE_EVERY == 0:
                await updates.update(rng.sample(ids, UPDATED), n)
    return [task.result() for task in tasks]


# CPU use, from /proc, and the device locks.

Ticks = dict[int | str, tuple[str, int]]  # pid (or "busy") -> (group, CPU ticks so far)


def _cpu_ticks(worker_pids: set[int]) -> Ticks:
    """CPU ticks used so far by each process of interest, and by the machine ("busy")."""
    ticks: Ticks = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        pid, comm = int(entry.name), stat[stat.index("(") + 1 : stat.rindex(")")]
        group = _cpu_group(pid, comm, me, worker_pids)
        if group:
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks[pid] = (group, int(fields[11]) + int(fields[12]))  # utime + stime
    with open("/proc/stat") as stat_file:
        machine = [int(value) for value in stat_file.readline().split()[1:]]
    ticks["busy"] = ("busy", sum(machine) - machine[3] - machine[4])  # but idle and iowait
    return ticks


def _cpu_group(pid: int, comm: str, me: int, worker_pids: set[int]) -> str | None:
    if pid in worker_pids:
        return "workers"
    if pid == me:
        return "bench"
    if comm == "beam.smp":
        return "rabbitmq"
    if comm == "postgres":
        return "postgres"
    return None


def _cores(before: Ticks, after: Ticks, elapsed: float) -> dict[str, float]:
    """Cores used per group between two snapshots; processes that started in between count
    from zero, those that ended in between are missing (short-lived ones, if any)."""
    used = dict.fromkeys((*CPU_GROUPS, "busy"), 0.0)
    for key, (group, ticks) in after.items():
        used[group] += ticks - before.get(key, (group, 0))[1]
    tick = os.sysconf("SC_CLK_TCK")
    cores = {f"cpu_{group}": value / tick / elapsed for group, value in used.items()}
    cores["cpu_other"] = cores["cpu_busy"] - sum(cores[f"cpu_{g}"] for g in CPU_GROUPS)
    return cores


@asynccontextmanager
async def _lock_waits(database_url: str) -> AsyncIterator[list[int]]:
    """Samples, every 0.1 s while in the block, of how many jobs wait for an advisory lock
    (another job of the same device is in hand, for a worker that locks that way)."""
    samples: list[int] = []
    conn = await asyncpg.connect(database_url)

    async def sample() -> None:
        while True:
            samples.append(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
            )
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await conn.close()


# The checks.


def _check_results(jobs: Sequence[Job]) -> list[str]:
    problems = []
    for job in jobs:
        result = job.result
        if result.status != "done" or result.synced != len(set(job.named)):
            problems.append(
                f"job {result.job_id} for {job.device.device_id}: status {result.status} "
                f"({result.reason}), synced {result.synced} of {len(set(job.named))}"
            )
    return problems


def _interleaved(applied: Sequence[tuple[str, str]]) -> list[str]:
    """Jobs whose batches another job's batches came between, in application order."""
    finished: set[str] = set()
    current: str | None = None
    broken: list[str] = []
    for _, job_id in applied:
        if job_id == current:
            continue
        if job_id in finished:
            broken.append(job_id)
        if current is not None:
            finished.add(current)
        current = job_id
    return broken


async def _check_device(
    device: Device, jobs: Sequence[Job], mark: int, latest: dict[int, tuple[int, str]]
) -> list[str]:
    """Loss, duplicate effect and reordering on one device."""
    name = device.device_id
    problems: list[str] = []
    expected = {batch for job in jobs for batch in job.result.batch_ids}
    applied, state = await asyncio.to_thread(_read_device, device.path, mark)
    if len(applied) != len(expected) or {batch for batch, _ in applied} != expected:
        problems.append(
            f"{name}: {len(applied)} batches applied, {len(expected)} distinct in its results"
        )
    interleaved = _interleaved(applied)
    if interleaved:
        problems.append(f"{name}: batches of {len(interleaved)} jobs interleaved with others'")
    missing = device.sent.keys() - state.keys()
    if missing:
        problems.append(f"{name}: {len(missing)} objects named are not on the device")
    stale = sorted(i for i in device.sent if i in state and latest.get(i) != state[i])
    if stale:
        problems.append(
            f"{name}: {len(stale)} objects differ from PostgreSQL, e.g. #{stale[0]}: "
            f"device {state[stale[0]]}, PostgreSQL {latest.get(stale[0])}"
        )
    return problems


async def _latest(conn: asyncpg.Connection, ids: Iterable[int]) -> dict[int, tuple[int, str]]:
    rows = await conn.fetch(
        "SELECT id, version, title FROM work_order WHERE id = ANY($1)", sorted(ids)
    )
    return {int(row["id"]): (int(row["version"]), str(row["title"])) for row in rows}


async def _sweep(
    client: SyncClient, fleet: Fleet, updates: Updates, rng: random.Random
) -> list[Job]:
    """Update ``FINAL_UPDATES`` objects sent in this pass, then one job per device naming
    each object updated after the last publish of a job that named it there."""
    held = sorted(set[int]().union(*(device.sent for device in fleet.devices)))
    await updates.update(rng.sample(held, min(FINAL_UPDATES, len(held))), -1)
    todo = [
        (device, sorted(i for i, at in device.sent.items() if updates.last.get(i, 0.0) >= at))
        for device in fleet.devices
    ]
    sweeps = await asyncio.gather(*(_job(client, device, named) for device, named in todo if named))
    await fleet.applied.wait((b for job in sweeps for b in job.result.batch_ids), TIMEOUT)
    _record(sweeps)
    return sweeps


async def _sweep_and_check(
    client: SyncClient,
    updates: Updates,
    fleet: Fleet,
    jobs: list[Job],
    marks: dict[str, int],
    rng: random.Random,
) -> str:
    """Sweep, then check; the note, or raise."""
    sweeps = await _sweep(client, fleet, updates, rng)
    everything = [*jobs, *sweeps]
    problems = _check_results(everything)
    by_device: dict[str, list[Job]] = {}
    for job in everything:
        by_device.setdefault(job.device.device_id, []).append(job)
    held = set[int]().union(*(device.sent for device in fleet.devices))
    latest = await _latest(updates.conn, held)
    for device in fleet.devices:
        mine = by_device.get(device.device_id, [])
        problems += await _check_device(device, mine, marks[device.device_id], latest)
    if problems:
        shown = "\n  ".join(problems[:20])
        raise AssertionError(f"scale-out checks failed ({len(problems)}):\n  {shown}")
    batches = sum(len(job.result.batch_ids) for job in everything)
    pairs = sum(len(device.sent) for device in fleet.devices)
    return (
        f"checks passed: {len(jobs)} jobs + {len(sweeps)} sweeps done, every named object "
        f"on its device; {batches} batches applied once each, none interleaved; "
        f"{pairs} (device, object) pairs match PostgreSQL after {FINAL_UPDATES} updates "
        "and the sweep"
    )


# One worker count.


async def _warm_up(
    client: SyncClient, fleet: Fleet, ids: Sequence[int], rng: random.Random
) -> None:
    devices = fleet.devices[:WARM_UP]
    warm = await asyncio.gather(*(_job(client, d, [rng.choice(ids)]) for d in devices))
    await fleet.applied.wait((b for job in warm for b in job.result.batch_ids), TIMEOUT)
    _record(warm)


@dataclass(frozen=True)
class _Setup:
    env: dict[str, str]
    fleet: Fleet
    ids: Sequence[int]
    mode: Mode
    folder: Path


async def _timed(
    setup: _Setup,
    client: SyncClient,
    updates: Updates,
    pids: set[int],
    rng: random.Random,
) -> tuple[list[Job], dict[str, float]]:
    """The timed stream: its jobs, and the CPU, lock waits and times for ``extra``."""
    async with _lock_waits(setup.env["SYNC_DATABASE_URL"]) as waits:
        before, started = _cpu_ticks(pids), time.perf_counter()
        stream = await _stream(
            client, updates, setup.fleet.devices, setup.ids, setup.mode.jobs, rng
        )
        results_back = time.perf_counter() - started
        await setup.fleet.applied.wait((b for job in stream for b in job.result.batch_ids), TIMEOUT)
        elapsed = time.perf_counter() - started
        extra = _cores(before, _cpu_ticks(pids), elapsed)
    extra["device_lock_waits"] = statistics.mean(waits) if waits else 0.0
    extra["results_back_s"], extra["applied_s"] = results_back, elapsed
    return stream, extra


async def _pass(setup: _Setup, *, workers: int, rng: random.Random, tag: str) -> Pass:
    env, mode = setup.env, setup.mode
    others = await _jobs_consumers()
    if others:
        progress(f"warning: {others} other consumer(s) on {JOBS_QUEUE.name}; figures skewed")
    await _purge_jobs(env["SYNC_AMQP_URL"])
    for device in setup.fleet.devices:
        device.sent.clear()
    updates = Updates(await asyncpg.connect(env["SYNC_DATABASE_URL"]))
    try:
        async with AsyncExitStack() as stack:
            url = await stack.enter_async_context(
                _database_url(env["SYNC_DATABASE_URL"], mode.delay_ms)
            )
            processes = await stack.enter_async_context(
                running_workers(
                    {**env, "SYNC_DATABASE_URL": url},
                    workers,
                    setup.folder,
                    tag,
                    prefetch=str(mode.prefetch),
                    batch_size=str(BATCH_SIZE),
                )
            )
            client = await stack.enter_async_context(
                await SyncClient.connect(env["SYNC_AMQP_URL"], name="bench-scaleout")
            )
            consumers = await _jobs_consumers()
            if consumers != workers:
                progress(f"warning: {consumers} consumers on {JOBS_QUEUE.name}, {workers} ours")
            await _warm_up(client, setup.fleet, setup.ids, rng)
            marks = await asyncio.to_thread(_marks, setup.fleet.devices)
            pids = {process.pid for process in processes}
            stream, extra = await _timed(setup, client, updates, pids, rng)
            _record(stream)
            note = await _sweep_and_check(client, updates, setup.fleet, stream, marks, rng)
    finally:
        await updates.conn.close()
    named = sum(len(job.named) for job in stream)
    link = f"PostgreSQL {mode.delay_ms:g} ms away (proxy)" if mode.delay_ms else "PostgreSQL"
    note = (
        f"{mode.jobs} jobs of 1-{MAX_NAMED} objects over {mode.devices} devices (in-process "
        f"agents logging in with the operator URL); prefetch {mode.prefetch}, batches of "
        f"{BATCH_SIZE}, {link}, up to {IN_FLIGHT} jobs awaited at once; {note}"
    )
    if others or consumers != workers:
        note += f"; WARNING: {max(others, consumers - workers)} other consumer(s) on sync.jobs"
    elapsed = extra["applied_s"]
    return Pass(mode.jobs / elapsed, named / elapsed, extra, note)


def _figures(mode: Mode, passes: dict[int, list[Pass]]) -> list[Figure]:
    base_count = 1 if 1 in passes else min(passes)
    base = statistics.median(p.jobs_per_s for p in passes[base_count])
    figures = []
    for count, runs in passes.items():
        jobs_per_s = tuple(p.jobs_per_s for p in runs)
        ratio = statistics.median(jobs_per_s) / base
        extra = {
            "objects_per_s": statistics.median(p.objects_per_s for p in runs),
            f"ratio_to_{base_count}_worker": ratio,
            "target_ratio": mode.target,
        }
        note = f"{ratio:.2f}x {base_count} worker"
        if count == 4:
            extra["meets_target"] = float(ratio >= mode.target)
            verdict = "meets" if ratio >= mode.target else "MISSES"
            note += f" ({verdict} the target: 4 workers >= {mode.target:g}x 1 worker)"
        for key in runs[0].extra:
            extra[key] = statistics.median(p.extra[key] for p in runs)
        figures.append(
            Figure(
                f"{mode.label}: {count} worker{'s' if count > 1 else ''}",
                "jobs/s",
                jobs_per_s,
                kind="pipeline",
                note=f"{note}; {runs[-1].note}",
                extra=extra,
            )
        )
    return figures


async def _mode_passes(
    setup: _Setup, workers: Sequence[int], runs: int, rng: random.Random
) -> dict[int, list[Pass]]:
    passes: dict[int, list[Pass]] = {count: [] for count in workers}
    for run in range(1, runs + 1):
        for count in workers:
            started = time.perf_counter()
            done = await _pass(setup, workers=count, rng=rng, tag=f"{run}-{count}")
            passes[count].append(done)
            progress(
                f"{setup.mode.label} run {run}/{runs}, {count} worker(s): "
                f"{done.jobs_per_s:,.0f} jobs/s, {done.objects_per_s:,.0f} objects/s "
                f"(pass {time.perf_counter() - started:.0f} s); "
                + ", ".join(f"{k} {v:.2f}" for k, v in done.extra.items())
            )
    return passes


async def scaleout(
    env: dict[str, str],
    *,
    modes: Sequence[str] = tuple(MODES),
    workers: Sequence[int] = (1, 2, 4),
    jobs: int | None = None,
    delay_ms: float | None = None,
    runs: int = 1,
    seed: int = 1,
) -> list[Figure]:
    """Jobs/s of a stream of small jobs with each count of worker processes in ``workers``,
    in each of ``modes`` (keys of ``MODES``); one figure per mode and count, checked for
    loss, duplicates and per-device order. ``jobs`` and ``delay_ms`` override the modes'."""
    rng = random.Random(seed)
    chosen = [MODES[name] for name in modes]
    chosen = [
        Mode(
            m.label,
            devices=m.devices,
            jobs=jobs or m.jobs,
            prefetch=m.prefetch,
            delay_ms=m.delay_ms if delay_ms is None or not m.delay_ms else delay_ms,
            target=m.target,
        )
        for m in chosen
    ]
    await declare_jobs_topology(env["SYNC_AMQP_URL"])
    progress(f"scale-out: seeding {SEEDED:,} work orders")
    ids = await seed_work_orders(env["SYNC_DATABASE_URL"], SEEDED)
    folder = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    figures: dict[Mode, list[Figure]] = {}
    try:
        for devices in sorted({m.devices for m in chosen}):
            async with _fleet(env, devices, folder) as fleet:
                for mode in (m for m in chosen if m.devices == devices):
                    setup = _Setup(env, fleet, ids, mode, folder)
                    figures[mode] = _figures(mode, await _mode_passes(setup, workers, runs, rng))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return [figure for mode in chosen for figure in figures.get(mode, [])]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--jobs", type=int, help="jobs per worker count, every mode")
    parser.add_argument("--delay-ms", type=float, help="the worker-bound mode's delay")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()
    figures = asyncio.run(
        scaleout(
            service_env(),
            modes=args.modes,
            workers=args.workers,
            jobs=args.jobs,
            delay_ms=args.delay_ms,
            runs=args.runs,
            seed=args.seed,
        )
    )
    print(as_table(figures))
    print(as_details(figures))
    print(f"(ran {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
