"""The chaos soak: a job stream over 100 devices, with follow changes flowing, while faults
are injected on a schedule drawn from a seed; then every device is checked.

    .venv/bin/python -m bench.chaos [--jobs 10000] [--rate 12] [--seed N]

(``python -m bench --only chaos`` and ``make chaos`` run the full form; CI runs
``--jobs 1000``.)

Set-up, all of it the bench's own: a 3-node RabbitMQ cluster and a PostgreSQL started by
``scripts/services.sh`` in ``.services/chaos`` (``SYNC_SERVICES_DIR``) on the services'
ports moved by ``PORT_OFFSET`` (epmd by ``EPMD_OFFSET``), so the suite's single node and
its PostgreSQL are never touched; stopped (and its folder removed after a passing run) at
the end. The model is ``bench/follow_model.yaml`` (work orders with ``follow: true``);
``OBJECTS`` of them are seeded. ``DEVICES`` devices are registered as ``syncctl device
add`` does (row, **quorum** device queue, own AMQP account): a node stop must not reject
their batches, which a classic queue on the stopped node would (``docs/cluster.md``).
Their agents run in ``AGENT_PROCESSES`` processes (this module with ``--serve-devices``),
each logging in with its own account on all three nodes' URLs, and report each batch
they settle: applied or skipped as applied before, its job, position and versions.
``WORKERS`` worker processes get all three URLs too (batches of ``BATCH_SIZE``, so that a
job makes one to three batches, no per-device limits).

The stream: jobs at ``--rate`` a second (at most ``IN_FLIGHT`` awaited at once), each
naming 1-``MAX_NAMED`` random work orders for a random device, from one ``SyncClient``
on all three URLs; a job whose call fails or times out is sent again with the same
``job_id`` (SPEC §7) until it gets its result. A writer updates ``WRITES_PER_S`` random
work orders a second among those already sent (``internal_note``), so the follow feed
pushes them to their holders throughout. The stream runs until ``--jobs`` jobs were
sent and the round of faults under way has ended, plus ``TAIL_S``.

The faults, one at a time, from ``QUIET_START_S`` after the stream starts: rounds, each a
shuffle of ``KINDS`` with their targets and hold times drawn from ``--seed`` (printed; the
same seed, the same schedule), ``GAP_S`` of quiet between two faults:

- ``node``: a RabbitMQ node stopped, held down, started (it rejoins); never two at once;
- ``postgresql``: PostgreSQL restarted (``services.sh restart-postgresql``, fast stop);
- ``worker-kill``: a worker SIGKILLed, a new one started after the hold;
- ``worker-stop``: a worker SIGSTOPped, SIGCONTed after the hold;
- ``agent-kill``: an agent process SIGKILLed, started again after the hold;
- ``agent-stop``: an agent process SIGSTOPped, SIGCONTed after the hold;
- ``alarm``: a memory alarm on a node (``set_vm_memory_high_watermark`` to 0.0001, which
  blocks every publisher of the cluster), cleared after the hold.

After the stream: the writer stops; the drain waits until the outbox, ``sync.jobs`` and
every device queue are empty (``DRAIN_TIMEOUT_S``). Figures (the run raises when any of
the middle four is not 0):

- ``chaos: jobs``: jobs that got a ``done`` result;
- ``chaos: lost``: jobs without a result after every retry, or not ``done`` with all
  they named synced; plus, per device, batches of a result missing from its
  ``applied_batches`` and objects named by its jobs missing from its store;
- ``chaos: applied twice``: (device, batch id) pairs the agents reported applied more
  than once, across agent restarts (a skipped redelivery is not applied);
- ``chaos: reordered``: batches a device applied at a position other than right after
  the previous batch of their job (every batch of position p > 1 must follow, on its
  device, the batch of position p - 1 of the same job; checked within one life of an
  agent process, since a SIGKILL loses the reports in flight), and batches carrying an
  object at an older version than one the device had already applied;
- ``chaos: stale objects``: after the drain, (device, object) pairs whose version or data
  differ from PostgreSQL's: every object here is followed, so no sweep is needed for
  the device to hold the latest state; a sweep (one job per device naming all it holds)
  follows, and ``stale_after_sweep`` in the extra must be 0 too;
- ``chaos: max recovery s``: per fault, from its healing (node started, PostgreSQL back,
  process continued or started, alarm cleared) until the first job sent after it is
  complete (result back and every batch on its device; for an agent fault, a job of one
  of that process's devices); the extra has the max per kind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import asyncpg
import msgspec
from aiormq.exceptions import AMQPError

from bench.follow import MODEL as FOLLOW_MODEL
from bench.follow import TABLE, ReportingAgent, prepare_followed, serve_devices
from bench.report import Figure, as_details, as_json, as_table, progress
from bench.rig import _UNLIMITED_DEVICES, ROOT, USER, start_worker, terminate_workers
from broker import ObjectRef, Session, SyncClient
from broker.accounts import device_account
from broker.connection import connect, open_channel
from broker.errors import BrokerUnavailable
from broker.models import SyncResult
from broker.topology import JOBS_QUEUE, declare_topology
from device_agent.agent import _Batch
from syncctl.accounts import BrokerAccounts
from syncctl.devices import register_device

__all__ = ["KINDS", "ChaosFailed", "Reports", "chaos", "schedule"]

SERVICES = ROOT / "scripts" / "services.sh"
NODES = 3
# The suite's services' ports (the script's defaults, or what the caller moved them to),
# moved again: clear of the suite's single node, of the cluster tests (+50) and of the
# other checkouts (spaced by tens, each using its base and the two after).
BASE_PORTS = {
    "SYNC_AMQP_PORT": 5673,
    "SYNC_DIST_PORT": 25673,
    "SYNC_MGMT_PORT": 15673,
    "SYNC_PROM_PORT": 15693,
    "SYNC_PG_PORT": 5433,
}
PORT_OFFSET = 5
EPMD_PORT, EPMD_OFFSET = 4370, 3
SERVICES_DIR = ROOT / ".services" / "chaos"

ENTITY = "WorkOrder"
OBJECTS = 2_000
DEVICES = 100
AGENT_PROCESSES = 4
WORKERS = 3
BATCH_SIZE = 3
MAX_NAMED = 8
IN_FLIGHT = 300
ATTEMPT_TIMEOUT_S = 30.0
RETRY_PAUSE_S = 1.0
WRITES_PER_S = 3.0
QUIET_START_S = 5.0
GAP_S = (3.0, 6.0)
TAIL_S = 10.0
DRAIN_TIMEOUT_S = 300.0
GIVE_UP_S = 300.0  # after the stream's last send, a job still without a result is lost
SETUP_TIMEOUT_S = 300.0
ALARM_WATERMARK = "0.0001"
DEFAULT_WATERMARK = "0.4"

KINDS = ("node", "postgresql", "worker-kill", "worker-stop", "agent-kill", "agent-stop", "alarm")
# Hold times (s) per kind: how long the fault lasts before it is healed.
HOLD_S = {
    "node": (3.0, 10.0),
    "postgresql": (0.0, 0.0),  # the restart itself: a fast stop, then a start
    "worker-kill": (1.0, 4.0),
    "worker-stop": (2.0, 6.0),
    "agent-kill": (1.0, 4.0),
    "agent-stop": (2.0, 6.0),
    "alarm": (3.0, 8.0),
}
TARGETS = {
    "node": NODES,
    "postgresql": 1,
    "worker-kill": WORKERS,
    "worker-stop": WORKERS,
    "agent-kill": AGENT_PROCESSES,
    "agent-stop": AGENT_PROCESSES,
    "alarm": NODES,
}
# Rough length of one round (s), for the schedule printed before the run.
ROUND_S = 100.0
# What a call may raise while a node, the broker or a connection is away: sent again.
RETRIED = (TimeoutError, BrokerUnavailable, AMQPError, ConnectionError, RuntimeError)


class ChaosFailed(AssertionError):
    """Something was lost, applied twice, reordered or stale: what, and the figures."""

    def __init__(self, message: str, figures: list[Figure]) -> None:
        super().__init__(message)
        self.figures = figures


# The schedule.


@dataclass(frozen=True)
class Fault:
    number: int
    kind: str
    target: int  # 1-based: node, worker or agent process
    hold: float
    gap: float  # quiet after it is healed

    def __str__(self) -> str:
        what = {"node": "node", "alarm": "node", "postgresql": "PostgreSQL"}.get(
            self.kind, self.kind.split("-")[0]
        )
        target = "" if self.kind == "postgresql" else f" {self.target}"
        return (
            f"#{self.number} {self.kind} ({what}{target}), hold {self.hold:.1f} s, "
            f"gap {self.gap:.1f} s"
        )


def schedule(seed: int, kinds: Sequence[str] = KINDS) -> Iterator[Fault]:
    """The faults of ``seed``, endless: rounds of every kind of ``kinds`` in a shuffled
    order."""
    rng = random.Random(seed)
    number = 0
    while True:
        for kind in rng.sample(list(kinds), len(kinds)):
            number += 1
            low, high = HOLD_S[kind]
            yield Fault(
                number,
                kind,
                rng.randint(1, TARGETS[kind]),
                round(rng.uniform(low, high), 1),
                round(rng.uniform(*GAP_S), 1),
            )


# The cluster.


@dataclass(frozen=True)
class Cluster:
    script_env: dict[str, str]  # the services script's settings for this cluster
    urls: dict[str, str]  # what `services.sh env` printed

    @property
    def amqp_urls(self) -> str:
        return self.urls["SYNC_AMQP_URLS"]

    @property
    def database_url(self) -> str:
        return self.urls["SYNC_DATABASE_URL"]

    async def script(self, *args: str, node: int = 1) -> str:
        process = await asyncio.create_subprocess_exec(
            *("bash", str(SERVICES), *args),
            env={**self.script_env, "SYNC_RABBIT_NODE": str(node)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"services.sh {' '.join(args)} failed: {err.decode()[-2000:]}")
        return out.decode()


def _cluster_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "SYNC_RABBIT_NODE"}
    for name, default in BASE_PORTS.items():
        env[name] = str(int(os.environ.get(name, default)) + PORT_OFFSET)
    env["SYNC_EPMD_PORT"] = str(int(os.environ.get("SYNC_EPMD_PORT", EPMD_PORT)) + EPMD_OFFSET)
    env["SYNC_RABBIT_NODES"] = str(NODES)
    env["SYNC_RABBIT_NODENAME"] = "syncchaos@localhost"
    env["SYNC_SERVICES_DIR"] = str(SERVICES_DIR)
    return env


@asynccontextmanager
async def _cluster() -> AsyncIterator[Cluster]:
    """A fresh cluster and PostgreSQL of the bench's own; stopped after, and the folder
    removed unless the run failed (its logs are in it)."""
    cluster = Cluster(_cluster_env(), {})
    await cluster.script("stop")  # a run that died may have left it running
    await asyncio.to_thread(shutil.rmtree, SERVICES_DIR, ignore_errors=True)
    started = time.monotonic()
    out = await cluster.script("start")
    urls = dict(
        line.removeprefix("export ").split("=", 1)
        for line in out.splitlines()
        if line.startswith("export ")
    )
    progress(
        f"chaos: 3-node cluster and PostgreSQL in {SERVICES_DIR} "
        f"(AMQP {urls['SYNC_AMQP_URLS']}) in {time.monotonic() - started:.0f} s"
    )
    cluster = Cluster(cluster.script_env, urls)
    passed = False
    try:
        yield cluster
        passed = True
    finally:
        started = time.monotonic()
        await cluster.script("stop")
        progress(f"chaos: cluster stopped in {time.monotonic() - started:.0f} s")
        if passed:
            await asyncio.to_thread(shutil.rmtree, SERVICES_DIR, ignore_errors=True)
        else:
            progress(f"chaos: the services' logs stay in {SERVICES_DIR}")


# The device side: agent processes and what they report.


class _Position(msgspec.Struct):
    position: int = 1


class _ChaosAgent(ReportingAgent):
    """Reports each batch it settled: ``b``, device index, ``A`` (applied) or ``S``
    (skipped: applied before), batch id, job id, position, total, ``time.monotonic()``,
    and the versions it carried (``id:version,...``; ``-`` for none or skipped)."""

    def _settled(self, batch: _Batch, outcome: bool, started: float, group: int) -> None:
        super()._settled(batch, outcome, started, group)
        position = msgspec.json.decode(batch.message.body, type=_Position).position
        versions = ",".join(
            f"{object_id}:{version}" for _, object_id, version, _ in batch.rows.upserts
        )
        self.out.append(
            f"b {self.index} {'A' if outcome else 'S'} {batch.applied.batch_id} "
            f"{batch.applied.job_id} {position} {batch.rows.total} {time.monotonic():.6f} "
            f"{versions if outcome and versions else '-'}\n"
        )


@dataclass
class Reports:
    """What the agents reported, checked as it comes (``feed``)."""

    # (device, batch id) -> when first settled (applied or skipped)
    seen: dict[tuple[int, str], float] = field(default_factory=dict)
    applied: Counter[tuple[int, str]] = field(default_factory=Counter)
    # device -> (agent process life, job id, position) of the last batch it settled
    last: dict[int, tuple[int, str, int]] = field(default_factory=dict)
    newest: dict[tuple[int, int], int] = field(default_factory=dict)  # (device, id) -> version
    out_of_place: list[str] = field(default_factory=list)
    older: list[str] = field(default_factory=list)
    unchecked: int = 0  # first batches of an agent's life, of position > 1
    pushes: int = 0

    def feed(self, life: int, line: bytes) -> None:
        parts = line.decode().split()
        if len(parts) != 9 or parts[0] != "b":
            return
        device, kind, batch, job = int(parts[1]), parts[2], parts[3], parts[4]
        position, at = int(parts[5]), float(parts[7])
        self.seen.setdefault((device, batch), at)
        previous = self.last.get(device)
        if position > 1:
            if previous is None or previous[0] != life:
                self.unchecked += 1
            elif previous[1:] != (job, position - 1):
                self.out_of_place.append(
                    f"device {device}: batch {batch} ({job} {position}/{parts[6]}) after "
                    f"{previous[1]} {previous[2]}"
                )
        self.last[device] = (life, job, position)
        if kind != "A":
            return
        self.applied[device, batch] += 1
        self.pushes += job.startswith("follow.")
        if parts[8] == "-":
            return
        for pair in parts[8].split(","):
            object_id, version = (int(value) for value in pair.split(":"))
            known = self.newest.get((device, object_id), 0)
            if version < known:
                self.older.append(
                    f"device {device}: #{object_id} at version {version} after {known} ({job})"
                )
            self.newest[device, object_id] = max(known, version)

    @property
    def twice(self) -> int:
        return sum(1 for count in self.applied.values() if count > 1)


@dataclass
class AgentProcess:
    """One agent process for a share of the devices; started again after a kill."""

    number: int
    spec: Path
    devices: list[int]
    folder: Path
    reports: Reports
    process: asyncio.subprocess.Process | None = None
    life: int = 0
    reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.life += 1
        with (self.folder / f"agents-{self.number}-{self.life}.log").open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "bench.chaos", "--serve-devices", str(self.spec)),
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        assert self.process.stdout is not None
        # Agents started first apply what waits in their queues while the others start.
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            while (line := await self.process.stdout.readline()) != b"ready\n":
                if not line:
                    raise RuntimeError(f"agent process {self.number} failed; logs in {self.folder}")
                self.reports.feed(self.life, line)
        self.reader = asyncio.create_task(self._read(self.process, self.life))

    async def _read(self, process: asyncio.subprocess.Process, life: int) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            self.reports.feed(life, line)

    async def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(60):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
        if self.reader is not None:
            await self.reader


def _agent_urls(amqp_urls: str, device_id: str, secret: str) -> str:
    """Every node's URL with the device's own account."""
    user = quote(device_account(device_id), safe="")
    return ",".join(
        f"amqp://{user}:{quote(secret, safe='')}@{urlsplit(url).netloc.rsplit('@', 1)[1]}/"
        for url in amqp_urls.split(",")
    )


# The server side.


@dataclass
class Workers:
    env: dict[str, str]
    folder: Path
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    starts: int = 0

    async def start(self, index: int | None = None) -> None:
        """Worker ``index`` (0-based) again, or a new one."""
        self.starts += 1
        process = await start_worker(
            self.env,
            self.folder / f"worker-chaos-{self.starts}.log",
            model=str(FOLLOW_MODEL),
            batch_size=str(BATCH_SIZE),
            **_UNLIMITED_DEVICES,
        )
        if index is None:
            self.processes.append(process)
        else:
            self.processes[index] = process


@dataclass
class Job:
    n: int
    device: int
    named: tuple[int, ...]
    job_id: str
    submitted: float = 0.0  # time.monotonic() of the first attempt
    result: SyncResult | None = None
    answered: float = 0.0
    attempts: int = 0


@dataclass
class Healed:
    fault: Fault
    at: float  # time.monotonic() when healed
    devices: frozenset[int] | None  # an agent fault: the devices of that process


@dataclass
class Soak:
    cluster: Cluster
    client: SyncClient
    workers: Workers
    agents: list[AgentProcess]
    reports: Reports
    device_ids: list[str]
    ids: list[int]
    jobs: list[Job] = field(default_factory=list)
    healed: list[Healed] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    give_up_at: float = math.inf
    faults_done: asyncio.Event = field(default_factory=asyncio.Event)
    sent: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))  # device -> ids


# Faults.


def _signal(process: asyncio.subprocess.Process | None, signum: int) -> None:
    if process is not None and process.returncode is None:
        process.send_signal(signum)


async def _inject(soak: Soak, fault: Fault) -> Healed:
    """Inject ``fault``, hold it, heal it; when it was healed."""
    cluster, hold, target = soak.cluster, fault.hold, fault.target
    devices: frozenset[int] | None = None
    if fault.kind == "node":
        await cluster.script("stop-node", str(target))
        await asyncio.sleep(hold)
        await cluster.script("start-node", str(target))
    elif fault.kind == "postgresql":
        await cluster.script("restart-postgresql")
    elif fault.kind == "alarm":
        await cluster.script(
            "rabbitmqctl", "-q", "set_vm_memory_high_watermark", ALARM_WATERMARK, node=target
        )
        await asyncio.sleep(hold)
        await cluster.script(
            "rabbitmqctl", "-q", "set_vm_memory_high_watermark", DEFAULT_WATERMARK, node=target
        )
    elif fault.kind.startswith("worker-"):
        process = soak.workers.processes[target - 1]
        if fault.kind == "worker-kill":
            process.kill()
            await process.wait()
            await asyncio.sleep(hold)
            await soak.workers.start(target - 1)
        else:
            _signal(process, signal.SIGSTOP)
            await asyncio.sleep(hold)
            _signal(process, signal.SIGCONT)
    else:
        agent = soak.agents[target - 1]
        devices = frozenset(agent.devices)
        if fault.kind == "agent-kill":
            assert agent.process is not None
            agent.process.kill()
            await agent.process.wait()
            if agent.reader is not None:
                await agent.reader
            await asyncio.sleep(hold)
            await agent.start()
        else:
            _signal(agent.process, signal.SIGSTOP)
            await asyncio.sleep(hold)
            _signal(agent.process, signal.SIGCONT)
    return Healed(fault, time.monotonic(), devices)


async def _faults(soak: Soak, seed: int, jobs: int, kinds: Sequence[str]) -> None:
    """Whole rounds of the schedule, one fault at a time, until ``jobs`` jobs were sent."""
    await asyncio.sleep(QUIET_START_S)
    try:
        for fault in schedule(seed, kinds):
            # Whole rounds: a new one only while jobs remain to be sent.
            if fault.number % len(kinds) == 1 and len(soak.jobs) >= jobs:
                return
            started = time.monotonic()
            progress(f"chaos: fault {fault}")
            healed = await _inject(soak, fault)
            soak.healed.append(healed)
            progress(
                f"chaos: fault #{fault.number} {fault.kind} healed after "
                f"{healed.at - started:.1f} s"
            )
            await asyncio.sleep(fault.gap)
    finally:
        soak.faults_done.set()


# The stream and the writer.


async def _run_job(soak: Soak, job: Job) -> None:
    """Until the job has its result (sent again with the same job id), or the soak gives
    up on it."""
    session = Session(user_id=USER, device_id=soak.device_ids[job.device])
    objects = [ObjectRef(ENTITY, object_id) for object_id in job.named]
    job.submitted = time.monotonic()
    while True:
        job.attempts += 1
        try:
            job.result = await soak.client.synchronize_to_device(
                session, objects=objects, job_id=job.job_id, timeout=ATTEMPT_TIMEOUT_S
            )
        except RETRIED as error:
            soak.failures[type(error).__name__] += 1
            if time.monotonic() > soak.give_up_at:
                return
            await asyncio.sleep(RETRY_PAUSE_S)
        else:
            job.answered = time.monotonic()
            if job.result.status == "done":
                soak.sent[job.device].update(job.named)
            return


async def _stream(soak: Soak, jobs: int, rate: float, rng: random.Random) -> None:
    """Jobs at ``rate`` a second until ``jobs`` were sent and the faults are done (plus
    ``TAIL_S``), at most ``IN_FLIGHT`` awaited at once; then until each has its result
    or ``GIVE_UP_S`` passed."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    started = time.monotonic()
    tail_from: float | None = None

    async def one(job: Job) -> None:
        try:
            await _run_job(soak, job)
        finally:
            gate.release()

    async with asyncio.TaskGroup() as group:
        for n in range(sys.maxsize):
            if len(soak.jobs) >= jobs and soak.faults_done.is_set():
                tail_from = tail_from or time.monotonic()
                if time.monotonic() - tail_from >= TAIL_S:
                    break
            due = started + n / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await gate.acquire()
            named = tuple(rng.sample(soak.ids, rng.randint(1, MAX_NAMED)))
            job = Job(n, rng.randrange(len(soak.device_ids)), named, SyncClient.new_job_id())
            soak.jobs.append(job)
            group.create_task(one(job))
            if n % 1000 == 999:
                done = sum(1 for j in soak.jobs if j.result is not None)
                progress(f"chaos: {n + 1:,} jobs sent, {done:,} answered")
        soak.give_up_at = time.monotonic() + GIVE_UP_S
        progress(f"chaos: {len(soak.jobs):,} jobs sent in {time.monotonic() - started:.0f} s")


