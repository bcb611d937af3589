"""Values the device store cannot hold (NaN, Infinity) never break the app's reads, and an
entity too wide for one SQLite view still works."""

from __future__ import annotations

import sqlite3
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from broker import ChangeBatch, ObjectRef, OverlayChange, SyncClient, UpsertChange
from broker.publishing import json_message, publish_confirmed
from broker.topology import CHANGES_EXCHANGE
from device_agent import OfflineStore
from device_agent.views import MAX_VIEW_MEMBERS
from tests.conftest import MakeDevice, insert, sync_settled, wait_for


def _app_sql(path: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """What the app sees through its own connection: column names and rows."""
    with closing(sqlite3.connect(path)) as db:
        cursor = db.execute(sql)
        return [d[0] for d in cursor.description], cursor.fetchall()


def _batch(*changes: Any, device_id: str = "d") -> ChangeBatch:
    return ChangeBatch(
        batch_id=uuid.uuid4().hex,
        job_id="j",
        device_id=device_id,
        position=1,
        total=1,
        changes=changes,
    )


# (a) A batch carrying a non-finite value, published straight to a device's queue.


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("literal", ["NaN", "1e999"])
async def test_batch_with_a_non_finite_value_is_not_applied_and_the_device_resyncs(
    client: SyncClient, make_device: MakeDevice, pg, amqp, literal: str
):
    device = await make_device(7, ["Admin"])
    note = await insert(pg, "t_note", text="kept")
    await sync_settled(client, device, [ObjectRef("Note", note)])
    version = await device.store.version("Note", note)
    assert version is not None

    poison = _batch(
        UpsertChange(entity="Note", id=note, version=version + 1, data={"text": 1}),
        device_id=device.device_id,
    )
    body = poison.model_dump_json().encode().replace(b'"text":1', f'"text":{literal}'.encode())
    assert literal.encode() in body
    changes = await amqp.get_exchange(CHANGES_EXCHANGE.name)
    await publish_confirmed(
        changes,
        [json_message(body, message_id=poison.batch_id)],
        routing_key=device.device_id,
        timeout=5,
        window=1,
    )

    # The agent lets the batch go without requeueing; the queue dead-letters it and the
    # worker marks the device for a full resync.
    async def marked() -> bool:
        reason = await pg.fetchval(
            "SELECT resync_reason FROM sync.device WHERE device_id = $1", device.device_id
        )
        return reason is not None

    await wait_for(marked, timeout=15, every=0.1)
    assert (
        await pg.fetchval(
            "SELECT resync_reason FROM sync.device WHERE device_id = $1", device.device_id
        )
        == "rejected"
    )

    # The store is as it was, and readable: through the view and through the store.
    assert await device.store.applied_batch_ids([poison.batch_id]) == set()
    assert await device.store.get("Note", note) == {"text": "kept"}
    assert await device.store.version("Note", note) == version
    assert _app_sql(device.db_path, 'SELECT * FROM "Note"') == (
        ["id", "version", "dirty", "text"],
        [(note, version, 0, "kept")],
    )

    # Work goes on: the next job syncs, and tells the device to resync everything.
    await pg.execute("UPDATE t_note SET text = 'later' WHERE id = $1", note)
    await sync_settled(client, device, [ObjectRef("Note", note)])
    assert await device.store.get("Note", note) == {"text": "later"}
    assert _app_sql(device.db_path, 'SELECT text FROM "Note"')[1] == [("later",)]
    assert await device.store.resync_required() == "rejected"
    assert (
        await pg.fetchval(
            "SELECT resync_reason FROM sync.device WHERE device_id = $1", device.device_id
        )
        is None
    )


# (b) The store itself refuses values SQLite's JSON functions cannot read back.


@pytest.mark.parametrize(
    "change",
    [
        UpsertChange(entity="Note", id=1, version=2, data={"text": float("nan"), "extra": 1}),
        UpsertChange(entity="Note", id=1, version=2, data={"text": float("inf"), "extra": 1}),
        UpsertChange(entity="Note", id=1, version=2, data={"text": [1, float("-inf")], "extra": 1}),
        UpsertChange(entity="Note", id=2, version=1, data={"text": float("nan"), "extra": 1}),
        OverlayChange(entity="Note", id=1, changes={"text": float("nan")}),
    ],
    ids=["nan", "inf", "nested-inf", "new-object", "overlay"],
)
async def test_store_refuses_a_non_finite_value_and_stays_as_it_was(tmp_path, change):
    path = tmp_path / "device.sqlite"
    async with await OfflineStore.open(path) as store:
        await store.apply_batch(
            _batch(UpsertChange(entity="Note", id=1, version=1, data={"text": "kept"}))
        )
        poison = _batch(
            UpsertChange(entity="Note", id=3, version=1, data={"text": "same batch"}), change
        )

        with pytest.raises(ValueError):
            await store.apply_batch(poison)

        # Nothing of the batch is left: not its other change, nor its id, nor its member.
        assert await store.applied_batch_ids([poison.batch_id]) == set()
        assert await store.get("Note", 1) == {"text": "kept"}
        assert await store.version("Note", 1) == 1
        assert await store.get("Note", 2) is None
        assert await store.get("Note", 3) is None
        assert await store.ids("Note") == [1]
        assert _app_sql(path, 'SELECT * FROM "Note"') == (
            ["id", "version", "dirty", "text"],
            [(1, 1, 0, "kept")],
        )
        assert await store.query("Note", text="kept") == [{"id": 1, "text": "kept"}]

        # The member the refused batch brought first arrives later and makes the view.
        await store.apply_batch(
            _batch(UpsertChange(entity="Note", id=1, version=2, data={"text": "b", "extra": 2}))
        )
        assert _app_sql(path, 'SELECT * FROM "Note"') == (
            ["id", "version", "dirty", "extra", "text"],
            [(1, 2, 0, 2, "b")],
        )

    # And after reopening, as the app would.
    async with await OfflineStore.open(path) as reopened:
        assert await reopened.get("Note", 1) == {"text": "b", "extra": 2}


async def test_app_change_with_a_non_finite_value_is_refused(tmp_path):
    path = tmp_path / "device.sqlite"
    async with await OfflineStore.open(path) as store:
        await store.apply_batch(
            _batch(UpsertChange(entity="Note", id=1, version=1, data={"text": "kept"}))
        )
        with pytest.raises(ValueError):
            await store.change("Note", 1, text=float("nan"))
        assert await store.get("Note", 1) == {"text": "kept"}
        assert _app_sql(path, 'SELECT text FROM "Note"')[1] == [("kept",)]


# (c) An entity with more members than one view can show.


async def test_entity_with_2500_members_keeps_a_working_view_and_every_member(tmp_path):
    path = tmp_path / "device.sqlite"
    members = {f"m{index:04d}": index for index in range(2_500)}
    async with await OfflineStore.open(path) as store:
        await store.apply_batch(_batch(UpsertChange(entity="Wide", id=1, version=1, data=members)))

        columns, rows = _app_sql(path, 'SELECT * FROM "Wide"')
        assert columns == ["id", "version", "dirty", *sorted(members)[:MAX_VIEW_MEMBERS]]
        assert MAX_VIEW_MEMBERS == 1000
        assert rows == [(1, 1, 0, *range(MAX_VIEW_MEMBERS))]
        assert await store.get("Wide", 1) == members
        assert await store.query("Wide", m2499=2499) == [{"id": 1, **members}]

    async with await OfflineStore.open(path) as reopened:
        assert await reopened.get("Wide", 1) == members
        assert len(_app_sql(path, 'SELECT * FROM "Wide"')[0]) == 3 + MAX_VIEW_MEMBERS


async def test_members_added_later_past_the_view_limit_keep_the_view_working(tmp_path):
    """The view is rebuilt as members arrive over several batches; it stays readable."""
    path = tmp_path / "device.sqlite"
    async with await OfflineStore.open(path) as store:
        for start in range(0, 2_500, 500):
            data = {f"m{index:04d}": index for index in range(start, start + 500)}
            await store.apply_batch(
                _batch(UpsertChange(entity="Wide", id=start + 1, version=1, data=data))
            )
        columns, rows = _app_sql(path, 'SELECT * FROM "Wide" ORDER BY id')
        assert columns[3:] == [f"m{index:04d}" for index in range(MAX_VIEW_MEMBERS)]
        assert len(rows) == 5
        last = await store.get("Wide", 2_001)
        assert last == {f"m{index:04d}": index for index in range(2_000, 2_500)}
