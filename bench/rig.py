"""What every end-to-end benchmark needs: the services, a seeded database, registered
devices with in-process agents that time each applied batch, and worker processes.

Workers run as separate processes, as in production; the agents and the client share
the benchmark's process, standing in for many devices.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from bench.report import progress
from broker import ObjectRef, Session, SyncClient
from broker.connection import connect, open_channel
from broker.topology import (
    JOBS_QUEUE,
    declare_device_queue,
    declare_topology,
    delete_device_queue,
)
from device_agent import AgentSettings, AppliedBatch, DeviceAgent, OfflineStore
from syncctl.accounts import BrokerAccounts
from syncctl.devices import register_device, unregister_device
from worker import load_model
from worker.devices import delete_devices, save_devices
from worker.model import EXAMPLE_MODEL
from worker.schema import SYNC_SCHEMA_SQL, init_database
from worker.settings import ServerSettings

__all__ = [
    "MODEL",
    "ROOT",
    "USER",
    "AppliedBatches",
    "Rig",
    "accounts",
    "declare_jobs_topology",
    "ensure_sync_schema",
    "in_process_agents",
    "profiled",
    "rig",
    "running_workers",
    "seed_work_orders",
    "service_env",
    "start_worker",
    "terminate_workers",
]

ROOT = Path(__file__).resolve().parent.parent
MODEL = EXAMPLE_MODEL
USER = 900


def service_env() -> dict[str, str]:
    """Start the local services (idempotent) and return their ``SYNC_*`` variables."""
    script = ROOT / "scripts" / "services.sh"
    subprocess.run(["bash", str(script), "start"], check=True, capture_output=True)
    lines = subprocess.run(
        ["bash", str(script), "env"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    return dict(line.removeprefix("export ").split("=", 1) for line in lines)


def accounts(env: dict[str, str]) -> BrokerAccounts:
    """Device accounts on the local broker, managed with the services' operator account."""
    management = env.get("SYNC_MANAGEMENT_URL", ServerSettings().management_url)
    return BrokerAccounts(management, env["SYNC_AMQP_URL"])


async def seed_work_orders(database_url: str, count: int) -> list[int]:
    """``count`` fresh work orders readable by ``USER`` (a Dispatcher); returns their ids."""
    conn = await asyncpg.connect(database_url)
    try:
        await init_database(conn, await load_model(MODEL), create_tables=True)
        # The bench owns the local services' work orders while it runs (the demo reseeds).
        await conn.execute("TRUNCATE work_order RESTART IDENTITY")
        await conn.execute("DELETE FROM sync.user_role WHERE user_id = $1", USER)
        await conn.execute("INSERT INTO sync.user_role VALUES ($1, 'Dispatcher')", USER)
        rows = await conn.fetch(
            "INSERT INTO work_order (title, status, amount) "
            "SELECT 'order ' || g, 'Open', g FROM generate_series(1, $1) g RETURNING id",
            count,
        )
    finally:
        await conn.close()
    return [row["id"] for row in rows]


async def _wait_started(process: asyncio.subprocess.Process, log: Path) -> None:
    async with asyncio.timeout(60):
        while "worker started" not in await asyncio.to_thread(log.read_text, errors="replace"):
            if process.returncode is not None:
                text = await asyncio.to_thread(log.read_text, errors="replace")
                tail = text.splitlines()[-20:]
                raise RuntimeError(f"worker exited {process.returncode}:\n" + "\n".join(tail))
            await asyncio.sleep(0.05)


