"""A three-node RabbitMQ cluster from the project's script (docs/cluster.md): every node up
and clustered, the jobs queue replicated on all three, device queues of the type the
operator chose.

The cluster runs apart from the suite's services, in its own data folder
(``SYNC_SERVICES_DIR``) on ports moved from the suite's, and is stopped at the end. It
costs about 40 s to start: ``-m "not cluster"`` leaves these tests out.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import asyncpg
import pytest

from broker import ObjectRef, Session, SyncClient, SyncResult
from broker.accounts import device_account
from broker.connection import connect, open_channel
from broker.errors import ProgramError
from broker.topology import JOBS_QUEUE, declare_topology, device_queue_name
from device_agent import AgentSettings, DeviceAgent, OfflineStore
from device_agent.agent import AppliedBatch
from syncctl.accounts import BrokerAccounts
from syncctl.devices import register_device, unregister_device
from tests.conftest import MODEL_PATH, ROOT

pytestmark = pytest.mark.cluster

SCRIPT = ROOT / "scripts" / "services.sh"
NODES = 3
# Each port of the suite's services (the same defaults as the script's), moved clear of
# them and of their neighbours (other checkouts move theirs by tens).
PORTS = {
    "SYNC_AMQP_PORT": (5673, 50),
    "SYNC_DIST_PORT": (25673, 50),
    "SYNC_MGMT_PORT": (15673, 50),
    "SYNC_PROM_PORT": (15693, 50),
    "SYNC_EPMD_PORT": (4370, 7),
    "SYNC_PG_PORT": (5433, 50),
}


@dataclass(frozen=True)
class Cluster:
    env: dict[str, str]  # the script's settings for this cluster
    urls: dict[str, str]  # what `services.sh env` prints

    def script(self, *args: str, node: int = 1) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "SYNC_RABBIT_NODE": str(node)}
        return subprocess.run(
            ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120
        )

    def members(self, queue: str) -> list[str]:
        """The nodes holding a replica of ``queue`` (a classic queue: its node)."""
        listed = self.script(
            "rabbitmqctl", "-q", "list_queues", "name", "type", "members", "pid",
            "--formatter", "json",
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        for row in json.loads(listed.stdout):
            if row["name"] == queue:
                if row["type"] == "quorum":
                    return sorted(row["members"])
                return [row["pid"].split(".")[0].removeprefix("<")]
        raise AssertionError(f"no queue {queue}")

    def queue_type(self, queue: str) -> str:
        listed = self.script("rabbitmqctl", "-q", "list_queues", "name", "type")
        assert listed.returncode == 0, listed.stderr
        types = dict(line.split("\t") for line in listed.stdout.splitlines())
        return types[queue]

    async def syncctl(self, *args: str, **env: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "syncctl",
            *args,
            env={**os.environ, **self.urls, "SYNC_MODEL": str(MODEL_PATH), **env},
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, output.decode()
        return output.decode()


def _node_names(env: dict[str, str]) -> list[str]:
    name, host = env["SYNC_RABBIT_NODENAME"].split("@")
    return [f"{name}{'' if k == 1 else k}@{host}" for k in range(1, NODES + 1)]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    env = {
        **os.environ,
        **{
            name: str(int(os.environ.get(name, default)) + offset)
            for name, (default, offset) in PORTS.items()
        },
        "SYNC_RABBIT_NODES": str(NODES),
        "SYNC_RABBIT_NODENAME": "synccluster@localhost",
        "SYNC_SERVICES_DIR": str(ROOT / ".services" / "cluster-test"),
    }
    env.pop("SYNC_RABBIT_NODE", None)
    started = subprocess.run(
        ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300
    )
    try:
        assert started.returncode == 0, started.stderr
        urls = dict(
            line.removeprefix("export ").split("=", 1)
            for line in started.stdout.splitlines()
            if line.startswith("export ")
        )
        yield Cluster(env, urls)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=300)


def test_status_reports_every_node_running_and_clustered(cluster: Cluster):
    status = cluster.script("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for name in _node_names(cluster.env):
        assert f"({name}, clustered)" in status.stdout
    assert len(cluster.urls["SYNC_AMQP_URLS"].split(",")) == NODES
    assert cluster.urls["SYNC_AMQP_URLS"].startswith(cluster.urls["SYNC_AMQP_URL"] + ",")


async def test_the_jobs_queue_has_a_replica_on_every_node(cluster: Cluster):
    connection = await connect(cluster.urls["SYNC_AMQP_URL"], "test-cluster")
    async with connection:
        await declare_topology(await open_channel(connection))
    assert cluster.members(JOBS_QUEUE.name) == sorted(_node_names(cluster.env))


@pytest.fixture(scope="module")
async def cluster_schema(cluster: Cluster) -> None:
    await cluster.syncctl("db", "init", "--create-tables")


@pytest.mark.usefixtures("cluster_schema")
@pytest.mark.parametrize(
    ("setting", "queue_type", "replicas"), [(None, "classic", 1), ("quorum", "quorum", NODES)]
)
async def test_registration_declares_the_device_queue_of_the_chosen_type(
    cluster: Cluster, setting: str | None, queue_type: str, replicas: int
):
    device_id = f"test-{uuid.uuid4().hex[:12]}"
    env = {"SYNC_DEVICE_QUEUE_TYPE": setting} if setting else {}
    await cluster.syncctl("device", "add", device_id, "--user", "7", **env)
    try:
        queue = device_queue_name(device_id)
        assert cluster.queue_type(queue) == queue_type
        assert len(cluster.members(queue)) == replicas
    finally:
        await cluster.syncctl("device", "remove", device_id)


# The node-loss test (issue 15): a job stream over many devices while a node is stopped
# and later started again.

NODE_LOSS_DEVICES = 12
NODE_LOSS_TASKS = 60
# Jobs a second, and seconds between the steps (stop, start, end).
NODE_LOSS_RATE = 10
NODE_LOSS_CALM = 6.0
# Driver and broker errors a call sees when its node dies; the caller retries.
_CALL_FAILED = (TimeoutError, ProgramError, ConnectionError, aio_pika.exceptions.AMQPError)


def _node_urls(base: str, user: str, secret: str) -> list[str]:
    """The URLs of the three nodes (node K on the base port + K - 1), logging in as
    ``user``."""
    port = int(base.rsplit(":", 1)[1].split("/")[0])
    return [f"amqp://{quote(user, safe='')}:{secret}@127.0.0.1:{port + k}/" for k in range(NODES)]


def _first(urls: list[str], node: int) -> str:
    """``urls`` as one setting, node ``node`` first: the connection starts on it."""
    return ",".join([urls[node - 1], *(url for k, url in enumerate(urls, 1) if k != node)])


@dataclass
class _Fleet:
    conn: asyncpg.Connection
    sessions: list[Session]
    task_ids: list[int]
    folder: Path
    # Every batch the agents applied, in the order they applied them.
    applied: list[AppliedBatch] = field(default_factory=list)


@asynccontextmanager
async def _fleet(cluster: Cluster, folder: Path) -> AsyncIterator[_Fleet]:
    """Two workers (one on node 2, which the test stops) and devices with quorum queues
    and running agents (every other one on node 2), all given every node's URL."""
    urls = cluster.urls
    conn = await asyncpg.connect(urls["SYNC_DATABASE_URL"])
    operator = await connect(urls["SYNC_AMQP_URL"], "test-node-loss")
    accounts = BrokerAccounts(urls["SYNC_MANAGEMENT_URL"], urls["SYNC_AMQP_URL"])
    device_ids = [f"loss-{uuid.uuid4().hex[:10]}" for _ in range(NODE_LOSS_DEVICES)]
    stop = asyncio.Event()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(conn.close)
        stack.push_async_callback(operator.close)
        channel = await open_channel(operator)
        await declare_topology(channel)
        await conn.execute(
            "TRUNCATE t_task, sync.device, sync.holding, sync.user_role, sync.job_result "
            "RESTART IDENTITY"
        )
        await conn.execute("INSERT INTO sync.user_role VALUES (7, 'Admin')")
        rows = await conn.fetch(
            "INSERT INTO t_task (title, status) SELECT 'v0', 'open' "
            "FROM generate_series(1, $1) RETURNING id",
            NODE_LOSS_TASKS,
        )
        fleet = _Fleet(
            conn,
            [Session(user_id=7, device_id=d) for d in device_ids],
            [r["id"] for r in rows],
            folder,
        )
        operators = _node_urls(urls["SYNC_AMQP_URL"], "sync", "sync")
        for number, node in enumerate((2, 3)):
            env = {
                **os.environ,
                **urls,
                "SYNC_AMQP_URL": _first(operators, node),
                "SYNC_MODEL": str(MODEL_PATH),
                "SYNC_BATCH_SIZE": "2",
            }
            worker = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", "--name", f"loss-{number}",
                env=env, cwd=ROOT, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            stack.push_async_callback(_ended, worker)
        agents: list[asyncio.Task[None]] = []
        for index, device_id in enumerate(device_ids):
            secret = await register_device(
                conn, channel, accounts, device_id, 7, queue_type="quorum"
            )
            assert secret is not None
            stack.push_async_callback(unregister_device, conn, channel, accounts, device_id)
            mine = _node_urls(urls["SYNC_AMQP_URL"], device_account(device_id), secret)
            settings = AgentSettings(
                amqp_url=_first(mine, 2 if index % 2 else 1),
                device_id=device_id,
                db_path=folder / f"{device_id}.sqlite",
            )
            agent = await DeviceAgent.start(settings, on_applied=fleet.applied.append)
            agents.append(asyncio.create_task(agent.run(stop)))
        stack.push_async_callback(_stopped, stop, agents)
        yield fleet


