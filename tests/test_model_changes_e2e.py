"""Model changes reach devices (docs/model-changes.md), on the real services: a worker
started with a model whose rules for a followed entity changed brings every device
holding its objects in line, without the app asking.

The domain is tests/follow_model.yaml; each test edits a copy of it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from prometheus_client import REGISTRY

from broker import ObjectRef, SyncClient
from tests.conftest import (
    FOLLOW_MODEL,
    Device,
    MakeDevice,
    Services,
    follow_world,
    spawn_worker,
    start_agent,
    stop_agent,
    sync_settled,
    until_committed,
    wait_for,
    worker_settings,
)
from worker import DomainModel, Worker, parse_model
from worker.model_changes import stamp

Edit = Callable[[dict[str, Any]], None]


def _edited(edit: Edit) -> DomainModel:
    raw = yaml.safe_load(FOLLOW_MODEL.read_text())
    edit(raw["entities"])
    return parse_model(yaml.safe_dump(raw), "edited follow model")


def _owner_reads_title_only(entities: dict[str, Any]) -> None:
    entities["Order"]["access"][1]["read"] = ["title"]


@asynccontextmanager
async def _worker(services: Services, model: DomainModel) -> AsyncIterator[Worker]:
    running = await Worker.start(
        worker_settings(services, model=FOLLOW_MODEL, follow_interval=0.05), model
    )
    try:
        yield running
    finally:
        await running.stop()


async def _sent_under(
    services: Services,
    model: DomainModel,
    client: SyncClient,
    devices: list[Device],
    ids: list[int],
) -> None:
    """The devices synced ``ids`` by a worker running ``model``, which stamps it."""
    async with _worker(services, model):
        for device in devices:
            await sync_settled(client, device, [ObjectRef("Order", i) for i in ids])


def _resynced() -> float:
    return REGISTRY.get_sample_value("sync_model_resync_devices_total") or 0.0


async def test_a_member_removed_from_read_disappears_from_every_holder(
    services: Services,
    follow_model: DomainModel,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    clean_queues: None,
):
    world = await follow_world(fpg)
    ids = [world["order"], world["other"]]
    owners = [await make_device(user, ["Owner"]) for user in (7, 8)]
    await _sent_under(services, follow_model, client, owners, ids)
    assert await owners[0].store.get_committed("Order", ids[0]) == {
        "title": "pump",
        "secret": "s1",
    }

    async with _worker(services, _edited(_owner_reads_title_only)):
        for device in owners:
            await until_committed(device, "Order", ids[0], {"title": "pump"})
            await until_committed(device, "Order", ids[1], {"title": "valve"})


async def test_a_new_attribute_arrives_on_every_holder(
    services: Services,
    follow_model: DomainModel,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    clean_queues: None,
):
    world = await follow_world(fpg)
    boss = await make_device(7, ["Boss"])
    await _sent_under(services, follow_model, client, [boss], [world["order"]])

    def add_note(entities: dict[str, Any]) -> None:
        entities["Order"]["attributes"]["note"] = "string"

    # The app's migration: a new column with a default rewrites no row (no new version).
    await fpg.execute("ALTER TABLE f_order ADD COLUMN note text DEFAULT 'fragile'")
    try:
        async with _worker(services, _edited(add_note)):
            await until_committed(
                boss,
                "Order",
                world["order"],
                {
                    "title": "pump",
                    "status": "open",
                    "secret": "s1",
                    "Order_Customer": world["customer"],
                    "note": "fragile",
                },
            )
    finally:
        await fpg.execute("ALTER TABLE f_order DROP COLUMN note")


async def test_a_narrowed_constraint_removes_what_the_holder_may_no_longer_read(
    services: Services,
    follow_model: DomainModel,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    clean_queues: None,
):
    world = await follow_world(fpg)
    owner = await make_device(7, ["Owner"])
    await _sent_under(services, follow_model, client, [owner], [world["order"]])

    def only_new(entities: dict[str, Any]) -> None:
        entities["Order"]["access"][1]["constraint"] = "[status = 'new']"

    async with _worker(services, _edited(only_new)):
        await until_committed(owner, "Order", world["order"], None)
    assert await owner.store.ids("Order") == []


async def test_an_unchanged_model_pushes_nothing_and_an_offline_holder_catches_up(
    services: Services,
    follow_model: DomainModel,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    clean_queues: None,
):
    world = await follow_world(fpg)
    online, offline = [await make_device(user, ["Owner"]) for user in (7, 8)]
    await _sent_under(services, follow_model, client, [online, offline], [world["order"]])
    before = _resynced()
    async with _worker(services, follow_model):
        # The resync runs right after the start; give it the time of a few steps.
        await asyncio.sleep(1.5)
    assert _resynced() == before

    await stop_agent(offline)
    changed = _edited(_owner_reads_title_only)
    async with _worker(services, changed):
        await until_committed(online, "Order", world["order"], {"title": "pump"})
        await wait_for(lambda: _holds_title_only(fpg, offline), timeout=10)
    assert _resynced() == before + 2
    # The worker is gone; the batch waited in the device's queue.
    await start_agent(offline)
    await until_committed(offline, "Order", world["order"], {"title": "pump"})


async def _holds_title_only(pg: asyncpg.Connection, device: Device) -> bool:
    members = await pg.fetchval(
        "SELECT members FROM sync.holding WHERE device_id = $1", device.device_id
    )
    return bool(members == ["title"])


async def test_a_worker_killed_midway_leaves_the_rest_to_the_next(
    services: Services,
    follow_model: DomainModel,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    clean_queues: None,
    tmp_path: Path,
):
    world = await follow_world(fpg)
    owners = [await make_device(user, ["Owner"]) for user in (7, 8, 9)]
    await _sent_under(services, follow_model, client, owners, [world["order"]])
    changed = tmp_path / "changed.yaml"
    raw = yaml.safe_load(FOLLOW_MODEL.read_text())
    _owner_reads_title_only(raw["entities"])
    changed.write_text(yaml.safe_dump(raw))
    in_device_order = sorted(owners, key=lambda device: device.device_id)

    def spawn() -> Any:
        name = f"model-{uuid.uuid4().hex[:8]}"
        return spawn_worker(services, name, model=changed, model_resync_rate=1)

    first = await spawn()
    try:
        await until_committed(in_device_order[0], "Order", world["order"], {"title": "pump"}, 30)
        first.kill()
        await first.wait()
        assert await in_device_order[2].store.get_committed("Order", world["order"]) == {
            "title": "pump",
            "secret": "s1",
        }
        second = await spawn()
        try:
            for device in in_device_order:
                await until_committed(device, "Order", world["order"], {"title": "pump"}, 30)
            await wait_for(lambda: _resync_finished(fpg), timeout=10)
        finally:
            second.kill()
            await second.wait()
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()


async def _resync_finished(pg: asyncpg.Connection) -> bool:
    return bool(await pg.fetchval("SELECT resync_after IS NULL FROM sync.entity_rules"))


async def test_a_first_stamp_records_and_only_a_changed_one_reports(
    follow_model: DomainModel, fpg: asyncpg.Connection
):
    assert await stamp(fpg, follow_model) == []
    assert await stamp(fpg, follow_model) == []
    assert await stamp(fpg, _edited(_owner_reads_title_only)) == ["Order"]
    assert await fpg.fetchval("SELECT resync_after FROM sync.entity_rules") == ""


@pytest.mark.parametrize(
    "edit",
    [
        _owner_reads_title_only,
        lambda entities: entities["Order"]["access"][0].update(constraint="[status = 'open']"),
        lambda entities: entities["Order"]["attributes"].update(note="string"),
    ],
    ids=["read", "constraint", "attribute"],
)
def test_the_fingerprint_changes_with_what_devices_get(
    follow_model: DomainModel, edit: Edit
) -> None:
    assert _edited(edit).fingerprint("Order") != follow_model.fingerprint("Order")


def test_the_fingerprint_ignores_rule_order_and_other_entities(follow_model: DomainModel):
    def reorder(entities: dict[str, Any]) -> None:
        entities["Order"]["access"].reverse()
        entities["Memo"]["attributes"]["more"] = "string"

    assert _edited(reorder).fingerprint("Order") == follow_model.fingerprint("Order")
