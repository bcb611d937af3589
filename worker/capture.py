"""Change capture for follow (SPEC §12): an outbox that triggers write in the same
transaction as the change, so a change is captured exactly when it commits and survives
any restart; the feed's leader (``worker.follow``) reads it every ``follow_interval``.

Captured: every insert, update and delete of a followed entity's table, of every table on
a followed entity's constraint paths, and of ``sync.user_role`` (a user's roles decide
which rules apply). A row names the object (entity and id), and for updates and deletes
the old values of the association columns a path follows backwards, so the objects that
reached it before the change are found too. The row carries no state: the push reads
the object's latest state under the device's lock, so the device ends at the last
committed state whatever order captured rows are read in.

The outbox is bounded: once more than ``sync.follow_state.backlog_limit`` rows wait, the
triggers stop writing and mark the feed overflowed; the leader then tells every holding
device to resync and starts over (``docs/follow.md``). A ``TRUNCATE`` of a captured
table names no rows, so it marks the feed overflowed too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from worker.devices import mark_overflowed
from worker.model import DomainModel
from worker.sql import quote_table
from worker.system import USER_ENTITY

__all__ = [
    "CAPTURE_SQL",
    "OVERFLOW_REASON",
    "WORKER_GRANTS",
    "CaptureSpec",
    "Captured",
    "backlog",
    "capture_problems",
    "capture_specs",
    "forget",
    "install_capture",
    "overflowed_since",
    "read_changes",
    "start_over",
]

# The resync reason devices get when the feed overflowed.
OVERFLOW_REASON = "follow-overflow"
DEFAULT_BACKLOG_LIMIT = 1_000_000
_USER_ROLE_TABLE = "sync.user_role"

CAPTURE_SQL = f"""
CREATE TABLE IF NOT EXISTS sync.change (
    seq bigserial PRIMARY KEY,
    entity text NOT NULL,
    object_id bigint NOT NULL,
    refs jsonb,
    captured_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS sync.follow_state (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    consumed bigint NOT NULL DEFAULT 0,
    backlog_limit bigint NOT NULL DEFAULT {DEFAULT_BACKLOG_LIMIT},
    overflowed_at timestamptz
);
INSERT INTO sync.follow_state DEFAULT VALUES ON CONFLICT DO NOTHING;
-- A statement trigger: one insert per statement, whatever the rows. Arguments: the entity,
-- the id column, then the association columns whose old values to keep. Runs as its
-- owner, so the application's roles need no rights on the sync schema.
CREATE OR REPLACE FUNCTION sync.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    state sync.follow_state;
    captured bigint;
BEGIN
    SELECT * INTO state FROM sync.follow_state;
    IF state.overflowed_at IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- Most tables: the rows' own ids, no old values to keep (no row turned into JSON).
    IF TG_NARGS = 2 AND TG_ARGV[1] = 'id' THEN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO sync.change (entity, object_id) SELECT TG_ARGV[0], n.id FROM new_rows n;
        ELSE
            INSERT INTO sync.change (entity, object_id) SELECT TG_ARGV[0], o.id FROM old_rows o;
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO sync.change (entity, object_id)
        SELECT TG_ARGV[0], (to_jsonb(n) ->> TG_ARGV[1])::bigint FROM new_rows n;
    ELSE
        INSERT INTO sync.change (entity, object_id, refs)
        SELECT TG_ARGV[0], (j ->> TG_ARGV[1])::bigint,
               (SELECT jsonb_object_agg(c, j -> c) FROM unnest(TG_ARGV[2:]) c)
        FROM old_rows o, to_jsonb(o) j;
    END IF;
    GET DIAGNOSTICS captured = ROW_COUNT;
    IF captured > 0 THEN
        IF currval(pg_get_serial_sequence('sync.change', 'seq')) - state.consumed
           > state.backlog_limit THEN
            UPDATE sync.follow_state SET overflowed_at = clock_timestamp()
            WHERE overflowed_at IS NULL;
        END IF;
    END IF;
    RETURN NULL;
END
$$;
-- TRUNCATE runs no row triggers and names no rows: every holding device must resync.
CREATE OR REPLACE FUNCTION sync.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE sync.follow_state SET overflowed_at = clock_timestamp() WHERE overflowed_at IS NULL;
    RETURN NULL;
END
$$;
"""

# What the feed's leader needs: read and delete captured rows, and start over.
WORKER_GRANTS = (
    "GRANT SELECT, DELETE ON sync.change TO {role}",
    "GRANT SELECT, UPDATE ON sync.follow_state TO {role}",
)

_KIND = "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)"
# (event, transition table, function): one statement trigger each.
_EVENTS = (
    ("insert", "REFERENCING NEW TABLE AS new_rows", "sync.capture"),
    ("update", "REFERENCING OLD TABLE AS old_rows", "sync.capture"),
    ("delete", "REFERENCING OLD TABLE AS old_rows", "sync.capture"),
    ("truncate", "", "sync.capture_truncate"),
)


@dataclass
class CaptureSpec:
    """What to capture of one table: whose rows they are, and the association columns
    whose old values paths need."""

    entity: str
    id_column: str = "id"
    refs: set[str] = field(default_factory=set)


def capture_specs(model: DomainModel) -> dict[str, CaptureSpec]:
    """The tables to capture, by table."""
    specs: dict[str, CaptureSpec] = {}
    if not model.followed:
        return specs
    # Roles decide which rules apply to every user.
    specs[_USER_ROLE_TABLE] = CaptureSpec(USER_ENTITY, "user_id")
    for name, entity in model.followed.items():
        assert entity.table is not None
        specs.setdefault(entity.table, CaptureSpec(name))
        for path in model.paths(name):
            for hop in path:
                target = model.entities.get(hop.target)
                if target is None or target.table is None:
                    continue
                spec = specs.setdefault(target.table, CaptureSpec(hop.target))
                if not hop.forward:
                    spec.refs.add(hop.column)
    return specs


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _arguments(spec: CaptureSpec) -> list[str]:
    return [spec.entity, spec.id_column, *sorted(spec.refs)]


async def _capturable(conn: asyncpg.Connection, table: str) -> bool:
    """A table can carry the triggers; ``sync.user_role`` may be a view (docs/roles.md)."""
    return table != _USER_ROLE_TABLE or await conn.fetchval(_KIND, table) == "r"


async def install_capture(
    conn: asyncpg.Connection, model: DomainModel, *, backlog_limit: int | None = None
) -> list[str]:
    """Install the outbox and a capture trigger on every table that needs one, and drop
    it from the model's tables that no longer do; ``backlog_limit`` replaces the outbox's
    bound when given. Returns the tables captured; a ``sync.user_role`` that is a view
    cannot be, and is left out."""
    await conn.execute(CAPTURE_SQL)
    if backlog_limit is not None:
        await conn.execute("UPDATE sync.follow_state SET backlog_limit = $1", backlog_limit)
    specs = capture_specs(model)
    captured = []
    for table in [*model.tables, _USER_ROLE_TABLE]:
        if not await _capturable(conn, table):
            continue
        spec = specs.get(table)
        for event, transition, function in _EVENTS:
            name = f"sync_capture_{event}"
            if spec is None:
                await conn.execute(f"DROP TRIGGER IF EXISTS {name} ON {quote_table(table)}")
                continue
            arguments = ", ".join(_literal(value) for value in _arguments(spec))
            await conn.execute(
                f"CREATE OR REPLACE TRIGGER {name} AFTER {event.upper()} ON {quote_table(table)} "
                f"{transition} FOR EACH STATEMENT EXECUTE FUNCTION {function}({arguments})"
            )
        if spec is not None:
            captured.append(table)
    return captured


_TRIGGERS = """
SELECT t.name, g.tgname, g.tgargs FROM unnest($1::text[]) AS t(name)
JOIN pg_trigger g ON g.tgrelid = to_regclass(t.name) AND g.tgname LIKE 'sync\\_capture\\_%'
"""


async def capture_problems(conn: asyncpg.Connection, model: DomainModel) -> list[str]:
    """The followed model's capture triggers that are missing or were installed for another
    model (its paths changed): changes there would never reach devices."""
    specs = {
        table: spec
        for table, spec in capture_specs(model).items()
        if await _capturable(conn, table)
    }
    found: dict[str, dict[str, bytes]] = {}
    for record in await conn.fetch(_TRIGGERS, [quote_table(table) for table in specs]):
        found.setdefault(record["name"], {})[record["tgname"]] = bytes(record["tgargs"])
    problems = []
    for table, spec in specs.items():
        expected = b"".join(argument.encode() + b"\0" for argument in _arguments(spec))
        triggers = found.get(quote_table(table), {})
        if any(triggers.get(f"sync_capture_{event}") != expected for event, _, _ in _EVENTS):
            problems.append(
                f"table {table}: its follow capture is missing or out of date "
                "(run `syncctl db init`)"
            )
    return problems


@dataclass(frozen=True, slots=True)
class Captured:
    """A chunk of captured rows, oldest first."""

    seqs: list[int]
    # (entity, object id, the old association values or None)
    changes: list[tuple[str, int, dict[str, int | None] | None]]
    oldest: datetime | None


async def read_changes(conn: asyncpg.Connection, limit: int) -> Captured:
    records = await conn.fetch(
        "SELECT seq, entity, object_id, refs::text, captured_at FROM sync.change "
        "ORDER BY seq LIMIT $1",
        limit,
    )
    return Captured(
        [record[0] for record in records],
        [(r[1], r[2], json.loads(r[3]) if r[3] is not None else None) for r in records],
        records[0][4] if records else None,
    )


async def forget(conn: asyncpg.Connection, seqs: Sequence[int]) -> None:
    """Drop rows whose pushes the broker confirmed."""
    async with conn.transaction():
        await conn.execute("DELETE FROM sync.change WHERE seq = ANY($1::bigint[])", seqs)
        await conn.execute(
            "UPDATE sync.follow_state SET consumed = greatest(consumed, $1)", max(seqs)
        )


async def backlog(conn: asyncpg.Connection) -> int:
    """Rows waiting to be routed (an estimate from the oldest and newest)."""
    value: int = await conn.fetchval("SELECT coalesce(max(seq) - min(seq) + 1, 0) FROM sync.change")
    return value


async def overflowed_since(conn: asyncpg.Connection) -> datetime | None:
    moment: datetime | None = await conn.fetchval("SELECT overflowed_at FROM sync.follow_state")
    return moment


async def start_over(conn: asyncpg.Connection) -> list[tuple[str, int]]:
    """After an overflow: mark every device holding followed objects for a resync, drop
    the backlog and capture again. Returns the devices marked, with their owners (none
    when the feed did not overflow)."""
    async with conn.transaction():
        since = await conn.fetchval("SELECT overflowed_at FROM sync.follow_state FOR UPDATE")
        if since is None:
            return []
        marked = await mark_overflowed(conn, since, OVERFLOW_REASON)
        last = await conn.fetchval("SELECT max(seq) FROM sync.change")
        await conn.execute("DELETE FROM sync.change")
        await conn.execute(
            "UPDATE sync.follow_state SET overflowed_at = NULL, "
            "consumed = greatest(consumed, coalesce($1, 0))",
            last,
        )
    return marked