async def _writer(soak: Soak, stop: asyncio.Event) -> int:
    """Updates of work orders already sent, ``WRITES_PER_S`` a second, until ``stop``;
    through PostgreSQL restarts. Returns how many were committed."""
    rng = random.Random(0)
    written = 0
    conn: asyncpg.Connection | None = None
    statement = f"UPDATE {TABLE} SET internal_note = $2 WHERE id = $1"
    try:
        while not stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / WRITES_PER_S)
            held = [object_id for sent in list(soak.sent.values()) for object_id in sent]
            if stop.is_set() or not held:
                continue
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(soak.cluster.database_url)
                await conn.execute(statement, rng.choice(held), f"note {written}")
                written += 1
            except (
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
                OSError,
            ):
                # PostgreSQL restarted: a connection of its own again.
                soak.failures["writer"] += 1
                if conn is not None:
                    conn.terminate()
                conn = None
    finally:
        if conn is not None:
            await conn.close()
    return written


# The drain and the checks.


async def _drained(soak: Soak) -> float:
    """Seconds until the outbox, ``sync.jobs`` and every device queue are empty, twice
    in a row 2 s apart; raises after ``DRAIN_TIMEOUT_S``."""
    started = time.monotonic()
    conn = await asyncpg.connect(soak.cluster.database_url)
    quiet = 0
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while quiet < 2:
                await asyncio.sleep(2)
                outbox = await conn.fetchval("SELECT count(*) FROM sync.change")
                listing = await soak.cluster.script(
                    "rabbitmqctl", "-q", "list_queues", "name", "messages"
                )
                rows = (line.split("\t") for line in listing.splitlines() if "\t" in line)
                waiting = sum(
                    int(count)
                    for name, count in rows
                    if name == JOBS_QUEUE.name or name.startswith("device.")
                )
                quiet = quiet + 1 if outbox == 0 and waiting == 0 else 0
    finally:
        await conn.close()
    return time.monotonic() - started


