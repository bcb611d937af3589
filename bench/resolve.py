"""Resolve throughput: objects/s the worker reads from PostgreSQL with its access rules.

    .venv/bin/python -m bench.resolve [--rows 100000] [--runs 5]

Seeds its own ``bench_*`` tables (projects, items, assignments), then times the worker's
hot path, ``worker.resolver.fetch_rows``, over every item id in one read-only transaction
with the worker's default chunk size, for three sets of roles: a rule without a
constraint, a two-hop constraint (Item -> Project -> manager) and a reverse hop
(Item -> Project <- Assignment -> user). The raw ceiling is a plain ``SELECT`` of the same
columns over the same chunks, without rules or JSON writing. Each figure is the median
of several runs after a warm-up; the number of readable objects is checked against a
direct SQL count, so a broken constraint cannot give a fast but wrong figure. The bench
tables are dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from bench.report import Figure, as_table
from bench.rig import service_env
from broker.models import ObjectKey
from worker.access import UPSERT, AccessPolicy
from worker.model import DomainModel, parse_model
from worker.resolver import fetch_rows
from worker.schema import init_database
from worker.settings import WorkerSettings

MODEL = """
entities:
  Item:
    table: bench_item
    offline: true
    attributes: {title: string, status: string, amount: decimal}
    associations:
      Item_Project: {to: Project, column: project_id}
    access:
      - roles: [All]
        read: "*"
      - roles: [Manager]
        read: "*"
        constraint: "[Item_Project/Project/Project_Manager = '[%CurrentUser%]']"
      - roles: [Team]
        read: "*"
        constraint: >-
          [Item_Project/Project/Assignment_Project/Assignment/Assignment_User
          = '[%CurrentUser%]']
  Project:
    table: bench_project
    attributes: {name: string}
    associations:
      Project_Manager: {to: System.User, column: manager_id}
  Assignment:
    table: bench_assignment
    associations:
      Assignment_Project: {to: Project, column: project_id}
      Assignment_User: {to: System.User, column: user_id}
