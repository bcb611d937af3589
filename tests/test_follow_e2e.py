"""Follow (SPEC §12) on the real services: what a device holds stays fresh.

The domain is tests/follow_model.yaml: orders are followed; a clerk reads an order while
its customer's region is open (two hops away), an owner while it is not closed, a
watcher while a watch names them (a reverse hop); memos are not followed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable

import aio_pika
import aiosqlite
import asyncpg
import pytest
from prometheus_client import REGISTRY

from broker import ObjectRef, Query, SyncClient
from broker.models import SyncJob
from broker.topology import CHANGES_EXCHANGE, declare_exchange
from syncctl.accounts import BrokerAccounts
from syncctl.devices import find_device, unregister_device
from tests.conftest import (
    FOLLOW_MODEL,
    ROOT,
    Device,
    MakeDevice,
    Services,
    follow_world,
    insert,
    run_process,
    spawn_worker,
    start_agent,
    stop_agent,
    sync_settled,
    until_committed,
    wait_for,
    worker_settings,
)
from worker import DomainModel, Worker
from worker.answers import Answer
from worker.devices import DEVICE_LOCK_CLASS
from worker.handler import Claimed, JobHandler
from worker.publisher import BatchPublisher
from worker.schema import init_database
from worker.schema_check import schema_problems


@pytest.fixture
async def follow_worker(
    services: Services, follow_model: DomainModel, fpg: asyncpg.Connection, clean_queues: None
) -> AsyncIterator[Worker]:
    settings = worker_settings(services, model=FOLLOW_MODEL, follow_interval=0.05)
    running = await Worker.start(settings, follow_model)
    yield running
    await running.stop()


async def _holding(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection, role: str
) -> tuple[dict[str, int], Device]:
    """The world, and a device of user 7 with ``role`` that was sent its first order."""
    world = await follow_world(pg)
    device = await make_device(7, [role])
    await sync_settled(client, device, [ObjectRef("Order", world["order"])])
    return world, device


async def test_an_update_reaches_the_holder_with_only_readable_members(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world, clerk = await _holding(client, make_device, fpg, "Clerk")
    assert await clerk.store.get_committed("Order", world["order"]) == {
        "title": "pump",
        "status": "open",
    }

    await fpg.execute(
        "UPDATE f_order SET title = 'big pump', secret = 'changed' WHERE id = $1", world["order"]
    )
    await until_committed(clerk, "Order", world["order"], {"title": "big pump", "status": "open"})


async def test_a_delete_removes_the_object_from_the_holder(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world, boss = await _holding(client, make_device, fpg, "Boss")

    await fpg.execute("DELETE FROM f_order WHERE id = $1", world["order"])
    await until_committed(boss, "Order", world["order"], None)

    async def forgotten() -> bool:
        # Released just after the broker confirmed the batch the device may apply first.
        return bool(await fpg.fetchval("SELECT count(*) FROM sync.holding") == 0)

    await wait_for(forgotten)


async def test_losing_access_through_the_objects_own_attribute_removes_it(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world, owner = await _holding(client, make_device, fpg, "Owner")
    assert await owner.store.get_committed("Order", world["order"]) == {
        "title": "pump",
        "secret": "s1",
    }

    await fpg.execute("UPDATE f_order SET status = 'closed' WHERE id = $1", world["order"])
    await until_committed(owner, "Order", world["order"], None)


async def test_losing_access_through_an_object_two_hops_away_removes_it(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await follow_world(fpg)
    clerk = await make_device(7, ["Clerk"])
    await sync_settled(
        client, clerk, [ObjectRef("Order", world["order"]), ObjectRef("Order", world["other"])]
    )

    # The region closes: neither order may be read any more.
    await fpg.execute("UPDATE f_region SET open = false WHERE id = $1", world["open"])
    await until_committed(clerk, "Order", world["order"], None)
    await until_committed(clerk, "Order", world["other"], None)


async def test_moving_a_related_object_away_removes_what_it_granted(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await follow_world(fpg)
    watcher = await make_device(7, ["Watcher"])
    watch = await insert(fpg, "f_watch", order_id=world["order"], user_id=7)
    await sync_settled(client, watcher, [ObjectRef("Order", world["order"])])
    assert await watcher.store.get_committed("Order", world["order"]) == {"title": "pump"}

    # The watch now names the other order: the first one's access went with its old value.
    await fpg.execute("UPDATE f_watch SET order_id = $1 WHERE id = $2", world["other"], watch)
    await until_committed(watcher, "Order", world["order"], None)
    # Append mode: the other order was never sent, so it is not pushed either.
    assert await watcher.store.ids("Order") == []


async def test_losing_a_role_removes_what_it_granted(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world, boss = await _holding(client, make_device, fpg, "Boss")

    await fpg.execute("DELETE FROM sync.user_role WHERE user_id = 7")
    await until_committed(boss, "Order", world["order"], None)


async def test_an_unfollowed_entity_and_objects_never_sent_are_not_pushed(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world = await follow_world(fpg)
    memo = await insert(fpg, "f_memo", text="first")
    boss = await make_device(7, ["Boss"])
    await sync_settled(client, boss, [ObjectRef("Memo", memo), ObjectRef("Order", world["order"])])

    await fpg.execute("UPDATE f_memo SET text = 'second' WHERE id = $1", memo)
    await fpg.execute("UPDATE f_order SET title = 'changed' WHERE id = $1", world["other"])
    await insert(fpg, "f_order", title="new", status="open", customer_id=world["customer"])
    # A change the device does get, after the others: once it is there, they were routed.
    await fpg.execute("UPDATE f_order SET title = 'marker' WHERE id = $1", world["order"])
    await until_committed(
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
    world, boss = await _holding(client, make_device, fpg, "Boss")
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
    world, boss = await _holding(client, make_device, fpg, "Boss")
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
    world, boss = await _holding(client, make_device, fpg, "Boss")
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


Targets = tuple[list[ObjectRef], list[Query]]


def _named(world: dict[str, int]) -> Targets:
    return [ObjectRef("Order", world["order"])], []


def _queried(world: dict[str, int]) -> Targets:
    # Found by a query: only known after the device was taken, so pending later.
    return [], [Query("Order", "[title = 'pump']")]


@pytest.mark.parametrize("targets", [_named, _queried], ids=["named", "queried"])
async def test_a_change_while_the_first_sync_is_in_flight_still_reaches_the_device(
    follow_worker: Worker,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    services: Services,
    targets: Callable[[dict[str, int]], Targets],
):
    world = await follow_world(fpg)
    boss = await make_device(7, ["Boss"])
    blocker = await asyncpg.connect(services.database_url)
    try:
        # The job's answer cannot be written: it reads and publishes, then waits to let go.
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE sync.job_result IN EXCLUSIVE MODE")
        objects, queries = targets(world)
        job = asyncio.create_task(
            client.synchronize_to_device(boss.session, objects=objects, queries=queries)
        )
        await wait_for(lambda: _title_is(boss, world["order"], "pump"))
        # Committed after the job read the order, before it recorded the holding.
        await fpg.execute("UPDATE f_order SET title = 'meanwhile' WHERE id = $1", world["order"])
        await wait_for(lambda: _queued(fpg))
        await transaction.commit()
        result = await job
        assert (result.status, [o.id for o in result.objects]) == ("done", [world["order"]])
    finally:
        await blocker.close()
    await wait_for(lambda: _title_is(boss, world["order"], "meanwhile"))


async def test_the_server_counts_what_a_device_holds_and_forgets_it_with_the_device(
    follow_worker: Worker,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractRobustChannel,
    accounts: BrokerAccounts,
    services: Services,
):
    world = await follow_world(fpg)
    memo = await insert(fpg, "f_memo", text="not followed")
    boss = await make_device(7, ["Boss"])
    refs = [ObjectRef("Order", world["order"]), ObjectRef("Order", world["other"])]
    await sync_settled(client, boss, [*refs, ObjectRef("Memo", memo)])
    device = await find_device(fpg, boss.device_id)
    assert device is not None and device["holdings"] == 2
    shown = await run_process(
        sys.executable,
        "-m",
        "syncctl",
        "device",
        "show",
        boss.device_id,
        cwd=ROOT,
        env={
            **os.environ,
            "SYNC_AMQP_URL": services.amqp_url,
            "SYNC_DATABASE_URL": services.database_url,
            "SYNC_MANAGEMENT_URL": services.management_url,
        },
    )
    assert "objects held (followed entities): 2" in shown.stdout.splitlines(), shown
    held = await fpg.fetch(
        "SELECT entity, object_id, members FROM sync.holding WHERE device_id = $1 "
        "ORDER BY object_id",
        boss.device_id,
    )
    members = sorted(["title", "status", "secret", "Order_Customer"])
    assert [tuple(row) for row in held] == [
        ("Order", world["order"], members),
        ("Order", world["other"], members),
    ]

    assert await unregister_device(fpg, amqp, accounts, boss.device_id)
    assert await fpg.fetchval("SELECT count(*) FROM sync.holding") == 0


async def test_past_the_backlog_limit_holding_devices_are_told_to_resync(
    services: Services,
    follow_model: DomainModel,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    clean_queues: None,
):
    world = await follow_world(fpg)
    boss = await make_device(7, ["Boss"])
    settings = worker_settings(services, model=FOLLOW_MODEL, follow_interval=0.05)
    worker = await Worker.start(settings, follow_model)
    try:
        await sync_settled(client, boss, [ObjectRef("Order", world["order"])])
    finally:
        await worker.stop()
    await fpg.execute("UPDATE sync.follow_state SET backlog_limit = 5")
    try:
        # The feed is down: the changes wait, up to the limit; past it capture stops.
        for number in range(10):
            await fpg.execute(
                "UPDATE f_order SET title = $1 WHERE id = $2", f"v{number}", world["order"]
            )
        assert await fpg.fetchval("SELECT overflowed_at IS NOT NULL FROM sync.follow_state")
        # Capture stopped before the ten changes were all written.
        assert await fpg.fetchval("SELECT count(*) FROM sync.change") < 10
        worker = await Worker.start(settings, follow_model)
        try:
            await wait_for(lambda: _resync_is(boss, "follow-overflow"))
            assert not await fpg.fetchval("SELECT overflowed_at IS NOT NULL FROM sync.follow_state")
            # Capture goes on after the overflow.
            await fpg.execute("UPDATE f_order SET title = 'after' WHERE id = $1", world["order"])
            await wait_for(lambda: _title_is(boss, world["order"], "after"))
        finally:
            await worker.stop()
    finally:
        await fpg.execute("UPDATE sync.follow_state SET backlog_limit = 1000000")


async def _resync_is(device: Device, reason: str) -> bool:
    return await device.store.resync_required() == reason


async def test_the_feed_reports_its_changes_in_metrics(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world, boss = await _holding(client, make_device, fpg, "Boss")
    await wait_for(lambda: _queued(fpg))
    before = _sample("sync_follow_changes_total")

    await fpg.execute("UPDATE f_order SET title = 'x' WHERE id = $1", world["order"])
    await wait_for(lambda: _title_is(boss, world["order"], "x"))

    async def counted() -> bool:
        # Counted once the captured rows are forgotten, just after the push was served.
        return _sample("sync_follow_changes_total") >= before + 1

    await wait_for(counted)
    assert _sample("sync_follow_leader") == 1
    assert _sample("sync_follow_backlog") is not None
    assert _sample("sync_follow_lag_seconds") is not None


def _sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


# The session holding the feed's lock (classid, objid = the two keys; objsubid 2).
_LEADER = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1 AND l.objid = 0
  AND l.objsubid = 2
"""


