"""Latest state wins (SPEC §7): with four workers on one job stream, every device ends
with the state read by the latest-reading job for each object, whatever the interleaving.

The dangerous case is a change that does not raise the object's version: access lost
through another object (a project's manager changes). The device's version check cannot
order those; only the per-device serialization of jobs can.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator

import asyncpg
import pytest

from broker import ObjectRef, SyncClient, SyncResult
from tests.conftest import Device, MakeDevice, Services, insert, wait_for, worker_settings
from worker import DomainModel, Worker

USERS = (7, 8, 9)
TICKETS = 300


@pytest.fixture
async def four_workers(
    services: Services, model: DomainModel, pg: asyncpg.Connection, clean_queues: None
) -> AsyncIterator[list[Worker]]:
    # Small batches make a big job publish for long, so jobs overlap.
    workers = [
        await Worker.start(
            worker_settings(services, name=f"ordering-{i}", batch_size=10, prefetch=4), model
        )
        for i in range(4)
    ]
    yield workers
    for running in workers:
        await running.stop()


@pytest.mark.usefixtures("four_workers")
async def test_job_read_later_is_applied_later_while_an_earlier_one_still_publishes(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(7, ["Member"])
    project = await insert(pg, "t_project", name="p", manager_id=7)
    ids = await _tickets(pg, 10_000, project)
    last = ObjectRef("Ticket", ids[-1])
    big = asyncio.create_task(
        client.synchronize_to_device(
            device.session, objects=[ObjectRef("Ticket", i) for i in ids], timeout=60
        )
    )
    # The big job has read (its first batches are on the device) and is still publishing.
    await wait_for(lambda: _holds_any(device), timeout=20, every=0.005)
    await pg.execute("UPDATE t_project SET manager_id = 8 WHERE id = $1", project)
    small = await client.synchronize_to_device(device.session, objects=[last], timeout=60)

    assert [(o.outcome, o.reason) for o in small.objects] == [("removed", "no-access")]
    await device.settled(await big, timeout=60)
    await device.settled(small)
    assert await device.store.get_committed("Ticket", last.id) is None


@pytest.mark.usefixtures("four_workers")
async def test_latest_state_wins_for_every_device_and_object(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    seed = int(os.environ.get("SYNC_TEST_SEED", "20261126"))
    rng = random.Random(seed)
    devices = {user: await make_device(user, ["Member"]) for user in USERS}
    projects = [await insert(pg, "t_project", name=f"p{i}", manager_id=USERS[i]) for i in range(3)]
    ids = [
        await insert(
            pg,
            "t_ticket",
            title=f"t{i}",
            status="Open",
            priority=i,
            project_id=rng.choice(projects),
            owner_id=rng.choice((*USERS, None)),
        )
        for i in range(TICKETS)
    ]

    jobs: list[asyncio.Task[tuple[int, SyncResult]]] = []
    for round_ in range(30):
        await _mutate(pg, rng, projects, ids, round_)
        for _ in range(rng.randint(1, 4)):
            user = rng.choice(USERS)
            named = rng.sample(ids, rng.randint(1, TICKETS))
            jobs.append(asyncio.create_task(_job(client, devices[user], named)))
        await asyncio.sleep(rng.uniform(0, 0.02))
    # Big jobs read, then the managers move (no ticket version changes), then each
    # device asks for everything while the big jobs may still be publishing. Each job
    # names the objects in its own order, as apps do.
    for user in USERS:
        jobs.append(asyncio.create_task(_job(client, devices[user], rng.sample(ids, TICKETS))))
    await asyncio.sleep(0.01)
    for project in projects:
        await pg.execute(
            "UPDATE t_project SET manager_id = $1 WHERE id = $2", rng.choice(USERS), project
        )
    for user in USERS:
        jobs.append(asyncio.create_task(_job(client, devices[user], rng.sample(ids, TICKETS))))

    results = await asyncio.gather(*jobs)
    for user, device in devices.items():
        batch_ids = [b for owner, result in results if owner == user for b in result.batch_ids]
        await device.store.wait_for_batches(batch_ids, timeout=60)
    for user, device in devices.items():
        expected = await _expected(pg, user)
        held = {
            object_id: await device.store.get_committed("Ticket", object_id)
            for object_id in await device.store.ids("Ticket")
        }
        assert held == {object_id: data for object_id, (_, data) in expected.items()}, seed
        for object_id, (version, _) in expected.items():
            assert await device.store.version("Ticket", object_id) == version, seed


async def _job(client: SyncClient, device: Device, ids: list[int]) -> tuple[int, SyncResult]:
    result = await client.synchronize_to_device(
        device.session, objects=[ObjectRef("Ticket", i) for i in ids], timeout=60
    )
    assert result.status == "done", result
    return device.session.user_id, result


async def _mutate(
    pg: asyncpg.Connection, rng: random.Random, projects: list[int], ids: list[int], round_: int
) -> None:
    for object_id in rng.sample(ids, 5):
        await pg.execute(
            "UPDATE t_ticket SET title = $1, status = $2, owner_id = $3 WHERE id = $4",
            f"t{object_id}-r{round_}",
            rng.choice(("Open", "Closed")),
            rng.choice((*USERS, None)),
            object_id,
        )
    await pg.execute(
        "UPDATE t_project SET manager_id = $1 WHERE id = $2",
        rng.choice(USERS),
        rng.choice(projects),
    )


async def _expected(pg: asyncpg.Connection, user: int) -> dict[int, tuple[int, dict[str, object]]]:
    """The tickets ``user`` may read now, with the members the Member rules grant."""
    rows = await pg.fetch(
        "SELECT t.id, t.version, t.title, t.status, t.priority, t.project_id, t.owner_id, "
        "p.manager_id FROM t_ticket t LEFT JOIN t_project p ON p.id = t.project_id"
    )
    expected: dict[int, tuple[int, dict[str, object]]] = {}
    for row in rows:
        data: dict[str, object] = {}
        if row["manager_id"] == user:
            data.update(title=row["title"], status=row["status"], Ticket_Project=row["project_id"])
        if row["owner_id"] == user:
            data.update(title=row["title"], priority=row["priority"], Ticket_Owner=user)
        if data:
            expected[row["id"]] = (row["version"], data)
    return expected


async def _tickets(pg: asyncpg.Connection, count: int, project: int) -> list[int]:
    records = await pg.fetch(
        "INSERT INTO t_ticket (title, status, project_id) "
        "SELECT 'ticket ' || g, 'Open', $2 FROM generate_series(1, $1) g RETURNING id",
        count,
        project,
    )
    return [record["id"] for record in records]


async def _holds_any(device: Device) -> bool:
    return bool(await device.store.ids("Ticket"))
