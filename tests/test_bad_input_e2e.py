"""Bad jobs get a precise reason in the result and the dead-letter queue; work goes on."""

from __future__ import annotations

import json
import uuid

import pytest

from broker import ObjectRef, SyncClient
from broker.topology import JOB_DELIVERY_LIMIT
from tests.conftest import MakeDevice, dead_letters, insert

pytestmark = pytest.mark.usefixtures("worker")


def _job(device_session, **overrides) -> dict[str, object]:
    job: dict[str, object] = {
        "schema_version": 1,
        "job_id": uuid.uuid4().hex,
        "session": device_session.model_dump(),
        "origin": "nanoflow",
        "objects": [{"entity": "Task", "id": 1}],
    }
    job.update(overrides)
    return job


@pytest.mark.parametrize(
    ("body", "reason_prefix"),
    [
        (b"{not json", "malformed-json: "),
        (b"[1, 2]", "invalid-job: "),
        ("schema_version", "unsupported-schema-version: 99"),
        ("objects", "invalid-job: objects.0.id: "),
        ("extra", "invalid-job: smuggled: Extra inputs are not permitted"),
        ("oversized", "invalid-job: job names 100002 objects; at most 100000"),
    ],
)
async def test_bad_job_is_dead_lettered_with_reason_and_later_jobs_sync(
    client: SyncClient, make_device: MakeDevice, pg, amqp, body, reason_prefix: str
):
    device = await make_device(7, ["Admin"])
    job_id = uuid.uuid4().hex
    raw = {
        "schema_version": json.dumps(_job(device.session, schema_version=99)).encode(),
        "objects": json.dumps(
            _job(device.session, objects=[{"entity": "Task", "id": -1}])
        ).encode(),
        "extra": json.dumps(_job(device.session, smuggled=True)).encode(),
        "oversized": json.dumps(
            _job(device.session, lists=[{"entity": "Task", "ids": list(range(1, 100_002))}])
        ).encode(),
    }.get(body, body)

    result = await client.publish_raw(raw, job_id=job_id, timeout=10)

    assert result.status == "rejected"
    assert result.reason is not None and result.reason.startswith(reason_prefix), result.reason
    assert "Traceback" not in result.reason
    assert (await dead_letters(amqp)).get(job_id) == result.reason

    task = await insert(pg, "t_task", title="still works")
    later = await client.synchronize_to_device(device.session, objects=[ObjectRef("Task", task)])
    assert later.status == "done"
    await device.settled(later)
    assert await device.store.get_committed("Task", task) == {
        "title": "still works",
        "status": None,
        "secret": None,
        "amount": None,
        "due": None,
        "Task_Owner": None,
    }


async def test_uncommitted_change_to_unknown_member_is_rejected(
    client: SyncClient, make_device: MakeDevice, pg, amqp
):
    device = await make_device(7, ["Admin"])
    task = await insert(pg, "t_task", title="a")
    ref = ObjectRef("Task", task)
    result = await client.synchronize_to_device(
        device.session, objects=[ref], uncommitted={ref: {"no_such_member": 1}}
    )
    assert (result.status, result.reason) == ("rejected", "unknown-member: Task.no_such_member")
    assert (await dead_letters(amqp)).get(result.job_id) == result.reason


async def test_unknown_device_is_rejected(client: SyncClient, pg, amqp):
    from broker import Session

    result = await client.synchronize_to_device(
        Session(user_id=7, device_id="never-registered"), objects=[ObjectRef("Task", 1)]
    )
    assert (result.status, result.reason) == ("rejected", "unknown-device")


async def test_job_that_keeps_failing_is_dead_lettered_with_a_reason(
    client: SyncClient, make_device: MakeDevice, pg, amqp
):
    device = await make_device(7, ["Admin"])
    # Gone after the worker started (it checks the tables at start): every read fails.
    await pg.execute("ALTER TABLE t_ghost RENAME TO t_ghost_away")
    try:
        result = await client.synchronize_to_device(device.session, objects=[ObjectRef("Ghost", 1)])
    finally:
        await pg.execute("ALTER TABLE t_ghost_away RENAME TO t_ghost")

    assert (result.status, result.reason) == (
        "rejected",
        f"job-failed: UndefinedTableError on {JOB_DELIVERY_LIMIT} attempts",
    )
    assert (await dead_letters(amqp)).get(result.job_id) == result.reason
    task = await insert(pg, "t_task", title="still works")
    later = await client.synchronize_to_device(device.session, objects=[ObjectRef("Task", task)])
    await device.settled(later)
    assert await device.store.ids("Task") == [task]


async def test_device_registered_by_hand_with_a_bad_user_is_rejected_once(
    make_device: MakeDevice, pg, amqp
):
    device = await make_device(7, ["Admin"])
    await pg.execute("UPDATE sync.device SET user_id = 0 WHERE device_id = $1", device.device_id)
    async with await SyncClient.connect(device.amqp_url, name="test-device") as own:
        result = await own.synchronize_to_device(device.session, objects=[ObjectRef("Task", 1)])
    assert (result.status, result.reason) == ("rejected", "invalid-device-registration: user 0")
    assert (await dead_letters(amqp)).get(result.job_id) == result.reason
