"""Every row of SPEC §4, end to end on the real broker, database and device SQLite."""

from __future__ import annotations

from decimal import Decimal

import pytest

from broker import ObjectList, ObjectRef, SyncClient
from tests.conftest import Device, MakeDevice, dead_letters, insert, sync_settled

pytestmark = pytest.mark.usefixtures("worker")

USER = 7
OTHER_USER = 8


async def test_event_origin_is_ignored_and_touches_nothing(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Admin"])
    task = await insert(pg, "t_task", title="a")
    result = await client.synchronize_to_device(
        device.session, objects=[ObjectRef("Task", task)], origin="event"
    )
    assert (result.status, result.reason) == ("ignored", "not-called-from-nanoflow")
    assert result.batch_ids == ()
    await _assert_later_job_arrives_alone(client, device, pg)


async def test_online_device_is_ignored(client: SyncClient, make_device: MakeDevice, pg):
    device = await make_device(USER, ["Admin"], offline=False)
    task = await insert(pg, "t_task", title="a")
    result = await client.synchronize_to_device(device.session, objects=[ObjectRef("Task", task)])
    assert (result.status, result.reason) == ("ignored", "online-app")
    assert result.batch_ids == ()


@pytest.mark.parametrize(
    ("entity", "reason"),
    [
        ("Nope", "unknown-entity: Nope"),
        ("Draft", "non-persistable-entity: Draft"),
        ("File", "file-entity: File"),
        ("Photo", "file-entity: Photo"),
        ("Report", "not-in-offline-profile: Report"),
    ],
)
async def test_bad_entity_rejects_the_whole_job(
    client: SyncClient, make_device: MakeDevice, pg, amqp, entity: str, reason: str
):
    device = await make_device(USER, ["Admin"])
    good = await insert(pg, "t_task", title="fine on its own")
    result = await client.synchronize_to_device(
        device.session, objects=[ObjectRef("Task", good), ObjectRef(entity, 1)]
    )
    assert (result.status, result.reason) == ("rejected", reason)
    assert (await dead_letters(amqp)).get(result.job_id) == reason
    await _assert_later_job_arrives_alone(client, device, pg)


async def test_device_of_another_user_is_rejected(
    client: SyncClient, make_device: MakeDevice, pg, amqp
):
    device = await make_device(OTHER_USER, ["Admin"])
    task = await insert(pg, "t_task", title="a")
    session = device.session.model_copy(update={"user_id": USER})
    result = await client.synchronize_to_device(session, objects=[ObjectRef("Task", task)])
    assert (result.status, result.reason) == ("rejected", "device-not-owned")
    assert (await dead_letters(amqp)).get(result.job_id) == "device-not-owned"
    await _assert_later_job_arrives_alone(client, device, pg)


async def test_deleted_in_the_call_is_removed(client: SyncClient, make_device: MakeDevice, pg):
    device = await make_device(USER, ["Admin"])
    task = await insert(pg, "t_task", title="a")
    await sync_settled(client, device, [ObjectRef("Task", task)])
    assert await device.store.get_committed("Task", task) is not None

    ref = ObjectRef("Task", task)
    result = await sync_settled(client, device, [ref], deleted=[ref])
    assert _outcome(result, task) == ("removed", "deleted")
    assert await device.store.get_committed("Task", task) is None


async def test_gone_from_the_database_is_removed(client: SyncClient, make_device: MakeDevice, pg):
    device = await make_device(USER, ["Admin"])
    task = await insert(pg, "t_task", title="a")
    await sync_settled(client, device, [ObjectRef("Task", task)])
    await pg.execute("DELETE FROM t_task WHERE id = $1", task)

    result = await sync_settled(client, device, [ObjectRef("Task", task)])
    assert _outcome(result, task) == ("removed", "gone")
    assert await device.store.get_committed("Task", task) is None


async def test_new_object_is_skipped_and_untouched(client: SyncClient, make_device: MakeDevice, pg):
    device = await make_device(USER, ["Admin"])
    await device.store.change("Task", 999, title="made on the device")
    ref = ObjectRef("Task", 999)
    result = await sync_settled(client, device, [ref], new=[ref])
    assert _outcome(result, 999) == ("skipped", "new")
    assert result.batch_ids == ()
    assert await device.store.get("Task", 999) == {"title": "made on the device"}


async def test_autocommitted_object_is_skipped_and_untouched(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Admin"])
    task = await insert(pg, "t_task", title="a")
    await sync_settled(client, device, [ObjectRef("Task", task)])
    await pg.execute("UPDATE t_task SET title = 'auto', autocommitted = true WHERE id = $1", task)

    result = await sync_settled(client, device, [ObjectRef("Task", task)])
    assert _outcome(result, task) == ("skipped", "autocommitted")
    assert (await device.store.get_committed("Task", task) or {})["title"] == "a"


async def test_object_without_access_is_removed(client: SyncClient, make_device: MakeDevice, pg):
    device = await make_device(USER, ["Admin"])
    note = await insert(pg, "t_note", text="only admins")
    await sync_settled(client, device, [ObjectRef("Note", note)])
    assert await device.store.get_committed("Note", note) == {"text": "only admins"}

    await pg.execute("DELETE FROM sync.user_role WHERE user_id = $1", USER)
    await pg.execute("INSERT INTO sync.user_role VALUES ($1, 'Worker')", USER)
    result = await sync_settled(client, device, [ObjectRef("Note", note)])
    assert _outcome(result, note) == ("removed", "no-access")
    assert await device.store.get_committed("Note", note) is None


async def test_synced_object_holds_latest_committed_readable_state(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Worker"])
    task = await insert(pg, "t_task", title="fix pump", status="Open", secret="s3cret")
    await pg.execute("UPDATE t_task SET status = 'Planned' WHERE id = $1", task)
    version = await pg.fetchval("SELECT version FROM t_task WHERE id = $1", task)

    result = await sync_settled(client, device, [ObjectRef("Task", task)])
    assert _outcome(result, task) == ("synced", None)
    assert (result.synced, result.removed, result.skipped) == (1, 0, 0)
    assert await device.store.get_committed("Task", task) == {
        "title": "fix pump",
        "status": "Planned",
    }
    assert await device.store.version("Task", task) == version


async def test_two_roles_see_the_union_of_readable_members(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Worker", "Auditor"])
    task = await insert(
        pg, "t_task", title="t", status="Open", secret="x", amount=Decimal("12.50"), owner_id=USER
    )
    await sync_settled(client, device, [ObjectRef("Task", task)])
    assert await device.store.get_committed("Task", task) == {
        "title": "t",
        "status": "Open",
        "amount": "12.50",
        "Task_Owner": USER,
    }


async def test_sync_overrides_offline_changes_and_clears_dirty(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Admin"])
    task = await insert(pg, "t_task", title="server")
    await sync_settled(client, device, [ObjectRef("Task", task)])
    await device.store.change("Task", task, title="offline edit")
    await device.store.commit("Task", task)
    assert await device.store.is_dirty("Task", task)

    await sync_settled(client, device, [ObjectRef("Task", task)])
    assert (await device.store.get_committed("Task", task) or {})["title"] == "server"
    assert not await device.store.is_dirty("Task", task)


async def test_uncommitted_changes_of_the_call_arrive_as_uncommitted_state(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Worker"])
    task = await insert(pg, "t_task", title="t", status="Open")
    ref = ObjectRef("Task", task)
    await sync_settled(
        client, device, [ref], uncommitted={ref: {"status": "Done", "secret": "leak?"}}
    )

    assert (await device.store.get("Task", task) or {})["status"] == "Done"
    assert (await device.store.get_committed("Task", task) or {})["status"] == "Open"
    assert "secret" not in (await device.store.get("Task", task) or {})
    await device.store.rollback("Task", task)
    assert (await device.store.get("Task", task) or {})["status"] == "Open"


async def test_app_uncommitted_changes_survive_a_sync(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Admin"])
    task = await insert(pg, "t_task", title="t", status="Open")
    await sync_settled(client, device, [ObjectRef("Task", task)])
    await device.store.change("Task", task, status="In progress")
    await pg.execute("UPDATE t_task SET title = 'renamed' WHERE id = $1", task)

    await sync_settled(client, device, [ObjectRef("Task", task)])
    assert await device.store.get("Task", task) == {
        **(await device.store.get_committed("Task", task) or {}),
        "status": "In progress",
    }
    assert (await device.store.get_committed("Task", task) or {})["title"] == "renamed"


async def test_object_named_several_times_is_synced_once(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Admin"])
    first = await insert(pg, "t_task", title="a")
    second = await insert(pg, "t_task", title="b")
    result = await sync_settled(
        client,
        device,
        [ObjectRef("Task", first), ObjectRef("Task", first)],
        lists=[ObjectList("Task", [first, second]), ObjectList("Task", [second])],
    )
    assert result.synced == 2
    assert [(o.id, o.outcome) for o in result.objects] == [(first, "synced"), (second, "synced")]


async def test_append_mode_leaves_unnamed_objects_alone(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Admin"])
    kept = await insert(pg, "t_task", title="kept")
    named = await insert(pg, "t_task", title="named")
    await sync_settled(client, device, [ObjectRef("Task", kept), ObjectRef("Task", named)])
    await pg.execute("UPDATE t_task SET title = 'changed on server' WHERE id = $1", kept)

    await sync_settled(client, device, [ObjectRef("Task", named)])
    assert (await device.store.get_committed("Task", kept) or {})["title"] == "kept"
    assert await device.store.ids("Task") == [kept, named]


def _outcome(result, object_id: int) -> tuple[str, str | None]:
    (found,) = [o for o in result.objects if o.id == object_id]
    return found.outcome, found.reason


async def _assert_later_job_arrives_alone(client: SyncClient, device: Device, pg) -> None:
    """A job after the one under test syncs; the device then holds only its object.

    Batches of one device arrive in order, so once the later job is applied anything the
    earlier job had sent would be visible too.
    """
    later = await insert(pg, "t_task", title="later")
    await sync_settled(client, device, [ObjectRef("Task", later)])
    assert await device.store.ids("Task") == [later]