async def _leader(pg: asyncpg.Connection) -> str | None:
    name: str | None = await pg.fetchval(_LEADER, DEVICE_LOCK_CLASS + 1)
    return name.removesuffix(" follow feed") if name else None


async def _burst(pg: asyncpg.Connection, ids: list[int], numbers: range) -> None:
    for number in numbers:
        await pg.execute(
            "UPDATE f_order SET title = $1 WHERE id = ANY($2::bigint[])", f"v{number}", ids
        )
        await asyncio.sleep(0.01)


async def test_the_leading_worker_killed_mid_burst_misses_nothing(
    services: Services,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    clean_queues: None,
):
    world = await follow_world(fpg)
    boss = await make_device(7, ["Boss"])
    workers = {}
    for _ in range(2):
        name = f"follow-{uuid.uuid4().hex[:8]}"
        workers[name] = await spawn_worker(services, name, model=FOLLOW_MODEL, follow_interval=0.05)
    try:
        ids = [world["order"], world["other"]]
        await sync_settled(client, boss, [ObjectRef("Order", i) for i in ids])
        await wait_for(lambda: _has_leader(fpg), timeout=20)
        leader = await _leader(fpg)
        assert leader in workers

        await _burst(fpg, ids, range(40))
        workers[leader].kill()
        await workers[leader].wait()
        await _burst(fpg, ids, range(40, 80))
        await fpg.execute("DELETE FROM f_order WHERE id = $1", world["other"])

        await wait_for(lambda: _title_is(boss, world["order"], "v79"), timeout=30)
        await until_committed(boss, "Order", world["other"], None, timeout=30)
        assert await _leader(fpg) not in (None, leader)
    finally:
        for process in workers.values():
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _has_leader(pg: asyncpg.Connection) -> bool:
    return await _leader(pg) is not None


