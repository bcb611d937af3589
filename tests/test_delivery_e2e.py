"""Delivery guarantees of SPEC §7 that the foundation covers: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from functools import partial

import pytest

from broker import ChangeBatch, ObjectList, ObjectRef, SyncClient, SyncJob, UpsertChange
from broker.publishing import json_message
from broker.topology import CHANGES_EXCHANGE
from device_agent import AgentSettings, AppliedBatch, DeviceAgent
from tests.conftest import ROOT, WORKER_ROLE, MakeDevice, Services, insert, sync_settled, wait_for

pytestmark = pytest.mark.usefixtures("worker")


async def _spawn_agent(device) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "device_agent",
        "--device",
        device.device_id,
        "--db",
        str(device.db_path),
        "--prefetch",
        "1",
        env={**os.environ, "SYNC_AMQP_URL": device.amqp_url},
        cwd=ROOT,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def test_agent_killed_mid_stream_applies_every_batch_exactly_once(
    client: SyncClient, make_device: MakeDevice, pg, services: Services
):
    device = await make_device(7, ["Admin"], run_agent=False)
    ids = [
        record["id"]
        for record in await pg.fetch(
            "INSERT INTO t_task (title) SELECT 'task ' || g FROM generate_series(1, 3000) g "
            "RETURNING id"
        )
    ]
    result = await client.synchronize_to_device(
        device.session, lists=[ObjectList("Task", ids)], timeout=30
    )
    assert result.synced == 3000 and len(result.batch_ids) == 60

    kills = 0
    while True:
        agent = await _spawn_agent(device)
        applied_before = len(await device.store.applied_batch_ids(result.batch_ids))
        target = min(applied_before + 10, len(result.batch_ids))
        await wait_for(partial(_applied_at_least, device, result.batch_ids, target), timeout=20)
        if len(await device.store.applied_batch_ids(result.batch_ids)) == len(result.batch_ids):
            agent.send_signal(signal.SIGTERM)
            await agent.wait()
            break
        agent.kill()  # SIGKILL: no chance to finish the batch in hand
        await agent.wait()
        kills += 1

    assert kills >= 1, "the agent finished before it could be killed mid-stream"
    assert await device.store.ids("Task") == sorted(ids)
    rows = await pg.fetch("SELECT id, version, title FROM t_task")
    for row in rows:
        assert await device.store.version("Task", row["id"]) == row["version"]
        assert (await device.store.get_committed("Task", row["id"]) or {})["title"] == row["title"]


async def _applied_at_least(device, batch_ids, count: int) -> bool:
    return len(await device.store.applied_batch_ids(batch_ids)) >= count


async def test_redelivered_batch_changes_nothing(
    client: SyncClient, make_device: MakeDevice, pg, amqp
):
    device = await make_device(7, ["Admin"])
    task = await insert(pg, "t_task", title="server")
    version = await pg.fetchval("SELECT version FROM t_task WHERE id = $1", task)
    batch = ChangeBatch(
        batch_id=uuid.uuid4().hex,
        job_id="redelivery",
        device_id=device.device_id,
        position=1,
        total=1,
        changes=(UpsertChange(entity="Task", id=task, version=version, data={"title": "server"}),),
    )
    changes = await amqp.get_exchange(CHANGES_EXCHANGE.name)
    body = batch.model_dump_json().encode()
    await changes.publish(json_message(body), routing_key=device.device_id)
    await device.store.wait_for_batches([batch.batch_id], timeout=10)

    # The app commits a change on the device; a second delivery of the same batch must not
    # override it (a fresh batch would, by design).
    await device.store.change("Task", task, title="offline edit")
    await device.store.commit("Task", task)
    await changes.publish(json_message(body), routing_key=device.device_id)
    marker = await insert(pg, "t_task", title="marker")
    later = await client.synchronize_to_device(device.session, objects=[ObjectRef("Task", marker)])
    await device.settled(later)

    assert (await device.store.get_committed("Task", task) or {})["title"] == "offline edit"
    assert await device.store.is_dirty("Task", task)


async def test_job_redelivered_after_its_batches_went_out_changes_nothing_more(
    client: SyncClient, make_device: MakeDevice, pg
):
    """A worker killed between the confirms and the ack: the broker redelivers the job."""
    device = await make_device(7, ["Admin"])
    task = await insert(pg, "t_task", title="server")
    job = SyncJob(
        job_id=uuid.uuid4().hex,
        session=device.session,
        origin="nanoflow",
        objects=(ObjectRef("Task", task),),
    )
    body = job.model_dump_json().encode()
    first = await client.publish_raw(body, job_id=job.job_id, timeout=10)
    await device.settled(first)
    await device.store.change("Task", task, title="offline edit")
    await device.store.commit("Task", task)

    again = await client.publish_raw(body, job_id=job.job_id, timeout=10)
    await device.settled(again)
    assert again.batch_ids == first.batch_ids
    assert (await device.store.get_committed("Task", task) or {})["title"] == "offline edit"


async def test_unstorable_batch_is_dropped_and_the_agent_goes_on(
    client: SyncClient, make_device: MakeDevice, pg, amqp
):
    device = await make_device(7, ["Admin"])
    changes = await amqp.get_exchange(CHANGES_EXCHANGE.name)
    poison = {
        "schema_version": 1,
        "batch_id": "poison",
        "job_id": "poison",
        "device_id": device.device_id,
        "changes": [{"op": "upsert", "entity": "Task", "id": 1, "version": 2**63, "data": {}}],
    }
    await changes.publish(json_message(json.dumps(poison).encode()), routing_key=device.device_id)

    task = await insert(pg, "t_task", title="after the poison")
    later = await client.synchronize_to_device(device.session, objects=[ObjectRef("Task", task)])
    await device.settled(later)
    assert await device.store.ids("Task") == [task]


async def test_everything_recovers_after_the_broker_cuts_all_connections(
    client: SyncClient, make_device: MakeDevice, pg
):
    """Worker, agent and client all lose their connections, as in a network failure."""
    device = await make_device(7, ["Admin"])
    task = await insert(pg, "t_task", title="a")
    await _rabbitmqctl("close_all_connections", "test cuts every connection")
    await wait_for(_reconnected("test-client"), timeout=15)
    await wait_for(_reconnected(f"sync-agent:{device.device_id}"), timeout=15)

    result = await client.synchronize_to_device(device.session, objects=[ObjectRef("Task", task)])
    assert result.status == "done"
    await device.settled(result)
    assert await device.store.ids("Task") == [task]


def _reconnected(name: str):
    async def reconnected() -> bool:
        return len(await _connections_named(name)) == 1

    return reconnected


async def _connections_named(name: str) -> list[str]:
    listing = await _rabbitmqctl(
        "-q", "list_connections", "name", "client_properties", "--formatter", "json"
    )
    return [
        connection["name"]
        for connection in json.loads(listing)
        if _connection_name(connection["client_properties"]) == name
    ]


def _connection_name(client_properties: list[list[object]]) -> object:
    return next((value for key, _, value in client_properties if key == "connection_name"), None)


async def _rabbitmqctl(*args: str) -> bytes:
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(ROOT / "scripts" / "services.sh"),
        "rabbitmqctl",
        *args,
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, args
    return output


async def test_the_agent_tells_the_app_about_each_batch_once_it_is_committed(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(7, ["Admin"], run_agent=False)
    ids = [await insert(pg, "t_task", title=f"t{i}") for i in range(120)]
    seen: list[str] = []

    def on_applied(batch: AppliedBatch) -> None:
        seen.append(batch.batch_id)

    agent = await DeviceAgent.start(
        AgentSettings(amqp_url=device.amqp_url, device_id=device.device_id, db_path=device.db_path),
        on_applied=on_applied,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        result = await client.synchronize_to_device(device.session, lists=[ObjectList("Task", ids)])
        await device.settled(result)
        await wait_for(lambda: _seen_all(seen, result.batch_ids))
    finally:
        stop.set()
        await task
    # Each batch once, after its commit (so only after the device holds its objects).
    assert sorted(seen) == sorted(result.batch_ids)


async def _seen_all(seen: list[str], batch_ids) -> bool:
    return len(seen) >= len(batch_ids)


async def test_jobs_sync_again_after_postgresql_drops_the_workers_connections(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(7, ["Admin"])
    first = await insert(pg, "t_task", title="before")
    await sync_settled(client, device, [ObjectRef("Task", first)])

    # What a PostgreSQL restart does to the worker: every one of its sessions is gone.
    killed = await pg.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
        WORKER_ROLE,
    )
    assert killed >= 1
    second = await insert(pg, "t_task", title="after")
    await sync_settled(client, device, [ObjectRef("Task", second)])
    assert await device.store.ids("Task") == [first, second]