def _read_device(path: Path) -> tuple[set[str], dict[int, tuple[int, str]]]:
    """The batch ids a device applied, and the version and note of each work order."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        batches = {str(row[0]) for row in db.execute("SELECT batch_id FROM applied_batches")}
        state = db.execute(
            "SELECT id, version, json_extract(data, '$.internal_note') FROM objects "
            "WHERE entity = ?",
            (ENTITY,),
        ).fetchall()
    finally:
        db.close()
    return batches, {int(i): (int(v), str(note)) for i, v, note in state}


async def _latest(database_url: str) -> dict[int, tuple[int, str]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(f"SELECT id, version, internal_note FROM {TABLE}")
    finally:
        await conn.close()
    return {int(row["id"]): (int(row["version"]), str(row["internal_note"])) for row in rows}


@dataclass(frozen=True)
class Checked:
    lost: list[str]
    stale: list[str]


async def _check(soak: Soak, folder: Path) -> Checked:
    """Loss and staleness, per device, against each device's SQLite file."""
    lost = [
        f"job {job.job_id} for device {job.device}: "
        + (
            f"no result after {job.attempts} attempts"
            if job.result is None
            else f"{job.result.status} ({job.result.reason}), synced {job.result.synced} "
            f"of {len(set(job.named))}"
        )
        for job in soak.jobs
        if job.result is None
        or job.result.status != "done"
        or job.result.synced != len(set(job.named))
    ]
    latest = await _latest(soak.cluster.database_url)
    stale: list[str] = []
    by_device: dict[int, list[Job]] = defaultdict(list)
    for job in soak.jobs:
        if job.result is not None and job.result.status == "done":
            by_device[job.device].append(job)
    for device, device_id in enumerate(soak.device_ids):
        applied, state = await asyncio.to_thread(_read_device, folder / f"{device_id}.sqlite")
        expected = {b for job in by_device[device] if job.result for b in job.result.batch_ids}
        missing = expected - applied
        if missing:
            lost.append(f"device {device}: {len(missing)} batches of its results not applied")
        absent = soak.sent[device] - state.keys()
        if absent:
            lost.append(f"device {device}: {len(absent)} objects named are not on it")
        stale += [
            f"device {device}: #{object_id} is {state[object_id]}, PostgreSQL "
            f"{latest.get(object_id)}"
            for object_id in sorted(soak.sent[device] & state.keys())
            if state[object_id] != latest.get(object_id)
        ]
    return Checked(lost, stale)


