"""Lists by constraint (SPEC §13) on the real services: a job's queries are listed with
the user's access rules and go the way named objects go."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from broker import ObjectList, ObjectRef, Query, SyncClient
from broker.models import MAX_OBJECTS_PER_JOB
from tests.conftest import (
    MODEL_PATH,
    ROOT,
    Device,
    MakeDevice,
    Services,
    dead_letters,
    insert,
    run_process,
)
from worker import DomainModel
from worker.access import AccessPolicy
from worker.errors import JobRejected
from worker.queries import CompiledQuery, list_targets
from worker.rules import check_constraint

pytestmark = pytest.mark.usefixtures("worker")

USER = 7
OTHER_USER = 8


def _outcomes(result) -> list[tuple[str, int, str, str | None]]:
    return [(o.entity, o.id, o.outcome, o.reason) for o in result.objects]


async def _sync(client: SyncClient, device: Device, *queries: Query, **targets):
    result = await client.synchronize_to_device(device.session, queries=queries, **targets)
    if result.status == "done":
        await device.settled(result)
    return result


async def test_a_query_lists_only_what_the_user_may_read_with_readable_members(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(USER, ["Member"])
    mine = await insert(pg, "t_project", name="mine", manager_id=USER)
    theirs = await insert(pg, "t_project", name="theirs", manager_id=OTHER_USER)
    # Member reads a ticket's status through its project's manager only (tests/model.yaml).
    listed = await insert(
        pg, "t_ticket", title="a", status="Open", secret="s", project_id=mine, priority=1
    )
    await insert(pg, "t_ticket", title="b", status="Closed", project_id=mine)
    # Readable (their own), but not its status: a match would tell them the status.
    await insert(pg, "t_ticket", title="c", status="Open", project_id=theirs, owner_id=USER)
    # Not readable at all: no trace of it anywhere.
    await insert(pg, "t_ticket", title="d", status="Open", project_id=theirs, owner_id=OTHER_USER)

    result = await _sync(client, device, Query("Ticket", "[status = 'Open']"))

    assert (result.status, result.synced, result.removed, result.skipped) == ("done", 1, 0, 0)
    assert _outcomes(result) == [("Ticket", listed, "synced", None)]
    assert await device.store.ids("Ticket") == [listed]
    assert await device.store.get_committed("Ticket", listed) == {
        "title": "a",
        "status": "Open",
        "Ticket_Project": mine,
    }


async def test_a_query_on_a_member_the_user_may_not_read_lists_nothing(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    # Worker reads a task's title and status, not its secret.
    device = await make_device(USER, ["Worker"])
    await insert(pg, "t_task", title="a", secret="hunter2")

    result = await _sync(client, device, Query("Task", "[secret = 'hunter2']"))

    assert (result.status, result.objects, result.batch_ids) == ("done", (), ())


async def test_current_user_and_current_datetime_tokens(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(USER, ["Admin"])
    now = datetime.now(UTC)
    past = await insert(pg, "t_task", title="past", owner_id=USER, due=now - timedelta(days=1))
    await insert(pg, "t_task", title="future", owner_id=USER, due=now + timedelta(days=1))
    await insert(pg, "t_task", title="no date", owner_id=USER)
    await insert(pg, "t_task", title="other's", owner_id=OTHER_USER, due=now - timedelta(days=1))

    result = await _sync(
        client,
        device,
        Query("Task", "[Task_Owner = '[%CurrentUser%]'][due < '[%CurrentDateTime%]']"),
    )

    assert _outcomes(result) == [("Task", past, "synced", None)]
    assert await device.store.ids("Task") == [past]


async def test_a_query_that_matches_nothing_is_done_and_syncs_nothing(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(USER, ["Admin"])
    await insert(pg, "t_task", title="a", status="Open")

    result = await _sync(client, device, Query("Task", '[status = "Closed"]'))

    assert (result.status, result.reason, result.synced) == ("done", None, 0)
    assert (result.objects, result.batch_ids) == ((), ())
    assert await device.store.ids("Task") == []


@pytest.mark.parametrize(
    ("constraint", "reason"),
    [
        (
            "[stauts = 'Open']",
            "invalid-query: Task: line 1, column 2: unknown member 'stauts' of Task",
        ),
        (
            "[status = 'Open'\n or title = ]",
            "invalid-query: Task: line 2, column 13: expected a value (a string, a number, "
            "empty, true(), false() or a token), found ']'",
        ),
        (
            "[Task_Owner/System.User/System.UserRoles = '[%UserRole_Admin%]']",
            "invalid-query: Task: line 1, column 2: a query cannot follow association "
            "'Task_Owner' to another object; compare members of Task itself",
        ),
        (
            "[due < '[%Yesterday%]']",
            "invalid-query: Task: line 1, column 8: unsupported token [%Yesterday%]; "
            "supported: CurrentUser, CurrentDateTime, BeginOfCurrentDay, UserRole_<name>",
        ),
    ],
)
async def test_a_bad_query_rejects_the_job_with_its_position(
    client: SyncClient,
    make_device: MakeDevice,
    pg: asyncpg.Connection,
    amqp,
    constraint: str,
    reason: str,
):
    device = await make_device(USER, ["Admin"])
    task = await insert(pg, "t_task", title="fine on its own", status="Open")

    result = await _sync(
        client, device, Query("Task", constraint), objects=[ObjectRef("Task", task)]
    )

    assert (result.status, result.reason) == ("rejected", reason)
    assert (await dead_letters(amqp)).get(result.job_id) == reason
    await _nothing_arrives(client, device, pg)


@pytest.mark.parametrize(
    ("entity", "reason"),
    [
        ("Nope", "unknown-entity: Nope"),
        ("Draft", "non-persistable-entity: Draft"),
        ("File", "file-entity: File"),
        ("Report", "not-in-offline-profile: Report"),
    ],
)
async def test_a_query_on_an_entity_that_cannot_be_synced_rejects_the_job(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection, entity: str, reason: str
):
    device = await make_device(USER, ["Admin"])
    result = await _sync(client, device, Query(entity, "[text = 'x']"))
    assert (result.status, result.reason) == ("rejected", reason)


async def test_a_query_over_the_limit_rejects_the_job_and_publishes_nothing(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection, amqp
):
    device = await make_device(USER, ["Admin"])
    await pg.execute(
        "INSERT INTO t_note (text) SELECT 'n' FROM generate_series(1, $1)", MAX_OBJECTS_PER_JOB + 1
    )

    result = await _sync(client, device, Query("Note", "[text = 'n']"))

    reason = "query-too-large: Note matches more than 100000 objects; at most 100000 per job"
    assert (result.status, result.reason) == ("rejected", reason)
    assert (await dead_letters(amqp)).get(result.job_id) == reason
    await _nothing_arrives(client, device, pg)


async def test_the_limit_counts_named_and_listed_objects_together(
    services: Services, model: DomainModel, pg: asyncpg.Connection
):
    """Straight on the database: 99,998 named objects leave room for two listed ones."""
    rows = [await insert(pg, "t_task", title="x") for _ in range(3)]
    named = [("Task", 10**9 + n) for n in range(MAX_OBJECTS_PER_JOB - 2)]
    constraint = check_constraint("[title = 'x']", entities=model.entities, entity="Task")
    query = CompiledQuery("Task", constraint)
    policy = AccessPolicy(model)
    conn = await asyncpg.connect(services.database_url)
    try:

        async def listed(targets: list[tuple[str, int]]) -> list[tuple[str, int]]:
            return await list_targets(
                conn,
                policy,
                targets,
                [query],
                user_id=USER,
                roles=frozenset({"Admin"}),
                chunk_size=2,
            )

        # Named objects a query lists too count once.
        assert await listed([*named[:-1], ("Task", rows[0])]) == [
            *named[:-1],
            ("Task", rows[0]),
            ("Task", rows[1]),
            ("Task", rows[2]),
        ]
        with pytest.raises(JobRejected) as rejected:
            await listed(named)
    finally:
        await conn.close()
    assert rejected.value.reason == (
        "query-too-large: Task matches more than 2 objects besides the 99998 the job has "
        "already; at most 100000 per job"
    )


async def test_sql_in_a_literal_is_a_value(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(USER, ["Admin"])
    evil = "x'); DROP TABLE t_task; --"
    plain = await insert(pg, "t_task", title="x")
    same = await insert(pg, "t_task", title=evil)

    result = await _sync(
        client,
        device,
        Query("Task", "[title = 'x''); DROP TABLE t_task; --']"),
        Query("Task", '[contains(title, "\'); DROP")]'),
    )

    assert _outcomes(result) == [("Task", same, "synced", None)]
    assert await pg.fetchval("SELECT count(*) FROM t_task") == 2
    assert plain not in await device.store.ids("Task")


async def test_an_object_named_and_found_by_a_query_is_synced_once(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(USER, ["Admin"])
    first, second, third = [await insert(pg, "t_task", title="t", status="Open") for _ in "abc"]

    result = await _sync(
        client,
        device,
        Query("Task", "[status = 'Open']"),
        Query("Task", "[title = 't']"),
        objects=[ObjectRef("Task", third)],
        lists=[ObjectList("Task", [second])],
    )

    # The named ones first, as named; then what the queries found, by id.
    assert [o.id for o in result.objects] == [third, second, first]
    assert result.synced == 3
    assert await device.store.ids("Task") == [first, second, third]


async def test_autocommitted_rows_a_query_finds_are_skipped(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(USER, ["Admin"])
    committed = await insert(pg, "t_task", title="t")
    autocommitted = await insert(pg, "t_task", title="t", autocommitted=True)

    result = await _sync(client, device, Query("Task", "[title = 't']"))

    assert _outcomes(result) == [
        ("Task", committed, "synced", None),
        ("Task", autocommitted, "skipped", "autocommitted"),
    ]
    assert await device.store.ids("Task") == [committed]


async def test_jobs_with_and_without_queries_of_one_device_each_get_their_answer(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(USER, ["Admin"])
    tasks = [await insert(pg, "t_task", title=str(n)) for n in range(3)]

    results = await asyncio.gather(
        _sync(client, device, objects=[ObjectRef("Task", tasks[0])]),
        _sync(client, device, Query("Task", "[title = '1']")),
        _sync(client, device, Query("Task", "[title = 'nope']"), objects=[ObjectRef("Task", 99)]),
        _sync(client, device, objects=[ObjectRef("Task", tasks[2])]),
    )

    assert [_outcomes(result) for result in results] == [
        [("Task", tasks[0], "synced", None)],
        [("Task", tasks[1], "synced", None)],
        [("Task", 99, "removed", "gone")],
        [("Task", tasks[2], "synced", None)],
    ]
    assert await device.store.ids("Task") == tasks


async def test_syncctl_sync_with_a_query(
    services: Services, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(USER, ["Admin"])
    open_task = await insert(pg, "t_task", title="a", status="Open")
    await insert(pg, "t_task", title="b", status="Done")
    env = {
        **os.environ,
        "SYNC_AMQP_URL": services.amqp_url,
        "SYNC_DATABASE_URL": services.database_url,
        "SYNC_MODEL": str(MODEL_PATH),
    }

    run = await run_process(
        sys.executable,
        "-m",
        "syncctl",
        "sync",
        "--user",
        str(USER),
        "--device",
        device.device_id,
        "--query",
        'Task[status = "Open"]',
        cwd=ROOT,
        env=env,
    )

    assert run.code == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["status"], result["synced"]) == ("done", 1)
    await device.store.wait_for_batches(result["batch_ids"], timeout=10)
    assert await device.store.ids("Task") == [open_task]


async def _nothing_arrives(client: SyncClient, device: Device, pg: asyncpg.Connection) -> None:
    """A later job's batches are the only ones the device gets."""
    later = await insert(pg, "t_note", text="later")
    result = await _sync(client, device, objects=[ObjectRef("Note", later)])
    assert result.status == "done"
    assert await device.store.ids("Task") == []
    assert await device.store.ids("Note") == [later]
