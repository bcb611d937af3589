"""``OfflineStore.apply_group`` on a real SQLite file: a group of batches in one
transaction, as if applied one after the other; one failing batch does not take the
others with it."""

from __future__ import annotations

import sqlite3
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from broker import ChangeBatch, OverlayChange, RemoveChange, UpsertChange
from broker.wire import as_read_batch
from device_agent import OfflineStore
from device_agent.apply import BatchRows, batch_rows


@pytest.fixture
async def store(tmp_path):
    async with await OfflineStore.open(tmp_path / "device.sqlite") as opened:
        yield opened


def _rows(*changes: Any, batch_id: str | None = None) -> BatchRows:
    batch = ChangeBatch(
        batch_id=batch_id or uuid.uuid4().hex,
        job_id="j",
        device_id="d",
        position=1,
        total=1,
        changes=changes,
    )
    return batch_rows(as_read_batch(batch))


def _upsert(object_id: int, version: int, **data: Any) -> UpsertChange:
    return UpsertChange(entity="Task", id=object_id, version=version, data=data)


def _views(path: Path) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'view' ORDER BY name"
        ).fetchall()


async def test_a_group_applies_in_order_as_batches_one_after_the_other(store: OfflineStore):
    group = [
        _rows(_upsert(1, 1, title="a")),
        _rows(OverlayChange(entity="Task", id=1, changes={"title": "draft"})),
        _rows(RemoveChange(entity="Task", id=1, reason="no-access", version=1)),
        _rows(_upsert(1, 1, title="a"), _upsert(2, 1, title="b", status="Open")),
        _rows(RemoveChange(entity="Task", id=2, reason="deleted", version=1)),
        _rows(_upsert(2, 1, title="late")),
    ]
    assert await store.apply_group(group) == [True] * len(group)
    # The removal dropped the overlay before the object came back; the later upsert of
    # the deleted object found its tombstone.
    assert await store.get("Task", 1) == {"title": "a"}
    assert await store.get("Task", 2) is None
    assert await store.query("Task", status=None) == [{"id": 1, "title": "a"}]
    assert await store.applied_batch_ids(r.batch_id for r in group) == {r.batch_id for r in group}


async def test_a_batch_applied_before_or_twice_in_a_group_changes_nothing(store: OfflineStore):
    first = _rows(_upsert(1, 1, title="a"))
    assert await store.apply_group([first]) == [True]
    await store.change("Task", 1, title="app")
    await store.commit("Task", 1)
    again = _rows(_upsert(2, 1, title="b"))
    assert await store.apply_group([first, again, again]) == [False, True, False]
    assert await store.get_committed("Task", 1) == {"title": "app"}
    assert await store.ids("Task") == [1, 2]


async def test_an_unappliable_batch_is_rolled_back_alone(store: OfflineStore, tmp_path):
    good = _rows(_upsert(1, 1, title="a"))
    # A value SQLite cannot store (past a 64-bit integer), with a member of its own.
    bad = BatchRows(
        batch_id="bad",
        job_id="j",
        total=1,
        members={"Task": {"colour"}},
        upserts=[("Task", 2**70, 1, '{"colour": "red"}')],
        removed=[],
        tombstones=[],
        overlays=[],
        resyncs=[],
    )
    after = _rows(_upsert(3, 1, title="c"))
    outcomes = await store.apply_group([good, bad, after])
    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], OverflowError)
    assert await store.ids("Task") == [1, 3]
    assert await store.applied_batch_ids(["bad"]) == set()
    # Its member is not in the view, and the view still works.
    ((_, sql),) = _views(tmp_path / "device.sqlite")
    assert "colour" not in sql
    assert await store.query("Task", colour=None) == []
    assert await store.apply_group([bad]) != [True]


async def test_a_sqlite_error_stops_the_group_before_that_batch(store: OfflineStore, tmp_path):
    with closing(sqlite3.connect(tmp_path / "device.sqlite")) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON objects WHEN NEW.id = 666 "
            "BEGIN SELECT RAISE(ABORT, 'refused by the app'); END"
        )
        db.commit()
    first = _rows(_upsert(1, 1, title="a"))
    failing = _rows(_upsert(666, 1, title="x"))
    after = _rows(_upsert(3, 1, title="c"))
    assert await store.apply_group([first, failing, after]) == [True]
    assert await store.ids("Task") == [1]
    with pytest.raises(sqlite3.IntegrityError, match="refused by the app"):
        await store.apply_group([failing, after])
    assert await store.ids("Task") == [1]
    assert await store.applied_batch_ids([failing.batch_id, after.batch_id]) == set()


async def test_views_of_a_group_come_once_and_stay_after_reopening(tmp_path):
    path = tmp_path / "device.sqlite"
    async with await OfflineStore.open(path) as store:
        group = [_rows(_upsert(n, 1, title=f"t{n}", **{f"m{n}": n})) for n in range(1, 5)]
        assert await store.apply_group(group) == [True] * 4
        assert await store.query("Task", m4=4) == [{"id": 4, "title": "t4", "m4": 4}]
    async with await OfflineStore.open(path) as store:
        assert await store.query("Task", m1=1) == [{"id": 1, "title": "t1", "m1": 1}]
    with closing(sqlite3.connect(path)) as db:
        columns = [d[0] for d in db.execute('SELECT * FROM "Task"').description]
    assert columns == ["id", "version", "dirty", "m1", "m2", "m3", "m4", "title"]
