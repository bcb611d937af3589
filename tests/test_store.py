"""OfflineStore on a real SQLite file: the device-side rules of SPEC §4 and §7."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from pydantic import ValidationError

from broker import ChangeBatch, OverlayChange, RemoveChange, ResyncChange, UpsertChange
from broker.wire import as_read_batch
from device_agent import JobProgress, OfflineStore
from device_agent.apply import batch_rows
from device_agent.tables import SCHEMA
from device_agent.views import ViewCatalog

HOSTILE = 'x"; DROP TABLE objects; --'


@pytest.fixture
async def store(tmp_path):
    async with await OfflineStore.open(tmp_path / "device.sqlite") as opened:
        yield opened


def _batch(*changes) -> ChangeBatch:
    return ChangeBatch(
        batch_id=uuid.uuid4().hex, job_id="j", device_id="d", position=1, total=1, changes=changes
    )


def _upsert(object_id: int, version: int, **data) -> UpsertChange:
    return UpsertChange(entity="Task", id=object_id, version=version, data=data)


def _app_sql(path: Path, sql: str, *params) -> tuple[list[str], list[tuple[Any, ...]]]:
    """What the app sees through its own connection: column names and rows."""
    with closing(sqlite3.connect(path)) as db:
        cursor = db.execute(sql, params)
        return [d[0] for d in cursor.description], cursor.fetchall()


def _views(path: Path) -> set[str]:
    return {
        row[0] for row in _app_sql(path, "SELECT name FROM sqlite_master WHERE type = 'view'")[1]
    }


async def test_store_uses_wal(store: OfflineStore, tmp_path):
    assert (tmp_path / "device.sqlite-wal").exists()


async def test_older_version_never_replaces_newer(store: OfflineStore):
    await store.apply_batch(_batch(_upsert(1, 5, title="new")))
    await store.apply_batch(_batch(_upsert(1, 3, title="old")))
    assert await store.get_committed("Task", 1) == {"title": "new"}
    assert await store.version("Task", 1) == 5


async def test_same_batch_applied_once(store: OfflineStore):
    batch = _batch(_upsert(1, 1, title="a"))
    assert await store.apply_batch(batch)
    await store.change("Task", 1, title="app")
    await store.commit("Task", 1)
    assert not await store.apply_batch(batch)
    assert await store.get_committed("Task", 1) == {"title": "app"}


@pytest.mark.parametrize("reason", ["deleted", "gone"])
async def test_removed_object_cannot_come_back_through_a_late_upsert(store: OfflineStore, reason):
    await store.apply_batch(_batch(_upsert(1, 4, title="a")))
    version = 4 if reason == "deleted" else None
    await store.apply_batch(
        _batch(RemoveChange(entity="Task", id=1, reason=reason, version=version))
    )
    await store.apply_batch(_batch(_upsert(1, 4, title="late")))
    assert await store.get_committed("Task", 1) is None


async def test_no_access_removal_does_not_block_a_later_grant(store: OfflineStore):
    await store.apply_batch(_batch(_upsert(1, 4, title="a")))
    await store.apply_batch(
        _batch(RemoveChange(entity="Task", id=1, reason="no-access", version=4))
    )
    await store.apply_batch(_batch(_upsert(1, 4, title="a")))
    assert await store.get_committed("Task", 1) == {"title": "a"}


async def test_remove_drops_the_object_and_its_uncommitted_changes(store: OfflineStore):
    await store.apply_batch(_batch(_upsert(1, 1, title="a")))
    await store.change("Task", 1, title="app")
    await store.apply_batch(
        _batch(RemoveChange(entity="Task", id=1, reason="no-access", version=1))
    )
    assert await store.get("Task", 1) is None


async def test_overlay_is_uncommitted_state_on_top_of_committed(store: OfflineStore):
    await store.apply_batch(
        _batch(
            _upsert(1, 1, title="a", status="Open"),
            OverlayChange(entity="Task", id=1, changes={"status": None}),
        )
    )
    assert await store.get("Task", 1) == {"title": "a", "status": None}
    assert await store.get_committed("Task", 1) == {"title": "a", "status": "Open"}
    await store.rollback("Task", 1)
    assert await store.get("Task", 1) == {"title": "a", "status": "Open"}


async def test_failed_batch_leaves_nothing_behind(store: OfflineStore):
    bad = _batch(_upsert(1, 1, title="a"))
    await store._db.execute("DROP TABLE tombstones")  # make the batch fail after its first write
    with pytest.raises(Exception, match="no such table"):
        await store.apply_batch(bad)
    assert await store.get_committed("Task", 1) is None
    assert await store.applied_batch_ids([bad.batch_id]) == set()


async def test_concurrent_app_changes_each_commit(store: OfflineStore):
    await asyncio.gather(*(store.change("Task", n, title=f"t{n}") for n in range(1, 21)))
    await asyncio.gather(*(store.commit("Task", n) for n in range(1, 21)))
    assert await store.ids("Task") == list(range(1, 21))
    assert all([await store.is_dirty("Task", n) for n in range(1, 21)])


# App-facing views.


async def test_view_shows_committed_rows_to_the_app(store: OfflineStore, tmp_path):
    await store.apply_batch(
        _batch(
            _upsert(1, 1, title="a", status="Open", done=False),
            _upsert(2, 1, title="b", status="Done", done=True),
            _upsert(3, 1, title="c", status="Open", done=False),
            OverlayChange(entity="Task", id=3, changes={"status": "Done"}),
        )
    )
    columns, rows = _app_sql(
        tmp_path / "device.sqlite", 'SELECT * FROM "Task" WHERE status = ? ORDER BY id', "Open"
    )
    assert columns == ["id", "version", "dirty", "done", "status", "title"]
    assert rows == [(1, 1, 0, 0, "Open", "a"), (3, 1, 0, 0, "Open", "c")]


async def test_view_of_a_module_qualified_entity(store: OfflineStore, tmp_path):
    await store.apply_batch(
        _batch(UpsertChange(entity="System.User", id=7, version=1, data={"Name": "ann"}))
    )
    _, rows = _app_sql(tmp_path / "device.sqlite", 'SELECT id, Name FROM "System.User"')
    assert rows == [(7, "ann")]


async def test_new_member_extends_the_view(store: OfflineStore, tmp_path):
    await store.apply_batch(_batch(_upsert(1, 1, title="a")))
    await store.apply_batch(_batch(_upsert(2, 1, title="b", priority=3)))
    columns, rows = _app_sql(tmp_path / "device.sqlite", 'SELECT * FROM "Task" ORDER BY id')
    assert columns == ["id", "version", "dirty", "priority", "title"]
    assert rows == [(1, 1, 0, None, "a"), (2, 1, 0, 3, "b")]


async def test_removed_object_leaves_the_view(store: OfflineStore, tmp_path):
    await store.apply_batch(_batch(_upsert(1, 1, title="a"), _upsert(2, 1, title="b")))
    await store.apply_batch(_batch(RemoveChange(entity="Task", id=1, reason="deleted", version=1)))
    _, rows = _app_sql(tmp_path / "device.sqlite", 'SELECT id FROM "Task"')
    assert rows == [(2,)]


async def test_view_shows_device_commits_as_dirty(store: OfflineStore, tmp_path):
    await store.change("Note", 5, text="made on the device")
    await store.commit("Note", 5)
    _, rows = _app_sql(tmp_path / "device.sqlite", 'SELECT id, dirty, text FROM "Note"')
    assert rows == [(5, 1, "made on the device")]


async def test_views_survive_reopen_and_known_members_rebuild_nothing(tmp_path, monkeypatch):
    path = tmp_path / "device.sqlite"
    async with await OfflineStore.open(path) as store:
        await store.apply_batch(_batch(_upsert(1, 1, title="a", status="Open")))
    assert "Task" in _views(path)
    rebuilt: list[str] = []
    original = ViewCatalog._rebuild_view

    async def counting(self, entity, members):
        rebuilt.append(entity)
        await original(self, entity, members)

    monkeypatch.setattr(ViewCatalog, "_rebuild_view", counting)
    async with await OfflineStore.open(path) as store:
        await store.apply_batch(_batch(_upsert(2, 1, title="b")))
        assert rebuilt == []
        await store.apply_batch(_batch(_upsert(3, 1, title="c", estimate="1.50")))
        assert rebuilt == ["Task"]
    columns, _ = _app_sql(path, 'SELECT * FROM "Task"')
    assert columns == ["id", "version", "dirty", "estimate", "status", "title"]


async def test_failed_batch_leaves_no_view_and_a_retry_creates_it(store: OfflineStore, tmp_path):
    batch = _batch(UpsertChange(entity="Note", id=1, version=1, data={"text": "a"}))
    await store._db.execute("DROP TABLE tombstones")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await store.apply_batch(batch)
    assert "Note" not in _views(tmp_path / "device.sqlite")
    await store._db.executescript(SCHEMA)
    assert await store.apply_batch(batch)
    _, rows = _app_sql(tmp_path / "device.sqlite", 'SELECT id, text FROM "Note"')
    assert rows == [(1, "a")]


async def test_database_from_before_views_gets_them_at_open(tmp_path):
    path = tmp_path / "device.sqlite"
    async with await OfflineStore.open(path) as store:
        await store.apply_batch(_batch(_upsert(1, 1, title="a")))
    with closing(sqlite3.connect(path)) as db:
        db.executescript(
            'DROP VIEW "Task"; DROP TABLE entity_members; DROP TABLE synced_entities;'
            "PRAGMA user_version = 0;"
        )
    async with await OfflineStore.open(path) as store:
        assert await store.query("Task", title="a") == [{"id": 1, "title": "a"}]
    _, rows = _app_sql(path, 'SELECT id, title FROM "Task"')
    assert rows == [(1, "a")]


# Names from the wire.


async def test_hostile_entity_name_is_refused_by_the_wire_model():
    with pytest.raises(ValidationError):
        UpsertChange(entity=HOSTILE, id=1, version=1, data={})


async def test_hostile_member_name_is_kept_as_data_but_left_out_of_the_view(
    store: OfflineStore, tmp_path
):
    await store.apply_batch(_batch(_upsert(1, 1, title="a", **{HOSTILE: 1, "bad name": 2})))
    assert await store.get_committed("Task", 1) == {"title": "a", HOSTILE: 1, "bad name": 2}
    columns, rows = _app_sql(tmp_path / "device.sqlite", 'SELECT * FROM "Task"')
    assert columns == ["id", "version", "dirty", "title"]
    assert rows == [(1, 1, 0, "a")]
    with pytest.raises(ValueError, match="not a valid member name"):
        await store.query("Task", **{HOSTILE: 1})


async def test_entity_bypassing_validation_gets_no_view(store: OfflineStore, tmp_path):
    bad = UpsertChange.model_construct(entity=HOSTILE, id=1, version=1, data={"title": "a"})
    assert await store.apply_batch(_batch(bad, _upsert(1, 1, title="ok")))
    assert _views(tmp_path / "device.sqlite") == {"Task"}
    assert await store.query("Task") == [{"id": 1, "title": "ok"}]


async def test_entity_named_like_a_store_table_gets_no_view(store: OfflineStore, tmp_path):
    await store.apply_batch(
        _batch(
            UpsertChange(entity="Objects", id=1, version=1, data={"a": 1}),
            UpsertChange(entity="sqlite_stat1", id=1, version=1, data={"a": 1}),
            _upsert(1, 1, title="a"),
            UpsertChange(entity="task", id=2, version=1, data={"title": "lower"}),
        )
    )
    assert _views(tmp_path / "device.sqlite") == {"Task"}
    assert await store.query("Objects", a=1) == [{"id": 1, "a": 1}]
    assert await store.query("task") == [{"id": 2, "title": "lower"}]
    _, rows = _app_sql(tmp_path / "device.sqlite", 'SELECT id, title FROM "Task"')
    assert rows == [(1, "a")]


async def test_member_clashing_with_a_view_column_is_left_out_of_the_view(
    store: OfflineStore, tmp_path
):
    await store.apply_batch(_batch(_upsert(1, 1, Dirty="yes", Title="A", title="a")))
    columns, _ = _app_sql(tmp_path / "device.sqlite", 'SELECT * FROM "Task"')
    assert columns == ["id", "version", "dirty", "Title"]
    assert await store.query("Task", Dirty="yes", title="a") == [
        {"id": 1, "Dirty": "yes", "Title": "A", "title": "a"}
    ]


# query()


async def test_query_filters_committed_state_by_equality(store: OfflineStore):
    await store.apply_batch(
        _batch(
            _upsert(2, 1, title="b", status="Open", owner=10),
            _upsert(1, 1, title="O'Brien", status="Open", owner=11),
            _upsert(3, 1, title="c", status="Done", owner=10),
            OverlayChange(entity="Task", id=3, changes={"status": "Open"}),
        )
    )
    assert [row["id"] for row in await store.query("Task")] == [1, 2, 3]
    assert await store.query("Task", status="Open") == [
        {"id": 1, "title": "O'Brien", "status": "Open", "owner": 11},
        {"id": 2, "title": "b", "status": "Open", "owner": 10},
    ]
    assert [row["id"] for row in await store.query("Task", status="Open", owner=10)] == [2]
    assert [row["id"] for row in await store.query("Task", title="O'Brien")] == [1]
    assert await store.query("Task", status="open") == []


async def test_query_none_matches_null(store: OfflineStore):
    await store.apply_batch(_batch(_upsert(1, 1, due=None), _upsert(2, 1, due="2024-05-01")))
    assert await store.query("Task", due=None) == [{"id": 1, "due": None}]


async def test_query_unknown_entity_or_unseen_member_is_empty(store: OfflineStore):
    await store.apply_batch(_batch(_upsert(1, 1, title="a")))
    assert await store.query("Nothing") == []
    assert await store.query("Nothing", title="a") == []
    assert await store.query("Task", colour=None) == []


async def test_query_rejects_invalid_names_and_values(store: OfflineStore):
    with pytest.raises(ValueError, match="not a valid entity name"):
        await store.query(HOSTILE)
    with pytest.raises(TypeError, match="filter title"):
        await store.query("Task", title=["a"])


async def test_query_sees_members_another_store_on_the_file_added(tmp_path):
    path = tmp_path / "device.sqlite"
    async with await OfflineStore.open(path) as app, await OfflineStore.open(path) as agent:
        assert await app.query("Task", status="Open") == []
        await agent.apply_batch(_batch(_upsert(1, 1, status="Open")))
        assert await app.query("Task", status="Open") == [{"id": 1, "status": "Open"}]


# The resync flag.


async def test_resync_flag_set_get_clear(store: OfflineStore):
    assert await store.resync_required() is None
    assert await store.resync_required_since() is None
    before = datetime.now(UTC)
    await store.mark_resync_required("maxlen")
    assert await store.resync_required() == "maxlen"
    since = await store.resync_required_since()
    assert since is not None and before <= since <= datetime.now(UTC)
    await store.clear_resync_required()
    assert await store.resync_required() is None


async def test_resync_keeps_latest_reason_and_earliest_since(store: OfflineStore):
    first = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    await store.mark_resync_required("expired", since=first)
    await store.mark_resync_required("maxlen", since=first + timedelta(hours=1))
    await store.mark_resync_required("maxlen")
    assert await store.resync_required() == "maxlen"
    assert await store.resync_required_since() == first


async def test_resync_flag_survives_reopen(tmp_path):
    path = tmp_path / "device.sqlite"
    async with await OfflineStore.open(path) as store:
        await store.mark_resync_required("expired")
    async with await OfflineStore.open(path) as store:
        assert await store.resync_required() == "expired"
        await store.clear_resync_required()
    async with await OfflineStore.open(path) as store:
        assert await store.resync_required() is None


async def test_resync_change_in_a_batch_marks_the_store_once(store: OfflineStore):
    since = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    batch = _batch(ResyncChange(reason="maxlen", since=since))
    assert await store.apply_batch(batch)
    assert await store.resync_required() == "maxlen"
    assert await store.resync_required_since() == since
    await store.clear_resync_required()
    assert not await store.apply_batch(batch)
    assert await store.resync_required() is None


async def test_prune_forgets_old_batch_ids_and_tombstones_only(store: OfflineStore, tmp_path):
    await store.apply_batch(_batch(_upsert(1, 4, title="old")))
    await store.apply_batch(_batch(RemoveChange(entity="Task", id=1, reason="deleted", version=4)))
    recent = _batch(_upsert(2, 1, title="recent"))
    await store.apply_batch(recent)
    await store.apply_batch(_batch(RemoveChange(entity="Task", id=3, reason="gone")))
    async with aiosqlite.connect(tmp_path / "device.sqlite") as db:
        await db.execute(
            "UPDATE applied_batches SET applied_at = '2020-01-01 00:00:00' WHERE batch_id != ?",
            (recent.batch_id,),
        )
        await db.execute("UPDATE tombstones SET removed_at = '2020-01-01 00:00:00' WHERE id = 1")
        await db.commit()

    assert await store.prune(timedelta(days=35)) == (3, 1)
    assert await store.applied_batch_ids([recent.batch_id]) == {recent.batch_id}
    # The recent tombstone still holds: a late upsert of object 3 cannot bring it back.
    await store.apply_batch(_batch(_upsert(3, 9, title="late")))
    assert await store.get_committed("Task", 3) is None
    assert await store.prune(timedelta(days=35)) == (0, 0)


async def test_tombstones_of_an_older_store_are_dated_at_open_and_still_hold(tmp_path):
    path = tmp_path / "device.sqlite"
    async with await OfflineStore.open(path) as store:
        await store.apply_batch(_batch(RemoveChange(entity="Task", id=1, reason="gone")))
    with closing(sqlite3.connect(path)) as db:
        db.executescript("ALTER TABLE tombstones DROP COLUMN removed_at; PRAGMA user_version = 1;")
    async with await OfflineStore.open(path) as store:
        assert await store.prune(timedelta(days=35)) == (0, 0)
        await store.apply_batch(_batch(_upsert(1, 9, title="late")))
        assert await store.get_committed("Task", 1) is None
    _, rows = _app_sql(path, "SELECT removed_at IS NOT NULL FROM tombstones")
    assert rows == [(1,)]


async def test_a_loss_announced_during_the_apps_resync_keeps_the_flag(store: OfflineStore):
    await store.mark_resync_required("maxlen")
    started = datetime.now(UTC)
    await store.mark_resync_required("expired")  # arrives while the app resyncs
    await store.clear_resync_required(started=started)
    assert await store.resync_required() == "expired"

    started = datetime.now(UTC)
    await store.clear_resync_required(started=started)
    assert await store.resync_required() is None


# Progress of a job.


def _placed(job_id: str, position: int, total: int, *changes) -> ChangeBatch:
    return ChangeBatch(
        batch_id=uuid.uuid4().hex,
        job_id=job_id,
        device_id="d",
        position=position,
        total=total,
        changes=changes,
    )


async def test_progress_counts_each_applied_batch_of_the_job_once(store: OfflineStore):
    first, second, third = (_placed("big", n, 3, _upsert(n, 1, title=f"t{n}")) for n in (1, 2, 3))
    assert await store.progress("big") is None
    assert await store.apply_batch(first)
    assert not await store.apply_batch(first)  # redelivered
    assert await store.progress("big") == JobProgress(applied=1, total=3)
    # A group holding a batch twice, and one applied before.
    rows = [batch_rows(as_read_batch(batch)) for batch in (first, second, second)]
    assert await store.apply_group(rows) == [False, True, False]
    assert await store.progress("big") == JobProgress(applied=2, total=3)
    await store.apply_batch(_placed("other", 1, 1, _upsert(9, 1, title="x")))
    await store.apply_batch(third)
    assert await store.progress("big") == JobProgress(applied=3, total=3)
    assert await store.progress("other") == JobProgress(applied=1, total=1)
    assert await store.progress("unknown") is None


async def test_progress_of_a_job_run_twice_stops_at_its_total(store: OfflineStore):
    # Run again after its batches went out, with newer state: one batch is new.
    for n, title in ((1, "a"), (2, "b"), (2, "b2")):
        await store.apply_batch(_placed("again", n, 2, _upsert(n, 1, title=title)))
    assert await store.progress("again") == JobProgress(applied=2, total=2)


async def test_progress_is_readable_as_long_as_the_batches_are_remembered(
    store: OfflineStore, tmp_path
):
    await store.apply_batch(_placed("old", 1, 2, _upsert(1, 1, title="a")))
    async with aiosqlite.connect(tmp_path / "device.sqlite") as db:
        await db.execute("UPDATE applied_batches SET applied_at = '2020-01-01 00:00:00'")
        await db.commit()
    assert await store.prune(timedelta(days=35)) == (1, 0)
    assert await store.progress("old") is None


async def test_an_older_store_gets_batch_totals_at_open(tmp_path):
    path = tmp_path / "device.sqlite"
    before = _placed("before", 1, 2, _upsert(1, 1, title="a"))
    async with await OfflineStore.open(path) as store:
        await store.apply_batch(before)
    with closing(sqlite3.connect(path)) as db:
        db.executescript(
            "DROP INDEX applied_batches_job; ALTER TABLE applied_batches DROP COLUMN total;"
            "PRAGMA user_version = 2;"
        )
    async with await OfflineStore.open(path) as store:
        # Applied before the upgrade: still applied once, but its total is unknown.
        assert not await store.apply_batch(before)
        assert await store.progress("before") is None
        await store.apply_batch(_placed("after", 1, 2, _upsert(2, 1, title="b")))
        assert await store.progress("after") == JobProgress(applied=1, total=2)
    _, rows = _app_sql(path, "PRAGMA user_version")
    assert rows == [(3,)]
    _, indexes = _app_sql(path, "SELECT name FROM sqlite_master WHERE type = 'index'")
    assert ("applied_batches_job",) in indexes
