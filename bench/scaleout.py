"""Scale-out: sync jobs/s and objects/s with 1, 2 and 4 worker processes.

    .venv/bin/python -m bench.scaleout [--workers 1 2 4] [--jobs 2000] [--devices 20]
                                       [--runs 1] [--seed 1]

Set-up, once: seeds 20,000 work orders (``bench.pipeline._seed``, which truncates
``work_order`` and makes user ``USER`` a Dispatcher), registers ``--devices`` devices for
``USER`` and runs one in-process ``DeviceAgent`` per device, each with its own SQLite file
in a temp folder. The agents log in with the operator URL (``SYNC_AMQP_URL``) rather than
their device accounts: simpler, and the queue and the apply path are the same.

Per worker count N: purges ``sync.jobs`` (with a warning when some other consumer is
attached to it: its jobs would be ours and its CPU would skew the figure), starts N
``python -m worker`` processes (prefetch 16; batches of 5 objects, so that a job makes one
to four batches and the ordering check has something to check), waits until each one
consumes and one warm-up job per device is applied, then publishes ``--jobs`` jobs with up
to 256 results awaited at once. Each job names 1-20 random work orders for a random device;
after every 10th job, the titles of 3 random work orders change in PostgreSQL. The figure
runs from the first publish until every result is back and every batch of every result is
applied on its device. Then, untimed: a few more titles change, one sweep job per device
names every object sent to that device during this N, and the checks run:

- no loss: every result is ``done`` and synced all it named; every object named is on its
  device;
- no duplicate effect: per device, the rows added to ``applied_batches`` are exactly the
  distinct batch ids of the device's results;
- no reordering: per device, in ``applied_batches`` rowid order (the order of
  application), the batches of one job are contiguous; and every object sent to a device
  during this N has PostgreSQL's current version and title there (the sweep came after
  the last update, so it carried the latest state).

A violated check raises, naming it; the checks passed are in each figure's note. The
workers get SIGTERM and are waited for after each N. CPU use of the workers, this process
(client and agents), RabbitMQ and PostgreSQL during the timed span is in each figure's
``extra`` (in cores), with the mean number of jobs waiting for their device's lock
(``pg_locks``), so what bounds the scaling shows. Owns the local services while it runs,
like the other benches.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiosqlite
import asyncpg

from bench.report import Figure, as_table, progress
from bench.rig import USER, accounts, running_workers, seed_work_orders, service_env
from broker import ObjectRef, Session, SyncClient
from broker.connection import connect, open_channel
from broker.models import SyncResult
from broker.topology import JOBS_QUEUE
from device_agent import AgentSettings, DeviceAgent, OfflineStore
from syncctl.devices import register_device, unregister_device

__all__ = ["scaleout"]

ENTITY = "WorkOrder"
SEEDED = 20_000
PREFETCH = 16
BATCH_SIZE = 5
IN_FLIGHT = 256  # results awaited at once: well above 4 workers x prefetch 16
MAX_NAMED = 20
UPDATE_EVERY = 10  # jobs published between two title updates
UPDATED = 3  # work orders per update
FINAL_UPDATES = 50  # work orders updated before the sweep
TIMEOUT = 600.0
ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "scripts" / "services.sh"
CPU_GROUPS = ("workers", "bench", "rabbitmq", "postgres")


@dataclass
class Device:
    device_id: str
    path: Path
    session: Session
    store: OfflineStore  # a second connection to the agent's file, for reading
    held: set[int] = field(default_factory=set)  # every object sent to it in this pass


@dataclass(frozen=True)
class Job:
    device: Device
    named: tuple[int, ...]
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


# The devices.


@asynccontextmanager
async def _fleet(env: dict[str, str], count: int, folder: Path) -> AsyncIterator[list[Device]]:
    """``count`` registered devices, each with a running in-process agent; all gone after."""
    amqp_url = env["SYNC_AMQP_URL"]
    prefix = f"bench-scaleout-{uuid.uuid4().hex[:6]}"
    stop = asyncio.Event()
    registered: list[str] = []
    agents: list[asyncio.Task[None]] = []
    devices: list[Device] = []
    conn = await asyncpg.connect(env["SYNC_DATABASE_URL"])
    connection = await connect(amqp_url, "bench-scaleout-fleet")
    channel = await open_channel(connection)
    try:
        for n in range(count):
            device_id = f"{prefix}-{n:02d}"
            registered.append(device_id)
            await register_device(conn, channel, accounts(env), device_id, USER)
            path = folder / f"{device_id}.sqlite"
            agent = await DeviceAgent.start(
                AgentSettings(amqp_url=amqp_url, device_id=device_id, db_path=path)
            )
            agents.append(asyncio.create_task(agent.run(stop)))
            session = Session(user_id=USER, device_id=device_id)
            devices.append(Device(device_id, path, session, await OfflineStore.open(path)))
        yield devices
    finally:
        stop.set()
        await asyncio.gather(*agents, return_exceptions=True)
        for device in devices:
            await device.store.close()
        for device_id in registered:
            await unregister_device(conn, channel, accounts(env), device_id)
        await connection.close()
        await conn.close()


async def _applied_mark(device: Device) -> int:
    """The last rowid of ``applied_batches``: rows after it were applied later."""
    async with (
        aiosqlite.connect(device.path) as db,
        db.execute("SELECT coalesce(max(rowid), 0) FROM applied_batches") as cursor,
    ):
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _applied_since(device: Device, mark: int) -> list[tuple[str, str]]:
    """(batch id, job id) of the batches applied after ``mark``, in application order."""
    async with (
        aiosqlite.connect(device.path) as db,
        db.execute(
            "SELECT batch_id, job_id FROM applied_batches WHERE rowid > ? ORDER BY rowid",
            (mark,),
        ) as cursor,
    ):
        return [(str(row[0]), str(row[1])) for row in await cursor.fetchall()]


async def _device_state(device: Device) -> dict[int, tuple[int, str]]:
    """Version and title of every work order on the device."""
    async with (
        aiosqlite.connect(device.path) as db,
        db.execute(
            "SELECT id, version, json_extract(data, '$.title') FROM objects WHERE entity = ?",
            (ENTITY,),
        ) as cursor,
    ):
        return {int(row[0]): (int(row[1]), str(row[2])) for row in await cursor.fetchall()}


# Publishing.


async def _update(conn: asyncpg.Connection, ids: Sequence[int], revision: int) -> None:
    """New titles for ``ids``; the trigger gives each row a new version."""
    await conn.execute(
        "UPDATE work_order SET title = 'order ' || id || ' rev ' || $2::int WHERE id = ANY($1)",
        list(ids),
        revision,
    )


async def _job(client: SyncClient, device: Device, named: Sequence[int]) -> Job:
    result = await client.synchronize_to_device(
        device.session, objects=[ObjectRef(ENTITY, i) for i in named], timeout=TIMEOUT
    )
    return Job(device, tuple(named), result)


async def _applied(jobs: Iterable[Job]) -> None:
    """Wait until every batch of every job is applied on its device."""
    wanted: dict[str, tuple[Device, set[str]]] = {}
    for job in jobs:
        wanted.setdefault(job.device.device_id, (job.device, set()))[1].update(job.result.batch_ids)
    await asyncio.gather(
        *(
            device.store.wait_for_batches(batches, timeout=TIMEOUT, interval=0.01)
            for device, batches in wanted.values()
        )
    )


async def _stream(
    client: SyncClient,
    conn: asyncpg.Connection,
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
                await _update(conn, rng.sample(ids, UPDATED), n)
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
    """Samples, every 0.1 s while in the block, of how many jobs wait for their device's
    lock (another job of the same device is in hand)."""
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
    applied = await _applied_since(device, mark)
    if len(applied) != len(expected) or {batch for batch, _ in applied} != expected:
        problems.append(
            f"{name}: {len(applied)} batches applied, {len(expected)} distinct in its results"
        )
    interleaved = _interleaved(applied)
    if interleaved:
        problems.append(f"{name}: batches of {len(interleaved)} jobs interleaved with others'")
    state = await _device_state(device)
    missing = device.held - state.keys()
    if missing:
        problems.append(f"{name}: {len(missing)} objects named are not on the device")
    stale = sorted(i for i in device.held if i in state and latest.get(i) != state[i])
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


async def _sweep_and_check(
    client: SyncClient,
    conn: asyncpg.Connection,
    devices: Sequence[Device],
    jobs: list[Job],
    marks: dict[str, int],
    rng: random.Random,
) -> str:
    """Update a few objects sent in this pass, then sweep: one job per device naming every
    object sent to it in this pass, so each one's latest state is sent after the last
    update. Then check; the note, or raise."""
    held = sorted(set[int]().union(*(device.held for device in devices)))
    await _update(conn, rng.sample(held, min(FINAL_UPDATES, len(held))), -1)
    sweeps = await asyncio.gather(
        *(_job(client, device, sorted(device.held)) for device in devices if device.held)
    )
    await _applied(sweeps)
    everything = [*jobs, *sweeps]
    problems = _check_results(everything)
    latest = await _latest(conn, held)
    for device in devices:
        mine = [job for job in everything if job.device is device]
        problems += await _check_device(device, mine, marks[device.device_id], latest)
    if problems:
        shown = "\n  ".join(problems[:20])
        raise AssertionError(f"scale-out checks failed ({len(problems)}):\n  {shown}")
    batches = sum(len(job.result.batch_ids) for job in everything)
    return (
        f"checks passed: {len(jobs)} jobs + {len(sweeps)} sweeps done, every named object "
        f"on its device; {batches} batches applied once each, none interleaved; "
        f"{len(held)} objects match PostgreSQL after {FINAL_UPDATES} updates and the sweep"
    )


# One worker count.


async def _warm_up(
    client: SyncClient, devices: Sequence[Device], ids: Sequence[int], rng: random.Random
) -> None:
    warm = await asyncio.gather(*(_job(client, d, [rng.choice(ids)]) for d in devices))
    await _applied(warm)
    for job in warm:
        job.device.held.update(job.named)


async def _pass(
    env: dict[str, str],
    devices: Sequence[Device],
    ids: Sequence[int],
    *,
    workers: int,
    jobs: int,
    rng: random.Random,
    folder: Path,
    tag: str,
) -> Pass:
    others = await _jobs_consumers()
    if others:
        progress(f"warning: {others} other consumer(s) on {JOBS_QUEUE.name}; figures skewed")
    await _purge_jobs(env["SYNC_AMQP_URL"])
    conn = await asyncpg.connect(env["SYNC_DATABASE_URL"])
    try:
        async with (
            running_workers(
                env, workers, folder, tag, prefetch=str(PREFETCH), batch_size=str(BATCH_SIZE)
            ) as processes,
            await SyncClient.connect(env["SYNC_AMQP_URL"], name="bench-scaleout") as client,
        ):
            consumers = await _jobs_consumers()
            if consumers != workers:
                progress(f"warning: {consumers} consumers on {JOBS_QUEUE.name}, {workers} ours")
            for device in devices:
                device.held.clear()
            await _warm_up(client, devices, ids, rng)
            marks = {d.device_id: await _applied_mark(d) for d in devices}
            pids = {process.pid for process in processes}
            async with _lock_waits(env["SYNC_DATABASE_URL"]) as waits:
                before, started = _cpu_ticks(pids), time.perf_counter()
                stream = await _stream(client, conn, devices, ids, jobs, rng)
                results_back = time.perf_counter() - started
                await _applied(stream)
                elapsed = time.perf_counter() - started
                extra = _cores(before, _cpu_ticks(pids), elapsed)
            extra["device_lock_waits"] = statistics.mean(waits) if waits else 0.0
            extra["results_back_s"], extra["applied_s"] = results_back, elapsed
            for job in stream:
                job.device.held.update(job.named)
            note = await _sweep_and_check(client, conn, devices, stream, marks, rng)
    finally:
        await conn.close()
    named = sum(len(job.named) for job in stream)
    note = (
        f"{jobs} jobs of 1-{MAX_NAMED} objects over {len(devices)} devices (in-process agents "
        f"logging in with the operator URL); prefetch {PREFETCH}, batches of {BATCH_SIZE}, "
        f"up to {IN_FLIGHT} jobs awaited at once; {note}"
    )
    if others or consumers != workers:
        note += f"; WARNING: {max(others, consumers - workers)} other consumer(s) on sync.jobs"
    return Pass(jobs / elapsed, named / elapsed, extra, note)


def _figures(passes: dict[int, list[Pass]]) -> list[Figure]:
    base_count = 1 if 1 in passes else min(passes)
    base = statistics.median(p.jobs_per_s for p in passes[base_count])
    figures = []
    for count, runs in passes.items():
        jobs_per_s = tuple(p.jobs_per_s for p in runs)
        extra = {
            "objects_per_s": statistics.median(p.objects_per_s for p in runs),
            f"ratio_to_{base_count}_worker": statistics.median(jobs_per_s) / base,
        }
        for key in runs[0].extra:
            extra[key] = statistics.median(p.extra[key] for p in runs)
        figures.append(
            Figure(
                f"scale-out: {count} worker{'s' if count > 1 else ''}",
                "jobs/s",
                jobs_per_s,
                kind="pipeline",
                note=runs[-1].note,
                extra=extra,
            )
        )
    return figures


async def scaleout(
    env: dict[str, str],
    *,
    workers: Sequence[int] = (1, 2, 4),
    jobs: int = 2000,
    devices: int = 20,
    runs: int = 1,
    seed: int = 1,
    objects: int = SEEDED,
) -> list[Figure]:
    """Jobs/s of a stream of small jobs to ``devices`` devices, with each count of worker
    processes in ``workers``; one figure per count, checked for loss, duplicates and
    per-device order."""
    rng = random.Random(seed)
    progress(f"scale-out: seeding {objects:,} work orders, {devices} devices with agents")
    ids = await seed_work_orders(env["SYNC_DATABASE_URL"], objects)
    folder = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    passes: dict[int, list[Pass]] = {count: [] for count in workers}
    try:
        async with _fleet(env, devices, folder) as fleet:
            for run in range(1, runs + 1):
                for count in workers:
                    done = await _pass(
                        env,
                        fleet,
                        ids,
                        workers=count,
                        jobs=jobs,
                        rng=rng,
                        folder=folder,
                        tag=f"{run}-{count}",
                    )
                    passes[count].append(done)
                    progress(
                        f"scale-out run {run}/{runs}, {count} worker(s): "
                        f"{done.jobs_per_s:,.0f} jobs/s, {done.objects_per_s:,.0f} objects/s; "
                        + ", ".join(f"{k} {v:.2f}" for k, v in done.extra.items())
                    )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return _figures(passes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()
    figures = asyncio.run(
        scaleout(
            service_env(),
            workers=args.workers,
            jobs=args.jobs,
            devices=args.devices,
            runs=args.runs,
            seed=args.seed,
        )
    )
    print(as_table(figures))
    for figure in figures:
        extra = ", ".join(f"{key} {value:,.2f}" for key, value in figure.extra.items())
        print(f"{figure.name}: {extra}\n  {figure.note}")
    print(f"(ran {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
