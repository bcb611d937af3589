"""OfflineStore on a real SQLite file: the device-side rules of SPEC §4 and §7."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from broker import ChangeBatch, OverlayChange, RemoveChange, UpsertChange
from device_agent import OfflineStore


@pytest.fixture
async def store(tmp_path):
    async with await OfflineStore.open(tmp_path / "device.sqlite") as opened:
        yield opened


def _batch(*changes) -> ChangeBatch:
    return ChangeBatch(batch_id=uuid.uuid4().hex, job_id="j", device_id="d", changes=changes)


def _upsert(object_id: int, version: int, **data) -> UpsertChange:
    return UpsertChange(entity="Task", id=object_id, version=version, data=data)


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