"""

TABLES = ("bench_item", "bench_project", "bench_assignment")
PROJECTS = 1_000
# Managers are users 1..100, 10 projects each: a manager may read 1% of the items.
MANAGERS = 100
MANAGER = 42
# Team members are users 1001..1200, 5 per project, 25 projects each: 2.5% of the items.
TEAM_SIZE = 5
TEAM_USERS = 200
TEAM_MEMBER = 1_007

PROJECTS_SQL = (
    "INSERT INTO bench_project (id, name, manager_id) "
    "SELECT g, 'project ' || g, 1 + (g - 1) % $2::int FROM generate_series(1, $1::int) g"
)
ITEMS_SQL = (
    "INSERT INTO bench_item (id, title, status, amount, project_id) "
    "SELECT g, 'item ' || g, (ARRAY['Open', 'Closed', 'Pending'])[1 + g % 3], "
    "(g % 100000) / 100.0, 1 + (g - 1) % $2::int FROM generate_series(1, $1::int) g"
)
# Distinct users per project: 41 * k mod 200 differs for k in 0..4.
ASSIGNMENTS_SQL = (
    "INSERT INTO bench_assignment (project_id, user_id) "
    "SELECT p, 1001 + (7 * p + 41 * k) % $3::int "
    "FROM generate_series(1, $1::int) p, generate_series(0, $2::int - 1) k"
)

RAW_SQL = (
    "SELECT id, version, autocommitted, title, status, amount, project_id "
    "FROM bench_item WHERE id = ANY($1::bigint[])"
)

# One pass over all ids in an open transaction; returns how many objects were readable.
Pass = Callable[[asyncpg.Connection], Awaitable[int]]


@dataclass(frozen=True)
class Case:
    label: str
    run: Pass
    expected: int


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _drop_tables(conn: asyncpg.Connection) -> None:
    await conn.execute(f"DROP TABLE IF EXISTS {', '.join(TABLES)}")


async def _ensure_index(conn: asyncpg.Connection, table: str, column: str) -> None:
    """Index ``column`` unless the schema already did (its first key column)."""
    indexed = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
        "WHERE i.indrelid = $1::regclass AND a.attname = $2)",
        table,
        column,
    )
    if not indexed:
        await conn.execute(f"CREATE INDEX {table}_{column}_bench_idx ON {table} ({column})")


async def _seed(conn: asyncpg.Connection, model: DomainModel, rows: int) -> None:
    await _drop_tables(conn)
    await init_database(conn, model, create_tables=True)
    await conn.execute(PROJECTS_SQL, PROJECTS, MANAGERS)
    await conn.execute(ITEMS_SQL, rows, PROJECTS)
    await conn.execute(ASSIGNMENTS_SQL, PROJECTS, TEAM_SIZE, TEAM_USERS)
    for entity in model.entities.values():
        assert entity.table is not None
        for association in entity.associations.values():
            await _ensure_index(conn, entity.table, association.column)
    await conn.execute(f"ANALYZE {', '.join(TABLES)}")


def _resolve_pass(
    policy: AccessPolicy, refs: list[ObjectKey], role: str, user_id: int, chunk_size: int
) -> Pass:
    async def run(conn: asyncpg.Connection) -> int:
        found = await fetch_rows(
            conn, policy, refs, user_id=user_id, roles=frozenset({role}), chunk_size=chunk_size
        )
        records = found["Item"].records
        assert len(records) == len(refs), f"{role}: {len(records)} of {len(refs)} rows found"
        return sum(1 for record in records.values() if record[UPSERT] is not None)

    return run


def _raw_pass(chunks: Sequence[list[int]]) -> Pass:
    async def run(conn: asyncpg.Connection) -> int:
        count = 0
        for chunk in chunks:
            count += len(await conn.fetch(RAW_SQL, chunk))
        return count

    return run


async def _cases(
    conn: asyncpg.Connection, model: DomainModel, rows: int, chunk_size: int
) -> list[Case]:
    policy = AccessPolicy(model)
    ids = list(range(1, rows + 1))
    refs = [("Item", i) for i in ids]
    chunks = [ids[start : start + chunk_size] for start in range(0, rows, chunk_size)]
    managed = await conn.fetchval(
        "SELECT count(*) FROM bench_item i JOIN bench_project p ON p.id = i.project_id "
        "WHERE p.manager_id = $1",
        MANAGER,
    )
    assigned = await conn.fetchval(
        "SELECT count(*) FROM bench_item WHERE project_id IN "
        "(SELECT project_id FROM bench_assignment WHERE user_id = $1)",
        TEAM_MEMBER,
    )
    return [
        Case("raw SELECT, no rules, no Row", _raw_pass(chunks), rows),
        Case("no constraint", _resolve_pass(policy, refs, "All", MANAGER, chunk_size), rows),
        Case("two-hop", _resolve_pass(policy, refs, "Manager", MANAGER, chunk_size), managed),
        Case("reverse hop", _resolve_pass(policy, refs, "Team", TEAM_MEMBER, chunk_size), assigned),
    ]


async def _measure(conn: asyncpg.Connection, case: Case, rows: int) -> float:
    """Objects/s of one pass, after checking how many were readable."""
    async with conn.transaction(readonly=True):
        started = time.perf_counter()
        readable = await case.run(conn)
        elapsed = time.perf_counter() - started
    assert readable == case.expected, f"{case.label}: {readable} readable, {case.expected} expected"
    return rows / elapsed


async def _run_all(
    conn: asyncpg.Connection, cases: list[Case], rows: int, runs: int
) -> dict[str, list[float]]:
    _progress("warm-up: " + ", ".join(case.label for case in cases))
    for case in cases:
        await _measure(conn, case, rows)
    figures: dict[str, list[float]] = {case.label: [] for case in cases}
    # Runs take turns across cases, so drift on a shared machine spreads over all of them.
    for run in range(1, runs + 1):
        for case in cases:
            _progress(f"run {run}/{runs}: {case.label}")
            figures[case.label].append(await _measure(conn, case, rows))
    return figures


async def resolve(
    env: dict[str, str], *, rows: int = 100_000, runs: int = 5, chunk_size: int = 5_000
) -> list[Figure]:
    """The suite's figures: resolve rate with and without constraints on ``rows`` rows."""
    model = parse_model(MODEL, source="bench.resolve")
    conn = await asyncpg.connect(env["SYNC_DATABASE_URL"], server_settings={"jit": "off"})
    try:
        _progress(f"seeding {PROJECTS:,} projects and {rows:,} items")
        await _seed(conn, model, rows)
        cases = await _cases(conn, model, rows, chunk_size)
        figures = await _run_all(conn, cases, rows, runs)
    finally:
        await _drop_tables(conn)
        await conn.close()
    raw, *rules = cases
    return [
        Figure(
            f"resolve, raw fetch of {rows:,} ids (no rules)",
            "objects/s",
            tuple(figures[raw.label]),
            kind="info",
        ),
        *(
            Figure(f"resolve: {case.label}", "objects/s", tuple(figures[case.label]))
            for case in rules
        ),
    ]


async def main(rows: int, runs: int, chunk_size: int) -> None:
    figures = await resolve(service_env(), rows=rows, runs=runs, chunk_size=chunk_size)
    print(as_table(figures))
    print(f"(median, min and max of {runs} runs after a warm-up)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--chunk-size", type=int, default=WorkerSettings.model_fields["chunk_size"].default
    )
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.runs, args.chunk_size))
