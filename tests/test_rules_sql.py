"""Each construct of the constraint language, compiled and evaluated by the real PostgreSQL.

One small data set; each case names the tickets the constraint must select for user 7.
"""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import insert
from worker import DomainModel
from worker.rules import Parameters, check_constraint

USER = 7
OTHER = 8
ALL = {"A", "B", "C", "D", "E", "F", "G"}


async def _data(pg: asyncpg.Connection) -> None:
    day = "date_trunc('day', now(), 'UTC')"
    north = await insert(
        pg, "t_project", name="Alpha", budget=1000, region="North", manager_id=USER
    )
    south = await insert(pg, "t_project", name="Beta", budget=50, region="south", manager_id=OTHER)
    bare = await insert(pg, "t_project", name="Gamma")
    assert (north, south, bare) == (1, 2, 3)
    await insert(pg, "t_assignment", project_id=south, user_id=USER)
    await insert(pg, "t_assignment", project_id=bare, user_id=OTHER)
    await pg.execute("INSERT INTO sync.user_role VALUES ($1, 'Boss')", OTHER)
    tickets = [
        # title, status, priority, cost, due (SQL), urgent, project, owner
        ("A", "Open", 1, "150.50", "now() + interval '1 day'", True, north, USER),
        ("B", "Closed", 5, "20", "now() - interval '2 days'", False, south, OTHER),
        ("C", None, None, None, "NULL", None, None, None),
        ("D", "OPEN", 3, "100", day, True, bare, OTHER),
        ("E", "50%_off", 2, "99.99", "now() + interval '10 days'", False, south, USER),
        ("F", "x' OR '1'='1", 4, "0", "now() - interval '10 days'", False, north, None),
        ("G", "", None, None, "NULL", False, None, None),
    ]
    for title, status, priority, cost, due, urgent, project, owner in tickets:
        await pg.execute(
            "INSERT INTO t_ticket"
            " (title, status, priority, cost, due, urgent, project_id, owner_id)"
            f" VALUES ($1, $2, $3, $4::numeric, {due}, $5, $6, $7)",
            title,
            status,
            priority,
            cost,
            urgent,
            project,
            owner,
        )


