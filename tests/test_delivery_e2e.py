"""Delivery guarantees of SPEC §7 that the foundation covers: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from functools import partial

import pytest

from broker import ChangeBatch, ObjectList, ObjectRef, SyncClient, UpsertChange
from broker.publishing import json_message
from broker.topology import CHANGES_EXCHANGE
from tests.conftest import ROOT, MakeDevice, Services, insert, wait_for

pytestmark = pytest.mark.usefixtures("worker")


async def _spawn_agent(services: Services, device) -> asyncio.subprocess.Process:
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
        env={**os.environ, "SYNC_AMQP_URL": services.amqp_url},
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
        agent = await _spawn_agent(services, device)
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
