"""Follow (SPEC §12) on the real services: what a device holds stays fresh.

The domain is tests/follow_model.yaml: orders are followed; a clerk reads an order while
its customer's region is open (two hops away), an owner while it is not closed, a
watcher while a watch names them (a reverse hop); memos are not followed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import asyncpg
import pytest

from broker import ObjectRef, SyncClient
from tests.conftest import (
    WORKER_ROLE,
    Device,
    MakeDevice,
    Services,
    insert,
    start_agent,
    stop_agent,
    sync_settled,
    wait_for,
    worker_settings,
)
from worker import DomainModel, Worker, parse_model
from worker.schema import create_worker_role, init_database

FOLLOW_MODEL = Path(__file__).with_name("follow_model.yaml")
TABLES = ("f_order", "f_customer", "f_region", "f_watch", "f_memo")


@pytest.fixture(scope="session")
def follow_model() -> DomainModel:
    return parse_model(FOLLOW_MODEL.read_text(), str(FOLLOW_MODEL))


@pytest.fixture(scope="session")
async def follow_schema(services: Services, schema: None, follow_model: DomainModel) -> None:
    conn = await asyncpg.connect(services.database_url)
    try:
        for table in TABLES:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await init_database(conn, follow_model, create_tables=True)
        await create_worker_role(conn, follow_model, WORKER_ROLE, WORKER_ROLE)
    finally:
        await conn.close()


@pytest.fixture
async def fpg(pg: asyncpg.Connection, follow_schema: None) -> asyncpg.Connection:
    await pg.execute(f"TRUNCATE {', '.join(TABLES)}, sync.change RESTART IDENTITY")
    await pg.execute("UPDATE sync.follow_state SET consumed = 0, overflowed_at = NULL")
    return pg


@pytest.fixture
async def follow_worker(
    services: Services, follow_model: DomainModel, fpg: asyncpg.Connection, clean_queues: None
) -> AsyncIterator[Worker]:
    settings = worker_settings(services, model=FOLLOW_MODEL, follow_interval=0.05)
    running = await Worker.start(settings, follow_model)
    yield running
    await running.stop()


async def _world(pg: asyncpg.Connection) -> dict[str, int]:
    """An open region with a customer and two orders; a closed region."""
    open_region = await insert(pg, "f_region", name="north", open=True)
    closed_region = await insert(pg, "f_region", name="south", open=False)
    customer = await insert(pg, "f_customer", name="acme", region_id=open_region)
    order = await insert(
        pg, "f_order", title="pump", status="open", secret="s1", customer_id=customer
    )
    other = await insert(
        pg, "f_order", title="valve", status="open", secret="s2", customer_id=customer
    )
    return {
        "open": open_region,
        "closed": closed_region,
        "customer": customer,
        "order": order,
        "other": other,
    }


async def _until(
    device: Device,
    entity: str,
    object_id: int,
    expected: dict[str, object] | None,
    timeout: float = 10.0,
) -> None:
    async def reached() -> bool:
        return await device.store.get_committed(entity, object_id) == expected

    await wait_for(reached, timeout=timeout)


async def test_an_update_reaches_the_holder_with_only_readable_members(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await _world(fpg)
    clerk = await make_device(7, ["Clerk"])
    await sync_settled(client, clerk, [ObjectRef("Order", world["order"])])
    assert await clerk.store.get_committed("Order", world["order"]) == {
        "title": "pump",
        "status": "open",
    }

    await fpg.execute(
        "UPDATE f_order SET title = 'big pump', secret = 'changed' WHERE id = $1", world["order"]
    )
    await _until(clerk, "Order", world["order"], {"title": "big pump", "status": "open"})


async def test_a_delete_removes_the_object_from_the_holder(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await _world(fpg)
    boss = await make_device(7, ["Boss"])
    await sync_settled(client, boss, [ObjectRef("Order", world["order"])])

    await fpg.execute("DELETE FROM f_order WHERE id = $1", world["order"])
    await _until(boss, "Order", world["order"], None)
    assert await fpg.fetchval("SELECT count(*) FROM sync.holding") == 0


async def test_losing_access_through_the_objects_own_attribute_removes_it(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await _world(fpg)
    owner = await make_device(7, ["Owner"])
    await sync_settled(client, owner, [ObjectRef("Order", world["order"])])
    assert await owner.store.get_committed("Order", world["order"]) == {
        "title": "pump",
        "secret": "s1",
    }

    await fpg.execute("UPDATE f_order SET status = 'closed' WHERE id = $1", world["order"])
    await _until(owner, "Order", world["order"], None)


async def test_losing_access_through_an_object_two_hops_away_removes_it(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await _world(fpg)
    clerk = await make_device(7, ["Clerk"])
    await sync_settled(
        client, clerk, [ObjectRef("Order", world["order"]), ObjectRef("Order", world["other"])]
    )

    # The region closes: neither order may be read any more.
    await fpg.execute("UPDATE f_region SET open = false WHERE id = $1", world["open"])
    await _until(clerk, "Order", world["order"], None)
    await _until(clerk, "Order", world["other"], None)


async def test_moving_a_related_object_away_removes_what_it_granted(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await _world(fpg)
    watcher = await make_device(7, ["Watcher"])
    watch = await insert(fpg, "f_watch", order_id=world["order"], user_id=7)
    await sync_settled(client, watcher, [ObjectRef("Order", world["order"])])
    assert await watcher.store.get_committed("Order", world["order"]) == {"title": "pump"}

    # The watch now names the other order: the first one's access went with its old value.
    await fpg.execute("UPDATE f_watch SET order_id = $1 WHERE id = $2", world["other"], watch)
    await _until(watcher, "Order", world["order"], None)
    # Append mode: the other order was never sent, so it is not pushed either.
    assert await watcher.store.ids("Order") == []


async def test_losing_a_role_removes_what_it_granted(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await _world(fpg)
    boss = await make_device(7, ["Boss"])
    await sync_settled(client, boss, [ObjectRef("Order", world["order"])])

    await fpg.execute("DELETE FROM sync.user_role WHERE user_id = 7")
    await _until(boss, "Order", world["order"], None)


async def test_an_unfollowed_entity_and_objects_never_sent_are_not_pushed(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await _world(fpg)
    memo = await insert(fpg, "f_memo", text="first")
    boss = await make_device(7, ["Boss"])
    await sync_settled(client, boss, [ObjectRef("Memo", memo), ObjectRef("Order", world["order"])])

    await fpg.execute("UPDATE f_memo SET text = 'second' WHERE id = $1", memo)
    await fpg.execute("UPDATE f_order SET title = 'changed' WHERE id = $1", world["other"])
    await insert(fpg, "f_order", title="new", status="open", customer_id=world["customer"])
    # A change the device does get, after the others: once it is there, they were routed.
    await fpg.execute("UPDATE f_order SET title = 'marker' WHERE id = $1", world["order"])
    await _until(
        boss,
        "Order",
        world["order"],
        {"title": "marker", "status": "open", "secret": "s1", "Order_Customer": world["customer"]},
    )
    assert await boss.store.get_committed("Memo", memo) == {"text": "first"}
    assert await boss.store.ids("Order") == [world["order"]]
    assert await fpg.fetchval("SELECT count(*) FROM sync.holding") == 1


async def test_the_apps_uncommitted_changes_survive_a_push(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await _world(fpg)
    boss = await make_device(7, ["Boss"])
    await sync_settled(client, boss, [ObjectRef("Order", world["order"])])
    await boss.store.change("Order", world["order"], status="draft on device")

    await fpg.execute("UPDATE f_order SET title = 'from server' WHERE id = $1", world["order"])
    await wait_for(lambda: _title_is(boss, world["order"], "from server"))
    merged = await boss.store.get("Order", world["order"])
    assert merged is not None
    assert (merged["title"], merged["status"]) == ("from server", "draft on device")


async def _title_is(device: Device, object_id: int, title: str) -> bool:
    committed = await device.store.get_committed("Order", object_id)
    return committed is not None and committed["title"] == title


async def test_a_device_offline_during_the_change_catches_up_when_its_agent_returns(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await _world(fpg)
    boss = await make_device(7, ["Boss"])
    await sync_settled(client, boss, [ObjectRef("Order", world["order"])])
    await stop_agent(boss)

    await fpg.execute("UPDATE f_order SET title = 'while away' WHERE id = $1", world["order"])
    await fpg.execute("DELETE FROM f_order WHERE id = $1", world["other"])
    await wait_for(lambda: _queued(fpg), timeout=10)
    assert await _title_is(boss, world["order"], "pump")

    await start_agent(boss)
    await wait_for(lambda: _title_is(boss, world["order"], "while away"))


async def _queued(pg: asyncpg.Connection) -> bool:
    """The feed routed everything captured."""
    waiting: int = await pg.fetchval("SELECT count(*) FROM sync.change")
    return waiting == 0


async def test_a_burst_of_updates_converges_to_the_last_state_in_few_batches(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await _world(fpg)
    boss = await make_device(7, ["Boss"])
    await sync_settled(client, boss, [ObjectRef("Order", world["order"])])
    before = await _applied(boss)

    for number in range(60):
        await fpg.execute(
            "UPDATE f_order SET title = $1 WHERE id = $2", f"v{number}", world["order"]
        )
        await asyncio.sleep(1 / 60)
    await wait_for(lambda: _title_is(boss, world["order"], "v59"))
    await asyncio.sleep(0.5)
    assert await _title_is(boss, world["order"], "v59")
    pushed = await _applied(boss) - before
    assert 1 <= pushed <= 30, pushed


async def _applied(device: Device) -> int:
    """Batches the device database records as applied."""
    async with (
        aiosqlite.connect(device.db_path) as db,
        db.execute("SELECT count(*) FROM applied_batches") as cursor,
    ):
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])