CASES: list[tuple[str, set[str]]] = [
    # Comparisons of each type; strings ignore case; an empty value never equals a literal.
    ("[status = 'Open']", {"A", "D"}),
    ("[status != 'Open']", {"B", "C", "E", "F", "G"}),
    ("[status = empty]", {"C", "G"}),
    ("[status != empty]", {"A", "B", "D", "E", "F"}),
    ("[status > 'closed']", {"A", "D", "F"}),
    ("[priority > 2]", {"B", "D", "F"}),
    ("[priority >= 3]", {"B", "D", "F"}),
    ("[priority < 2]", {"A"}),
    ("[priority <= 2]", {"A", "E"}),
    ("[priority != 1]", {"B", "C", "D", "E", "F", "G"}),
    ("[priority = -1]", set()),
    ("[cost >= 100]", {"A", "D"}),
    ("[cost > 99.99]", {"A", "D"}),
    ("[cost < 100.5]", {"B", "D", "E", "F"}),
    ("[urgent = true()]", {"A", "D"}),
    ("[urgent = false()]", {"B", "E", "F", "G"}),
    ("[urgent != true()]", {"B", "C", "E", "F", "G"}),
    ("[due = empty]", {"C", "G"}),
    ("[due > '2000-01-01']", {"A", "B", "D", "E", "F"}),
    ("[due > '2000-01-01T00:00:00+02:00']", {"A", "B", "D", "E", "F"}),
    # Tokens, quoted or not.
    ("[due >= '[%BeginOfCurrentDay%]']", {"A", "D", "E"}),
    ("[due < '[%CurrentDateTime%]']", {"B", "D", "F"}),
    ("[due < [%CurrentDateTime%]]", {"B", "D", "F"}),
    ("[Ticket_Owner = '[%CurrentUser%]']", {"A", "E"}),
    ("[Ticket_Owner = [%CurrentUser%]]", {"A", "E"}),
    ("[Ticket_Owner != '[%CurrentUser%]']", {"B", "C", "D", "F", "G"}),
    ("[Ticket_Owner = empty]", {"C", "F", "G"}),
    ("[Ticket_Owner != empty]", {"A", "B", "D", "E"}),
    ("[Ticket_Project = 1]", {"A", "F"}),
    ("[status = '[%UserRole_Closed%]']", {"B"}),
    # Functions: case-insensitive; % and _ are plain characters.
    ("[contains(status, 'pen')]", {"A", "D"}),
    ("[contains(status, '%')]", {"E"}),
    ("[contains(status, '_')]", {"E"}),
    ("[starts-with(status, 'o')]", {"A", "D"}),
    ("[starts-with(status, '50%')]", {"E"}),
    ("[contains(Ticket_Project/Project/name, 'ph')]", {"A", "F"}),
    # Logic: brackets, and, or, not, parentheses, precedence, constants.
    ("[status = 'Open' and priority = 1]", {"A"}),
    ("[status = 'Closed' or priority = 2]", {"B", "E"}),
    ("[status = 'Open'][Ticket_Owner = '[%CurrentUser%]']", {"A"}),
    ("[not(status = 'Open')]", {"B", "C", "E", "F", "G"}),
    ("[not(not(status = 'Open'))]", {"A", "D"}),
    ("[(priority = 1 or priority = 5) and not(urgent = true())]", {"B"}),
    ("[priority = 1 or priority = 5 and urgent = true()]", {"A"}),
    ("[true()]", ALL),
    ("[false()]", set()),
    ("[not(false())]", ALL),
    # Association paths: forward, several hops, reverse, System.User and its roles.
    ("[Ticket_Project/Project/Project_Manager = '[%CurrentUser%]']", {"A", "F"}),
    ("[Ticket_Project/Project/region = 'north']", {"A", "F"}),
    ("[Ticket_Project/Project/budget = empty]", {"D"}),
    ("[Ticket_Project/Project/budget > 60]", {"A", "F"}),
    (
        "[Ticket_Project/Project/Assignment_Project/Assignment/Assignment_User"
        " = '[%CurrentUser%]']",
        {"B", "E"},
    ),
    ("[Ticket_Project/Project]", {"A", "B", "D", "E", "F"}),
    ("[not(Ticket_Project/Project)]", {"C", "G"}),
    ("[Ticket_Owner]", {"A", "B", "D", "E"}),
    ("[Ticket_Owner/System.User]", {"A", "B", "D", "E"}),
    ("[Ticket_Owner/System.User/System.UserRoles = '[%UserRole_Boss%]']", {"B", "D"}),
    (
        "[Ticket_Owner/System.User/System.UserRoles != '[%UserRole_Boss%]']",
        {"A", "C", "E", "F", "G"},
    ),
    (
        "[Ticket_Project/Project/Project_Manager/System.User/System.UserRoles"
        " = '[%UserRole_Boss%]']",
        {"B", "E"},
    ),
    # Values are bound, never spliced: SQL in a literal is just text.
    ("[status = 'x'' OR ''1''=''1']", {"F"}),
    ("[status = 'nothing'' OR 1=1 --']", set()),
    ("[status = \"x' OR '1'='1\"]", {"F"}),
]


@pytest.mark.parametrize(("constraint", "expected"), CASES, ids=[case[0] for case in CASES])
async def test_constraint_selects_exactly(
    pg: asyncpg.Connection, model: DomainModel, constraint: str, expected: set[str]
):
    await _data(pg)
    params = Parameters()
    condition = check_constraint(constraint, entities=model.entities, entity="Ticket").sql(params)
    records = await pg.fetch(
        f"SELECT t0.title FROM t_ticket t0 WHERE {condition}", *params.values(user_id=USER)
    )
    assert {record["title"] for record in records} == expected


async def test_reverse_hop_from_the_owned_side(pg: asyncpg.Connection, model: DomainModel):
    await _data(pg)
    params = Parameters()
    condition = check_constraint(
        "[Assignment_Project/Assignment/Assignment_User = '[%CurrentUser%]']",
        entities=model.entities,
        entity="Project",
    ).sql(params)
    records = await pg.fetch(
        f"SELECT t0.name FROM t_project t0 WHERE {condition}", *params.values(user_id=USER)
    )
    assert {record["name"] for record in records} == {"Beta"}


async def test_created_tables_index_their_association_columns(pg: asyncpg.Connection):
    # Constraints follow associations from either side; without these, a reverse hop scans.
    indexed = await pg.fetch(
        "SELECT a.attname FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
        "WHERE i.indrelid = 'public.t_assignment'::regclass AND i.indnatts = 1"
    )
    assert {"project_id", "user_id"} <= {record["attname"] for record in indexed}
