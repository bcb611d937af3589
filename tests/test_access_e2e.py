"""Access rules with constraints, end to end: what a device holds is what its user may read."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from broker import ObjectRef, SyncClient
from broker.topology import device_queue_name
from tests.conftest import MakeDevice, insert, sync_settled

pytestmark = pytest.mark.usefixtures("worker")

USER = 7
OTHER = 8


def _outcomes(result) -> dict[int, tuple[str, str | None]]:
    return {item.id: (item.outcome, item.reason) for item in result.objects}


async def test_user_who_loses_access_sees_the_object_removed_and_back_when_regained(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Member"])
    ticket = await insert(pg, "t_ticket", title="mine", priority=2, owner_id=USER)
    ref = ObjectRef("Ticket", ticket)
    await sync_settled(client, device, [ref])
    assert await device.store.get_committed("Ticket", ticket) == {
        "title": "mine",
        "priority": 2,
        "Ticket_Owner": USER,
    }

    await pg.execute("UPDATE t_ticket SET owner_id = $1 WHERE id = $2", OTHER, ticket)
    result = await sync_settled(client, device, [ref])
    assert _outcomes(result) == {ticket: ("removed", "no-access")}
    assert await device.store.get_committed("Ticket", ticket) is None

    await pg.execute("UPDATE t_ticket SET owner_id = $1 WHERE id = $2", USER, ticket)
    result = await sync_settled(client, device, [ref])
    assert _outcomes(result) == {ticket: ("synced", None)}
    assert await device.store.get_committed("Ticket", ticket) is not None


async def test_rules_of_two_roles_give_the_union_of_their_members_per_object(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Member", "Accountant"])
    project = await insert(pg, "t_project", name="P", manager_id=USER)
    common = {"status": "Open", "urgent": True, "secret": "s", "priority": 1}
    all_three = await insert(
        pg, "t_ticket", title="a", cost=Decimal(200), project_id=project, owner_id=USER, **common
    )
    accountant_only = await insert(pg, "t_ticket", title="b", cost=Decimal(500), **common)
    none = await insert(pg, "t_ticket", title="c", cost=Decimal(50), owner_id=OTHER, **common)
    refs = [ObjectRef("Ticket", i) for i in (all_three, accountant_only, none)]
    result = await sync_settled(client, device, refs)

    assert _outcomes(result) == {
        all_three: ("synced", None),
        accountant_only: ("synced", None),
        none: ("removed", "no-access"),
    }
    assert await device.store.get_committed("Ticket", all_three) == {
        "title": "a",
        "status": "Open",
        "priority": 1,
        "cost": "200",
        "Ticket_Project": project,
        "Ticket_Owner": USER,
    }
    assert await device.store.get_committed("Ticket", accountant_only) == {
        "title": "b",
        "cost": "500",
    }


async def test_two_hop_and_reverse_association_paths(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Member"])
    managed = await insert(pg, "t_project", name="managed", budget=Decimal(9), manager_id=USER)
    assigned = await insert(pg, "t_project", name="assigned", budget=Decimal(8), manager_id=OTHER)
    foreign = await insert(pg, "t_project", name="foreign", manager_id=OTHER)
    await insert(pg, "t_assignment", project_id=assigned, user_id=USER)
    await insert(pg, "t_assignment", project_id=foreign, user_id=OTHER)
    in_managed = await insert(pg, "t_ticket", title="m", status="Open", project_id=managed)
    in_foreign = await insert(pg, "t_ticket", title="f", status="Open", project_id=foreign)

    projects = [ObjectRef("Project", i) for i in (managed, assigned, foreign)]
    tickets = [ObjectRef("Ticket", i) for i in (in_managed, in_foreign)]
    result = await sync_settled(client, device, projects + tickets)

    assert await device.store.get_committed("Ticket", in_managed) == {
        "title": "m",
        "status": "Open",
        "Ticket_Project": managed,
    }
    assert await device.store.get_committed("Ticket", in_foreign) is None
    # Managers read every member; team members (the reverse hop) only the name.
    assert (await device.store.get_committed("Project", managed) or {})["budget"] == "9"
    assert await device.store.get_committed("Project", assigned) == {"name": "assigned"}
    assert _outcomes(result)[foreign] == ("removed", "no-access")


async def test_constraint_with_a_date_token(client: SyncClient, make_device: MakeDevice, pg):
    device = await make_device(USER, ["Triage"])
    now = datetime.now(UTC)
    values = {"urgent": True, "status": "Open"}
    tomorrow = await insert(pg, "t_ticket", title="t", due=now + timedelta(days=1), **values)
    last_week = await insert(pg, "t_ticket", title="w", due=now - timedelta(days=7), **values)
    undated = await insert(pg, "t_ticket", title="u", **values)
    closed = await insert(pg, "t_ticket", title="c", urgent=True, status="closed")
    refs = [ObjectRef("Ticket", i) for i in (tomorrow, last_week, undated, closed)]
    result = await sync_settled(client, device, refs)

    assert _outcomes(result) == {
        tomorrow: ("synced", None),
        last_week: ("removed", "no-access"),
        undated: ("synced", None),
        closed: ("removed", "no-access"),
    }
    assert set(await device.store.get_committed("Ticket", tomorrow) or {}) == {
        "title",
        "urgent",
        "due",
    }


async def test_unreadable_attributes_never_leave_the_server(
    client: SyncClient, make_device: MakeDevice, pg, amqp
):
    device = await make_device(USER, ["Member"], run_agent=False)
    ticket = await insert(
        pg, "t_ticket", title="t", owner_id=USER, secret="TOP-SECRET-7", cost=Decimal("12345.67")
    )
    result = await client.synchronize_to_device(
        device.session, objects=[ObjectRef("Ticket", ticket)]
    )
    assert result.status == "done"
    queue = await amqp.get_queue(device_queue_name(device.device_id))
    message = await queue.get(no_ack=True, fail=False)
    assert message is not None
    assert b"TOP-SECRET-7" not in message.body
    assert b"12345.67" not in message.body
    (change,) = json.loads(message.body)["changes"]
    assert set(change["data"]) == {"title", "priority", "Ticket_Owner"}


async def test_sql_in_attribute_values_is_stored_as_text(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(USER, ["Member"])
    title = "x'); DROP TABLE t_ticket; --"
    ticket = await insert(pg, "t_ticket", title=title, owner_id=USER)
    await sync_settled(client, device, [ObjectRef("Ticket", ticket)])
    assert (await device.store.get_committed("Ticket", ticket) or {})["title"] == title
    assert await pg.fetchval("SELECT count(*) FROM t_ticket") == 1