async def test_postgresql_restarted_mid_feed_misses_nothing(
    follow_worker: Worker,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    services: Services,
):
    world = await follow_world(fpg)
    boss = await make_device(7, ["Boss"])
    ids = [world["order"], world["other"]]
    await sync_settled(client, boss, [ObjectRef("Order", i) for i in ids])

    await _burst(fpg, ids, range(30))
    restart = await run_process(
        "bash", str(ROOT / "scripts" / "services.sh"), "restart-postgresql", cwd=ROOT, timeout=120
    )
    assert restart.code == 0, restart.stderr
    conn = await asyncpg.connect(services.database_url)
    try:
        await _burst(conn, ids, range(30, 60))
        await conn.execute("DELETE FROM f_order WHERE id = $1", world["other"])
    finally:
        await conn.close()

    await wait_for(lambda: _title_is(boss, world["order"], "v59"), timeout=60)
    await until_committed(boss, "Order", world["other"], None, timeout=60)


async def test_a_truncate_of_a_followed_table_tells_holding_devices_to_resync(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world, boss = await _holding(client, make_device, fpg, "Boss")

    # TRUNCATE names no rows: the feed cannot know what went, so the device resyncs.
    await fpg.execute("TRUNCATE f_order")
    await wait_for(lambda: _resync_is(boss, "follow-overflow"))
    assert await boss.store.ids("Order") == [world["order"]]


async def test_a_push_that_would_change_nothing_on_the_device_is_not_sent(
    follow_worker: Worker, client: SyncClient, make_device: MakeDevice, fpg: asyncpg.Connection
):
    world, boss = await _holding(client, make_device, fpg, "Boss")
    await wait_for(lambda: _queued(fpg))
    before = await _applied(boss)

    # A role that grants nothing: the holding is re-read, and is as the device has it.
    await fpg.execute("INSERT INTO sync.user_role VALUES (7, 'Visitor')")
    await wait_for(lambda: _queued(fpg))
    await fpg.execute("UPDATE f_order SET title = 'after' WHERE id = $1", world["order"])
    await wait_for(lambda: _title_is(boss, world["order"], "after"))
    assert await _applied(boss) == before + 1


async def test_the_worker_refuses_a_database_whose_capture_does_not_match_the_model(
    fpg: asyncpg.Connection, follow_model: DomainModel
):
    await fpg.execute("DROP TRIGGER sync_capture_update ON f_region")
    try:
        assert await schema_problems(fpg, follow_model) == [
            "table f_region: its follow capture is missing or out of date (run `syncctl db init`)"
        ]
    finally:
        await init_database(fpg, follow_model)
    assert await schema_problems(fpg, follow_model) == []


async def test_db_init_keeps_the_backlog_limit_and_forgets_what_is_no_longer_followed(
    fpg: asyncpg.Connection, follow_model: DomainModel, make_device: MakeDevice
):
    device = await make_device(7, ["Boss"], run_agent=False)
    await fpg.execute(
        "INSERT INTO sync.holding VALUES ($1, 'Memo', 1, 5, '{text}'), ($1, 'Order', 1, 5, '{}')",
        device.device_id,
    )
    await init_database(fpg, follow_model, backlog_limit=5000)
    await init_database(fpg, follow_model)
    try:
        assert await fpg.fetchval("SELECT backlog_limit FROM sync.follow_state") == 5000
        held = await fpg.fetch(
            "SELECT entity FROM sync.holding WHERE device_id = $1", device.device_id
        )
        assert [row["entity"] for row in held] == ["Order"]
    finally:
        await init_database(fpg, follow_model, backlog_limit=1_000_000)


async def test_each_pushed_batch_is_logged_with_the_change_that_caused_it(
    follow_worker: Worker,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
):
    world, clerk = await _holding(client, make_device, fpg, "Clerk")
    await wait_for(lambda: _queued(fpg))
    caplog.set_level(logging.INFO, logger="worker.handler")
    caplog.clear()

    await fpg.execute("UPDATE f_region SET name = 'far north' WHERE id = $1", world["open"])
    await fpg.execute("UPDATE f_region SET open = false WHERE id = $1", world["open"])
    await until_committed(clerk, "Order", world["order"], None)
    pushed = [r for r in caplog.records if r.getMessage() == "follow batch pushed"]
    assert pushed
    assert {getattr(r, "device_id", None) for r in pushed} == {clerk.device_id}
    assert all(
        getattr(r, "cause", None) == f"Order {world['order']} via Region {world['open']}"
        for r in pushed
    ), [getattr(r, "cause", None) for r in pushed]


async def test_a_device_busy_elsewhere_holds_up_neither_the_feed_nor_other_devices(
    follow_worker: Worker,
    client: SyncClient,
    make_device: MakeDevice,
    fpg: asyncpg.Connection,
    services: Services,
    caplog: pytest.LogCaptureFixture,
):
    world, busy = await _holding(client, make_device, fpg, "Boss")
    other = await make_device(8, ["Boss"])
    await sync_settled(client, other, [ObjectRef("Order", world["order"])])
    await wait_for(lambda: _queued(fpg))
    caplog.set_level(logging.INFO, logger="worker.follow")
    holder = await asyncpg.connect(services.database_url)
    try:
        # As a worker serving the device would: its lock held.
        await holder.execute(
            "SELECT pg_advisory_lock($1, hashtext($2))", DEVICE_LOCK_CLASS, busy.device_id
        )
        await fpg.execute("UPDATE f_order SET title = 'news' WHERE id = $1", world["order"])
        await wait_for(lambda: _title_is(other, world["order"], "news"))
        # The feed went on: the push for the busy device waits in the jobs queue.
        await wait_for(lambda: _queued(fpg))
        assert await _title_is(busy, world["order"], "pump")
        assert any(r.getMessage() == "pushes handed to the jobs queue" for r in caplog.records)
    finally:
        await holder.close()
    await wait_for(lambda: _title_is(busy, world["order"], "news"))


async def test_a_push_in_hand_before_a_job_of_its_device_keeps_each_its_own_answer(
    services: Services,
    follow_model: DomainModel,
    fpg: asyncpg.Connection,
    make_device: MakeDevice,
    amqp: aio_pika.abc.AbstractRobustChannel,
) -> None:
    # Found by the chaos soak (bench/chaos.py): a push claimed before a job of the same
    # device, handled together, got the job's answer and the job the push's.
    world = await follow_world(fpg)
    device = await make_device(7, ["Owner"])
    pool = await asyncpg.create_pool(services.database_url, min_size=1, max_size=2)
    publisher = BatchPublisher(
        amqp, await declare_exchange(amqp, CHANGES_EXCHANGE), batch_size=500, timeout=10, window=64
    )
    handler = JobHandler(pool, follow_model, publisher, chunk_size=500)

    def job(job_id: str, *orders: int) -> Claimed:
        objects = tuple(ObjectRef("Order", order) for order in orders)
        sync_job = SyncJob(
            job_id=job_id, session=device.session, origin="nanoflow", objects=objects
        )
        return Claimed(sync_job, device.device_id, 7, [("Order", order) for order in orders])

    try:
        (held,) = await handler.handle(device.device_id, [job("hold-it", world["order"])])
        assert isinstance(held, Answer) and held.synced == 1
        await fpg.execute("UPDATE f_order SET title = 'pump 2' WHERE id = $1", world["order"])
        push = dataclasses.replace(job("follow.1", world["order"]), claimed_user=None, push="x")
        outcomes = await handler.handle(
            device.device_id, [push, job("the-job", world["order"], world["other"])]
        )
    finally:
        await pool.close()
    answers = [outcome for outcome in outcomes if isinstance(outcome, Answer)]
    assert [(a.job_id, a.synced) for a in answers] == [("follow.1", 1), ("the-job", 2)]