async def _sweep(soak: Soak) -> None:
    """One job per device naming every work order sent to it; until applied."""

    async def one(device: int) -> None:
        job = Job(-1, device, tuple(sorted(soak.sent[device])), SyncClient.new_job_id())
        soak.give_up_at = time.monotonic() + GIVE_UP_S
        await _run_job(soak, job)
        if job.result is None or job.result.status != "done":
            raise RuntimeError(f"the sweep of device {device} failed: {job.result}")

    await asyncio.gather(*(one(device) for device in soak.sent))
    await _drained(soak)


def _recoveries(soak: Soak) -> list[tuple[Healed, float | None]]:
    """Per fault healed, seconds from its healing until the first job sent after it was
    complete (result back, every batch seen on its device); ``None`` if none was."""
    completed: list[tuple[float, float, int]] = []  # (sent, complete, device)
    for job in soak.jobs:
        if job.result is None or job.result.status != "done":
            continue
        seen = [soak.reports.seen.get((job.device, b)) for b in job.result.batch_ids]
        if all(at is not None for at in seen):
            complete = max([job.answered, *(at for at in seen if at is not None)])
            completed.append((job.submitted, complete, job.device))
    recoveries: list[tuple[Healed, float | None]] = []
    for healed in soak.healed:
        after = [
            complete
            for sent, complete, device in completed
            if sent >= healed.at and (healed.devices is None or device in healed.devices)
        ]
        recoveries.append((healed, min(after) - healed.at if after else None))
    return recoveries


