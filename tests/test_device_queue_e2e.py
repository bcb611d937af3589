"""Devices offline for long: batches wait in the device queue up to its length and age
limits; past either, the device is marked for a full resync and its agent learns it with
the next job (docs/decisions.md, "Device queues")."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from broker import ObjectRef, SyncClient
from broker.topology import DeviceQueueType, QueueLimits
from tests.conftest import Device, MakeDevice, Services, insert, start_agent, wait_for

pytestmark = pytest.mark.usefixtures("worker")
# Both device queue types (docs/cluster.md): the device and its callers see the same.
QUEUE_TYPES = pytest.mark.parametrize("queue_type", ["classic", "quorum"])


async def _marked(pg: asyncpg.Connection, device: Device) -> str | None:
    reason: str | None = await pg.fetchval(
        "SELECT resync_reason FROM sync.device WHERE device_id = $1", device.device_id
    )
    return reason


async def _sync_one(client: SyncClient, device: Device, object_id: int):
    return await client.synchronize_to_device(
        device.session, objects=[ObjectRef("Task", object_id)]
    )


@QUEUE_TYPES
async def test_full_queue_refuses_the_job_and_the_device_is_told_to_resync(
    client: SyncClient, make_device: MakeDevice, pg, services: Services, queue_type: DeviceQueueType
):
    device = await make_device(
        7, ["Admin"], run_agent=False, limits=QueueLimits(max_length=3), queue_type=queue_type
    )
    # A quorum queue refuses only once it holds one batch more than its length.
    held = 3 if queue_type == "classic" else 4
    tasks = [await insert(pg, "t_task", title=f"t{i}") for i in range(held + 2)]
    for task in tasks[:held]:
        assert (await _sync_one(client, device, task)).status == "done"

    refused = await _sync_one(client, device, tasks[held])
    assert (refused.status, refused.reason) == ("rejected", "device-queue-full")
    await wait_for(lambda: _is_marked(pg, device))
    assert await _marked(pg, device) == "maxlen"

    await start_agent(device)
    result = await _sync_one(client, device, tasks[held + 1])
    assert result.status == "done"
    await device.settled(result)
    # The queued batches and the new one arrived; the refused one did not.
    assert await device.store.ids("Task") == [*tasks[:held], tasks[held + 1]]
    assert await device.store.resync_required() == "maxlen"
    assert await _marked(pg, device) is None

    await device.store.clear_resync_required()
    again = await _sync_one(client, device, tasks[held])
    await device.settled(again)
    assert await device.store.resync_required() is None


async def test_a_refusal_while_the_queue_has_room_is_tried_again_not_final(
    client: SyncClient, make_device: MakeDevice, pg, services: Services
):
    # A quorum queue that refuses below its registered bound, as one does while its
    # leader's node shuts down (docs/cluster.md): here its real bound is below the one
    # registered. (A classic queue on a stopped node does not refuse: it has no route.)
    device = await make_device(
        7, ["Admin"], run_agent=False, limits=QueueLimits(max_length=1), queue_type="quorum"
    )
    await pg.execute(
        "UPDATE sync.device SET max_batches = 100 WHERE device_id = $1", device.device_id
    )
    # It refuses only once it holds one batch more than its length.
    held = 2
    tasks = [await insert(pg, "t_task", title=f"t{i}") for i in range(held + 1)]
    for task in tasks[:held]:
        assert (await _sync_one(client, device, task)).status == "done"

    later = asyncio.create_task(_sync_one(client, device, tasks[held]))
    # Handed back and tried again while the queue refuses: no answer yet, no mark.
    await asyncio.sleep(1.5)
    assert not later.done()
    assert await _marked(pg, device) is None
    await start_agent(device)
    result = await later
    assert result.status == "done"
    await device.settled(result)
    assert await device.store.ids("Task") == tasks


@QUEUE_TYPES
async def test_batches_older_than_the_queue_ttl_expire_and_the_device_is_told(
    client: SyncClient, make_device: MakeDevice, pg, services: Services, queue_type: DeviceQueueType
):
    device = await make_device(
        7, ["Admin"], run_agent=False, limits=QueueLimits(ttl_seconds=0.2), queue_type=queue_type
    )
    early = await insert(pg, "t_task", title="early")
    late = await insert(pg, "t_task", title="late")
    assert (await _sync_one(client, device, early)).status == "done"
    await wait_for(lambda: _is_marked(pg, device))
    assert await _marked(pg, device) == "expired"

    await start_agent(device)
    result = await _sync_one(client, device, late)
    await device.settled(result)
    assert await device.store.ids("Task") == [late]
    assert await device.store.resync_required() == "expired"


async def _is_marked(pg: asyncpg.Connection, device: Device) -> bool:
    return await _marked(pg, device) is not None