async def _stopped(stop: asyncio.Event, agents: list[asyncio.Task[None]]) -> None:
    stop.set()
    await asyncio.gather(*agents, return_exceptions=True)


async def _ended(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        await process.wait()


@dataclass
class _Stream:
    """Jobs in flight, each retried with its job id until it is answered."""

    client: SyncClient
    fleet: _Fleet
    results: dict[str, tuple[Session, SyncResult]] = field(default_factory=dict)
    answered_at: list[float] = field(default_factory=list)
    submitted: int = 0
    retries: int = 0
    # The writes share the fleet's one connection.
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def job(self, number: int, rng: random.Random) -> None:
        session = self.fleet.sessions[number % len(self.fleet.sessions)]
        ids = rng.sample(self.fleet.task_ids, rng.randint(1, 4))
        if number % 10 == 0:
            async with self.writing:
                await self.fleet.conn.execute(
                    "UPDATE t_task SET title = $1 WHERE id = ANY($2::bigint[])",
                    f"v{number}",
                    rng.sample(self.fleet.task_ids, 3),
                )
        job_id = f"loss-{number}-{uuid.uuid4().hex[:8]}"
        async with asyncio.timeout(120):
            while True:
                try:
                    result = await self.client.synchronize_to_device(
                        session,
                        objects=[ObjectRef("Task", i) for i in ids],
                        job_id=job_id,
                        timeout=5,
                    )
                    break
                except _CALL_FAILED:
                    # The call's node died, or its result is late: the same job again.
                    self.retries += 1
                    await asyncio.sleep(0.5)
        self.results[job_id] = (session, result)
        self.answered_at.append(time.monotonic())

    def answered_between(self, start: float, end: float) -> int:
        return sum(start < moment < end for moment in self.answered_at)

    def first_answer_after(self, moment: float) -> float:
        return min((t for t in self.answered_at if t > moment), default=float("inf")) - moment

    def longest_silence(self) -> float:
        """The longest time without an answer while jobs were in flight."""
        times = sorted(self.answered_at)
        return max((later - earlier for earlier, later in itertools.pairwise(times)), default=0)


async def _stream_through_a_node_loss(cluster: Cluster, stream: _Stream) -> dict[str, float]:
    """Jobs at ``NODE_LOSS_RATE`` a second while node 2 is stopped and later started
    again; returns when each step of that ended."""
    rng = random.Random(15)
    gate = asyncio.Semaphore(16)
    steps: dict[str, float] = {}

    async def one(number: int) -> None:
        async with gate:
            await stream.job(number, rng)

    async def step(name: str, *command: str, after: float) -> None:
        await asyncio.sleep(after)
        steps[f"{name} from"] = time.monotonic()
        done = await asyncio.to_thread(cluster.script, *command)
        assert done.returncode == 0, done.stderr
        steps[name] = time.monotonic()

    async with asyncio.TaskGroup() as group:
        faults = group.create_task(
            _in_turn(
                step("stopped", "stop-node", "2", after=NODE_LOSS_CALM),
                step("started", "start-node", "2", after=NODE_LOSS_CALM),
                asyncio.sleep(NODE_LOSS_CALM),
            )
        )
        while not faults.done():
            group.create_task(one(stream.submitted))
            stream.submitted += 1
            await asyncio.sleep(1 / NODE_LOSS_RATE)
    return steps


async def _in_turn(*steps: Coroutine[Any, Any, None]) -> None:
    for one in steps:
        await one


async def _swept(stream: _Stream) -> dict[str, set[int]]:
    """Each device reads once more everything it was sent (so it must end with
    PostgreSQL's latest state), until applied; returns what each device was sent."""
    sent: dict[str, set[int]] = {session.device_id: set() for session in stream.fleet.sessions}
    batches: set[str] = set()
    for session, result in stream.results.values():
        sent[session.device_id].update(outcome.id for outcome in result.objects)
        batches.update(result.batch_ids)
    for session in stream.fleet.sessions:
        objects = [ObjectRef("Task", i) for i in sorted(sent[session.device_id])]
        result = await stream.client.synchronize_to_device(session, objects=objects)
        batches.update(result.batch_ids)
    async with asyncio.timeout(60):
        while not batches <= {batch.batch_id for batch in stream.fleet.applied}:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    return sent


async def _stale(fleet: _Fleet, sent: dict[str, set[int]]) -> list[tuple[str, int]]:
    """The objects a device holds in another state than PostgreSQL's latest."""
    latest = dict(await fleet.conn.fetch("SELECT id, title FROM t_task"))
    stale = []
    for device_id, ids in sent.items():
        store = await OfflineStore.open(fleet.folder / f"{device_id}.sqlite")
        try:
            for object_id in sorted(ids):
                held = await store.get_committed("Task", object_id)
                if held is None or held["title"] != latest[object_id]:
                    stale.append((device_id, object_id))
        finally:
            await store.close()
    return stale


def _out_of_order(applied: list[AppliedBatch]) -> list[tuple[str, str, int]]:
    """The batches applied out of their job's order, per device: each must follow the
    batch before it in its job, or start the job's stream again (a job read again after
    its worker lost its node publishes its batches anew)."""
    wrong = []
    last: dict[str, AppliedBatch] = {}
    for batch in applied:
        before = last.get(batch.device_id)
        follows = (
            before is not None
            and before.job_id == batch.job_id
            and batch.position == before.position + 1
        )
        if not follows and batch.position != 1:
            wrong.append((batch.device_id, batch.job_id, batch.position))
        last[batch.device_id] = batch
    return wrong


async def test_a_node_stopped_mid_stream_loses_nothing_and_reorders_nothing(
    cluster: Cluster, cluster_schema: None, tmp_path: Path
):
    async with _fleet(cluster, tmp_path) as fleet:
        # The caller starts on the node that stops: its waiting calls fail and are retried.
        operators = _node_urls(cluster.urls["SYNC_AMQP_URL"], "sync", "sync")
        async with await SyncClient.connect(_first(operators, 2), name="test-loss") as client:
            stream = _Stream(client, fleet)
            steps = await _stream_through_a_node_loss(cluster, stream)

            # Jobs went on while the node was down: its clients moved to the others.
            assert stream.answered_between(steps["stopped"], steps["started from"]) > 0
            # Nothing lost: every job answered done, with every object it named synced.
            assert len(stream.results) == stream.submitted
            for _, result in stream.results.values():
                assert (result.status, result.synced) == ("done", len(result.objects))
            sent = await _swept(stream)
        assert await _stale(fleet, sent) == []
        # Each batch applied once, each job's batches in their order.
        counted = Counter((batch.device_id, batch.batch_id) for batch in fleet.applied)
        assert max(counted.values()) == 1
        assert _out_of_order(fleet.applied) == []
        print(
            f"node loss: {stream.submitted} jobs, {stream.retries} calls retried; longest "
            f"time without an answer {stream.longest_silence():.1f} s; first answer "
            f"{stream.first_answer_after(steps['stopped']):.2f} s after the node was down, "
            f"{stream.first_answer_after(steps['started']):.2f} s after it was back"
        )
