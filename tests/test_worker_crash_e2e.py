"""A worker killed (SIGKILL) between publishing a job's batches and acking the job: the
broker hands the job to the next worker, which reads the same state and so publishes the
same batch ids; the device skips those it has applied. Nothing is lost, nothing is
applied twice. No in-process worker runs here: the killed processes are the only ones.
"""

from __future__ import annotations

import asyncio
from functools import partial

import aiosqlite
import pytest

from broker import ObjectRef, SyncClient
from tests.conftest import Device, MakeDevice, Services, spawn_worker, wait_for

pytestmark = pytest.mark.usefixtures("clean_queues")


async def _applied_count(device: Device) -> int:
    async with (
        aiosqlite.connect(device.db_path) as db,
        db.execute("SELECT count(*) FROM applied_batches") as cursor,
    ):
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def test_worker_killed_mid_job_leaves_no_duplicate_effect(
    client: SyncClient, make_device: MakeDevice, pg, services: Services
):
    device = await make_device(7, ["Admin"])
    ids = [
        record["id"]
        for record in await pg.fetch(
            "INSERT INTO t_task (title) SELECT 'task ' || g FROM generate_series(1, 2000) g "
            "RETURNING id"
        )
    ]
    chunks = [ids[start : start + 100] for start in range(0, len(ids), 100)]
    jobs = [
        asyncio.create_task(
            client.synchronize_to_device(
                device.session, objects=[ObjectRef("Task", i) for i in chunk], timeout=120
            )
        )
        for chunk in chunks
    ]

    for attempt in range(3):
        worker = await spawn_worker(services, f"crash-test-{attempt}", batch_size=10, prefetch=4)
        start = await _applied_count(device)
        await wait_for(partial(_applied_beyond, device, start + 15), timeout=30)
        worker.kill()  # SIGKILL: batches published, the job not yet acked
        await worker.wait()
    worker = await spawn_worker(services, "crash-test-last", batch_size=10, prefetch=4)
    try:
        results = await asyncio.gather(*jobs)
    finally:
        worker.terminate()
        await worker.wait()

    batch_ids = {batch_id for result in results for batch_id in result.batch_ids}
    assert all(result.status == "done" for result in results)
    await device.store.wait_for_batches(batch_ids, timeout=30)
    # Exactly the batches of the final results: none extra from the killed attempts.
    assert await _applied_count(device) == len(batch_ids) == 200
    assert await device.store.ids("Task") == sorted(ids)


async def _applied_beyond(device: Device, count: int) -> bool:
    return await _applied_count(device) >= count
