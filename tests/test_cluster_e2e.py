"""A three-node RabbitMQ cluster from the project's script (docs/cluster.md): every node up
and clustered, the jobs queue replicated on all three, device queues of the type the
operator chose.

The cluster runs apart from the suite's services, in its own data folder
(``SYNC_SERVICES_DIR``) on ports moved from the suite's, and is stopped at the end. It
costs about 40 s to start: ``-m "not cluster"`` leaves these tests out.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from broker.connection import connect, open_channel
from broker.topology import JOBS_QUEUE, declare_topology, device_queue_name
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