# The run.


async def _register(cluster: Cluster, device_ids: Sequence[str]) -> dict[str, str]:
    """Each device as ``syncctl device add`` registers it, with a quorum queue; returns
    each one's agent URLs (every node, its own account)."""
    node_1 = cluster.urls["SYNC_AMQP_URL"]
    accounts = BrokerAccounts(cluster.urls["SYNC_MANAGEMENT_URL"], node_1)
    conn = await asyncpg.connect(cluster.database_url)
    connection = await connect(node_1, "bench-chaos-register")
    try:
        channel = await open_channel(connection)
        await declare_topology(channel)
        urls = {}
        for device_id in device_ids:
            secret = await register_device(
                conn, channel, accounts, device_id, USER, queue_type="quorum"
            )
            assert secret is not None
            urls[device_id] = _agent_urls(cluster.amqp_urls, device_id, secret)
    finally:
        await connection.close()
        await conn.close()
    return urls


@asynccontextmanager
async def _soak(cluster: Cluster, folder: Path) -> AsyncIterator[Soak]:
    """Everything the stream needs, as the module's docstring says; stopped after."""
    started = time.monotonic()
    ids = await prepare_followed(cluster.database_url, OBJECTS)
    device_ids = [f"chaos-{uuid.uuid4().hex[:6]}-{n:03d}" for n in range(DEVICES)]
    urls = await _register(cluster, device_ids)
    progress(f"chaos: {DEVICES} devices registered in {time.monotonic() - started:.0f} s")
    reports = Reports()
    agents = []
    for n in range(AGENT_PROCESSES):
        mine = list(range(DEVICES))[n::AGENT_PROCESSES]
        spec = folder / f"agents-{n + 1}.json"
        spec.write_text(
            json.dumps(
                {
                    "amqp_url": cluster.amqp_urls,
                    "devices": [
                        [i, device_ids[i], str(folder / f"{device_ids[i]}.sqlite")] for i in mine
                    ],
                    "urls": {device_ids[i]: urls[device_ids[i]] for i in mine},
                }
            )
        )
        agents.append(AgentProcess(n + 1, spec, mine, folder, reports))
    worker_env = {**cluster.urls, "SYNC_AMQP_URL": cluster.amqp_urls}
    workers = Workers(worker_env, folder)
    async with AsyncExitStack() as stack:
        for agent in agents:
            stack.push_async_callback(agent.stop)
            await agent.start()
        progress(
            f"chaos: agents in {AGENT_PROCESSES} processes, {time.monotonic() - started:.0f} s"
        )
        stack.push_async_callback(lambda: terminate_workers(workers.processes))
        for _ in range(WORKERS):
            await workers.start()
        client = await stack.enter_async_context(
            await SyncClient.connect(cluster.amqp_urls, name="bench-chaos")
        )
        progress(f"chaos: {WORKERS} workers and the client, {time.monotonic() - started:.0f} s")
        yield Soak(cluster, client, workers, agents, reports, device_ids, ids)