async def terminate_workers(processes: Sequence[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            async with asyncio.timeout(60):
                await process.wait()
        except TimeoutError:
            progress(f"worker {process.pid} ignored SIGTERM for 60 s; killing it")
            process.kill()
            await process.wait()


_UNLIMITED_DEVICES = {
    "device_rate": "1000000",
    "device_burst": "1000000",
    "device_in_hand": "100000",
}


async def start_worker(
    env: dict[str, str], log: Path, **settings: str
) -> asyncio.subprocess.Process:
    """A worker process (``python -m worker``) on the field-service model (``model=`` in
    ``settings`` names another), returned once it has started; it logs to ``log`` (named
    after it). ``settings`` are ``WorkerSettings`` fields (``batch_size="5"``)."""
    worker_env = {**os.environ, **env, "SYNC_MODEL": str(MODEL)}
    worker_env.update({f"SYNC_{name.upper()}": value for name, value in settings.items()})
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *(
                sys.executable,
                "-m",
                "worker",
                "--name",
                f"bench-{log.stem.removeprefix('worker-')}",
            ),
            env=worker_env,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        await _wait_started(process, log)
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    return process


@asynccontextmanager
async def running_workers(
    env: dict[str, str], count: int, folder: Path, tag: str, **settings: str
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """``count`` worker processes (``python -m worker``) on the field-service model, yielded
    once each has started; SIGTERM and wait after. ``settings`` are ``WorkerSettings``
    fields (``batch_size="5"``); each worker logs to ``folder``."""
    processes: list[asyncio.subprocess.Process] = []
    try:
        for n in range(count):
            processes.append(await start_worker(env, folder / f"worker-{tag}-{n}.log", **settings))
        yield processes
    finally:
        await terminate_workers(processes)
        failed = [p.returncode for p in processes if p.returncode not in (0, None)]
        if failed:
            progress(f"warning: workers exited with {failed}; logs in {folder}")


@asynccontextmanager
async def profiled(folder: Path | None, name: str, pids: Mapping[str, int]) -> AsyncIterator[None]:
    """py-spy sampling each process of ``pids`` (role -> pid) while in the block, its raw
    stacks written to ``folder/<name>-<role>.txt``; nothing at all when ``folder`` is None.

    Example::

        async with profiled(Path("profile"), "small-1", {"bench": os.getpid()}):
            ...
    """
    if folder is None:
        yield
        return
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if py_spy is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    samplers = [
        await asyncio.create_subprocess_exec(
            # Non-blocking: stopping the process for each sample slowed it several times.
            *(py_spy, "record", "--nonblocking", "--format", "raw", "--rate", "100"),
            *("--pid", str(pid)),
            *("--output", str(folder / f"{name}-{role}.txt")),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for role, pid in pids.items()
    ]
    try:
        # py-spy needs a moment to attach; samples before that would be lost.
        await asyncio.sleep(0.5)
        yield
    finally:
        for sampler in samplers:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for sampler in samplers:
            await sampler.wait()


class AppliedBatches:
    """When each batch was committed on its device, from the agents' ``on_applied`` hook;
    and a wait for a set of batches. One log serves any number of in-process agents (batch
    ids are unique across devices)."""

    def __init__(self) -> None:
        # batch id -> perf_counter() when it was committed
        self.at: dict[str, float] = {}
        self._waits: dict[str, list[tuple[set[str], asyncio.Future[None]]]] = {}

    def on_applied(self, batch: AppliedBatch) -> None:
        self.at[batch.batch_id] = time.perf_counter()
        for remaining, future in self._waits.pop(batch.batch_id, []):
            remaining.discard(batch.batch_id)
            if not remaining and not future.done():
                future.set_result(None)

    async def wait(self, batch_ids: Iterable[str], timeout: float) -> None:
        """Until every batch of ``batch_ids`` is applied; ``TimeoutError`` after ``timeout``."""
        remaining = {batch for batch in batch_ids if batch not in self.at}
        if not remaining:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for batch in remaining:
            self._waits.setdefault(batch, []).append((remaining, future))
        try:
            async with asyncio.timeout(timeout):
                await future
        finally:
            for batch in remaining:
                waits = self._waits.get(batch, [])
                waits[:] = [wait for wait in waits if wait[1] is not future]
                if not waits:
                    self._waits.pop(batch, None)


@asynccontextmanager
async def in_process_agents(
    amqp_url: str,
    paths: dict[str, Path],
    on_applied: AppliedBatches,
    *,
    starting: int = 16,
) -> AsyncIterator[None]:
    """A running ``DeviceAgent`` per device (id -> SQLite file) in this process, logging in
    with ``amqp_url``, ``starting`` of them connecting at once; all stopped after."""
    stop = asyncio.Event()
    runs: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(starting)

    async def start(device_id: str, path: Path) -> None:
        async with gate:
            agent = await DeviceAgent.start(
                AgentSettings(amqp_url=amqp_url, device_id=device_id, db_path=path),
                on_applied=on_applied.on_applied,
            )
        runs.append(asyncio.create_task(agent.run(stop)))

    try:
        async with asyncio.TaskGroup() as group:
            for device_id, path in paths.items():
                group.create_task(start(device_id, path))
        yield
    finally:
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)


async def declare_jobs_topology(amqp_url: str) -> None:
    """The shared exchanges and queues, as a worker declares them (fresh services have
    none yet); idempotent."""
    connection = await connect(amqp_url, "bench-topology")
    try:
        await declare_topology(await open_channel(connection))
    finally:
        await connection.close()


@dataclass
class Rig:
    """Devices of ``USER`` with running agents, a client, and when each job landed."""

    client: SyncClient
    sessions: list[Session]
    stores: list[OfflineStore]
    ids: list[int]
    worker_pids: list[int] = field(default_factory=list)
    applied: Counter[str] = field(default_factory=Counter)
    # job id -> perf_counter() when its latest batch was committed on its device
    last_applied: dict[str, float] = field(default_factory=dict)
    _waiters: dict[str, tuple[int, asyncio.Future[None]]] = field(default_factory=dict)

    def on_applied(self, batch: AppliedBatch) -> None:
        """The agents' hook: called once per batch, after its SQLite commit."""
        self.applied[batch.job_id] += 1
        self.last_applied[batch.job_id] = time.perf_counter()
        waiting = self._waiters.get(batch.job_id)
        if waiting is not None and self.applied[batch.job_id] >= waiting[0]:
            del self._waiters[batch.job_id]
            if not waiting[1].done():
                waiting[1].set_result(None)

    async def landed(self, batches_by_job: dict[str, int], timeout: float) -> None:
        """Wait until every job has had its number of batches applied."""
        loop = asyncio.get_running_loop()
        pending = []
        for job_id, batches in batches_by_job.items():
            if self.applied[job_id] < batches:
                future: asyncio.Future[None] = loop.create_future()
                self._waiters[job_id] = (batches, future)
                pending.append(future)
        async with asyncio.timeout(timeout):
            await asyncio.gather(*pending)

    def refs(self, start: int, count: int) -> list[ObjectRef]:
        return [ObjectRef("WorkOrder", self.ids[(start + n) % len(self.ids)]) for n in range(count)]


@asynccontextmanager
async def rig(
    env: dict[str, str], *, devices: int, workers: int, ids: list[int]
) -> AsyncIterator[Rig]:
    """Register ``devices`` devices with agents, start ``workers`` worker processes, and
    clean all of it up afterwards."""
    amqp_url, database_url = env["SYNC_AMQP_URL"], env["SYNC_DATABASE_URL"]
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    device_ids = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(devices)]
    conn = await asyncpg.connect(database_url)
    connection = await connect(amqp_url, "bench-rig")
    channel = await open_channel(connection)
    await declare_topology(channel)  # fresh services have no jobs queue yet
    await (await channel.get_queue(JOBS_QUEUE.name)).purge()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    stores: list[OfflineStore] = []
    client: SyncClient | None = None
    try:
        for device_id in device_ids:
            await register_device(conn, channel, accounts(env), device_id, USER)
        client = await SyncClient.connect(amqp_url, name="bench-client")
        the_rig = Rig(client, [Session(user_id=USER, device_id=d) for d in device_ids], [], ids)
        for device_id in device_ids:
            path = folder / f"{device_id}.sqlite"
            agent = await DeviceAgent.start(
                AgentSettings(amqp_url=amqp_url, device_id=device_id, db_path=path),
                on_applied=the_rig.on_applied,
            )
            tasks.append(asyncio.create_task(agent.run(stop)))
            stores.append(await OfflineStore.open(path))
        the_rig.stores = stores
        # The pipeline measures throughput per device far above a device's own limits
        # (SYNC_DEVICE_RATE and the rest protect a fleet from one device): a job refused
        # as rate-limited would never land and stall the bench.
        async with running_workers(
            env, workers, folder, "pipeline", **_UNLIMITED_DEVICES
        ) as processes:
            the_rig.worker_pids = [process.pid for process in processes]
            progress(f"rig: {devices} devices, {workers} worker process(es); warming up")
            warm_up = await client.synchronize_to_device(
                the_rig.sessions[0], objects=the_rig.refs(0, 1), timeout=60
            )
            await stores[0].wait_for_batches(warm_up.batch_ids, timeout=60)
            yield the_rig
    finally:
        if client is not None:
            await client.close()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for store in stores:
            await store.close()
        for device_id in device_ids:
            await unregister_device(conn, channel, accounts(env), device_id)
        await connection.close()
        await conn.close()
        shutil.rmtree(folder, ignore_errors=True)


# Device queues declared or deleted at once, one per channel (AMQP RPCs are serial).
DECLARE_CHANNELS = 16


async def _each_device(
    connection: AbstractRobustConnection, device_ids: Sequence[str], declare: bool
) -> None:
    """Declare (or delete) the device queues, ``DECLARE_CHANNELS`` at once."""
    pending = iter(device_ids)

    async def drain(channel: AbstractChannel) -> None:
        for device_id in pending:  # shared: each id is taken by exactly one channel
            if declare:
                await declare_device_queue(channel, device_id)
            else:
                await delete_device_queue(channel, device_id)

    count = min(DECLARE_CHANNELS, len(device_ids))
    channels = [await open_channel(connection) for _ in range(count)]
    try:
        async with asyncio.TaskGroup() as group:
            for channel in channels:
                group.create_task(drain(channel))
    finally:
        for channel in channels:
            await channel.close()


async def ensure_sync_schema(conn: asyncpg.Connection) -> None:
    """The ``sync`` schema, on fresh services that have none yet."""
    if await conn.fetchval("SELECT to_regclass('sync.device')") is None:
        await conn.execute(SYNC_SCHEMA_SQL)


@asynccontextmanager
async def registered_devices(
    env: dict[str, str], user_id: int, device_ids: Sequence[str]
) -> AsyncIterator[None]:
    """The devices' rows and queues, as registration makes them (no AMQP accounts)."""
    conn = await asyncpg.connect(env["SYNC_DATABASE_URL"])
    connection = await connect(env["SYNC_AMQP_URL"], "bench-devices")
    try:
        await ensure_sync_schema(conn)
        await save_devices(conn, device_ids, user_id)
        await _each_device(connection, device_ids, declare=True)
        yield
    finally:
        await _each_device(connection, device_ids, declare=False)
        await delete_devices(conn, device_ids)
        await connection.close()
        await conn.close()