def _figures(
    soak: Soak,
    checked: Checked,
    stale_after_sweep: int,
    recoveries: list[tuple[Healed, float | None]],
    extra: dict[str, float],
    seed: int,
) -> list[Figure]:
    reports = soak.reports
    done = sum(1 for job in soak.jobs if job.result is not None and job.result.status == "done")
    reordered = len(reports.out_of_place) + len(reports.older)
    measured = [seconds for _, seconds in recoveries if seconds is not None]
    per_kind: dict[str, float] = {}
    for healed, seconds in recoveries:
        if seconds is not None:
            key = f"max_recovery_s_{healed.fault.kind}"
            per_kind[key] = max(per_kind.get(key, 0.0), seconds)
    faults = Counter(healed.fault.kind for healed in soak.healed)
    note = (
        f"seed {seed}; {len(soak.jobs):,} jobs of 1-{MAX_NAMED} work orders over {DEVICES} "
        f"devices (quorum device queues, agents in {AGENT_PROCESSES} processes), "
        f"{WORKERS} workers, a 3-node cluster; {len(soak.healed)} faults: "
        + ", ".join(f"{kind} {count}" for kind, count in sorted(faults.items()))
    )

    def figure(name: str, value: float, unit: str, more: dict[str, float] | None = None) -> Figure:
        return Figure(
            f"chaos: {name}",
            unit,
            (value,),
            kind="info",
            higher_is_better=name == "jobs",
            note=note,
            extra={**extra, **(more or {})},
        )

    return [
        figure("jobs", done, "jobs", {"sent": float(len(soak.jobs))}),
        figure("lost", len(checked.lost), "count"),
        figure("applied twice", reports.twice, "count"),
        figure(
            "reordered",
            reordered,
            "count",
            {
                "out_of_place": float(len(reports.out_of_place)),
                "older_version": float(len(reports.older)),
                "unchecked_after_restart": float(reports.unchecked),
            },
        ),
        figure(
            "stale objects",
            len(checked.stale),
            "count",
            {"stale_after_sweep": float(stale_after_sweep)},
        ),
        figure(
            "max recovery s",
            max(measured, default=math.nan),
            "s",
            {**per_kind, "faults_without_recovery": float(len(recoveries) - len(measured))},
        ),
    ]


async def chaos(
    *,
    jobs: int = 10_000,
    rate: float = 12.0,
    seed: int | None = None,
    kinds: Sequence[str] = KINDS,
) -> list[Figure]:
    """The soak (see the module's docstring), on services of its own, with faults of
    ``kinds``; raises when anything was lost, applied twice, reordered or stale."""
    seed = random.SystemRandom().randrange(1, 1_000_000) if seed is None else seed
    rounds = max(1, math.ceil(jobs / rate / ROUND_S))
    planned = list(zip(range(rounds * len(kinds)), schedule(seed, kinds), strict=False))
    progress(f"chaos: seed {seed}; the schedule's first {rounds} round(s), one fault at a time:")
    for _, fault in planned:
        progress(f"chaos:   {fault}")
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    passed = False
    try:
        async with _cluster() as cluster, _soak(cluster, folder) as soak:
            stop_writer = asyncio.Event()
            writer = asyncio.create_task(_writer(soak, stop_writer))
            faults = asyncio.create_task(_faults(soak, seed, jobs, kinds))
            stream_started = time.monotonic()
            await _stream(soak, jobs, rate, random.Random(f"{seed} jobs"))
            stream_s = time.monotonic() - stream_started
            await faults
            stop_writer.set()
            written = await writer
            drain_s = await _drained(soak)
            progress(f"chaos: drained in {drain_s:.0f} s; checking the devices")
            checked = await _check(soak, folder)
            await _sweep(soak)
            stale_after_sweep = len((await _check(soak, folder)).stale)
            recoveries = _recoveries(soak)
            for healed, seconds in recoveries:
                shown = "none measured" if seconds is None else f"{seconds:.1f} s"
                progress(
                    f"chaos: fault #{healed.fault.number} {healed.fault.kind}: recovery {shown}"
                )
            extra = {
                "seed": float(seed),
                "stream_s": stream_s,
                "drain_s": drain_s,
                "run_s": time.monotonic() - started,
                "jobs_per_s": len(soak.jobs) / stream_s,
                "attempts": float(sum(job.attempts for job in soak.jobs)),
                "follow_writes": float(written),
                "push_batches_applied": float(soak.reports.pushes),
                **{f"failed_attempts_{name}": float(n) for name, n in soak.failures.items()},
            }
            figures = _figures(soak, checked, stale_after_sweep, recoveries, extra, seed)
        problems = [
            *checked.lost,
            *(
                f"applied twice: device {d}, batch {b}"
                for (d, b), c in soak.reports.applied.items()
                if c > 1
            ),
            *soak.reports.out_of_place,
            *soak.reports.older,
            *checked.stale,
        ]
        if problems or stale_after_sweep:
            shown = "\n  ".join(problems[:30])
            raise ChaosFailed(
                f"chaos soak (seed {seed}) failed: {len(problems)} problems, "
                f"{stale_after_sweep} stale after the sweep:\n  {shown}",
                figures,
            )
        passed = True
        return figures
    finally:
        if passed:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            progress(f"chaos: workers' and agents' logs and device files in {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs to send, at least")
    parser.add_argument("--rate", type=float, default=12.0, help="jobs sent a second")
    parser.add_argument("--seed", type=int, help="the faults' schedule (default: random, printed)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON here too")
    parser.add_argument(
        "--skip",
        action="append",
        choices=KINDS,
        default=[],
        help="leave out a kind of fault (repeatable)",
    )
    parser.add_argument("--serve-devices", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_devices is not None:
        asyncio.run(serve_devices(args.serve_devices, _ChaosAgent))
        return
    started = time.monotonic()
    failed: ChaosFailed | None = None
    try:
        kinds = [kind for kind in KINDS if kind not in args.skip]
        figures = asyncio.run(chaos(jobs=args.jobs, rate=args.rate, seed=args.seed, kinds=kinds))
    except ChaosFailed as error:
        failed, figures = error, error.figures
    if args.json is not None:
        args.json.write_text(as_json(figures) + "\n")
    print(as_table(figures))
    print(as_details(figures))
    print(f"(ran {time.monotonic() - started:.0f} s)")
    if failed is not None:
        sys.exit(str(failed))


if __name__ == "__main__":
    main()
