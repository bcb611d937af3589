"""Does the database hold what the model names? Checked when a worker starts, by
``sync-worker --check`` and by ``/readyz``, so a model that does not match its database
stops the worker at once, naming what is missing, instead of failing every job."""

from __future__ import annotations

import asyncpg

from broker.errors import ProgramError
from worker.capture import capture_problems
from worker.devices import RELEASE_DEVICE, TAKE_DEVICE
from worker.model import AttributeType, DomainModel, Entity

__all__ = ["SchemaMismatch", "check_schema", "schema_problems"]

_INTEGERS = frozenset({"smallint", "integer", "bigint"})
# information_schema.columns.data_type values a model type can be read from.
_COMPATIBLE: dict[AttributeType, frozenset[str]] = {
    "string": frozenset({"text", "character varying", "character"}),
    "integer": _INTEGERS,
    "long": _INTEGERS,
    "decimal": _INTEGERS | {"numeric", "real", "double precision"},
    "boolean": frozenset({"boolean"}),
    "datetime": frozenset({"timestamp with time zone", "timestamp without time zone", "date"}),
}
# The columns every table has by convention (SPEC §2), and association columns.
_CONVENTIONS = {"id": _INTEGERS, "version": frozenset({"bigint"}), "autocommitted": {"boolean"}}
_SYNC_TABLES = {
    "sync.device": ("device_id", "user_id", "offline"),
    "sync.user_role": ("user_id", "role"),
    "sync.job_result": ("device_id", "job_id", "result", "answered_at"),
    "sync.holding": ("device_id", "entity", "object_id", "version", "members"),
}
# The follow feed's outbox (worker.capture), when the model follows entities.
_FOLLOW_TABLES = {
    "sync.change": ("seq", "entity", "object_id", "refs", "captured_at"),
    "sync.follow_state": ("consumed", "backlog_limit", "overflowed_at"),
    "sync.entity_rules": ("entity", "fingerprint", "resync_after"),
}

# The routines workers take and release devices with (worker.schema), as this role may run them.
_ROUTINES = (TAKE_DEVICE, RELEASE_DEVICE)
_MISSING_ROUTINES = """
SELECT r FROM unnest($1::text[]) r
WHERE to_regprocedure(r) IS NULL OR NOT has_function_privilege(to_regprocedure(r), 'EXECUTE')
"""

_COLUMNS = """
SELECT table_schema || '.' || table_name AS qualified, column_name, data_type
FROM information_schema.columns
WHERE table_schema || '.' || table_name = ANY($1::text[])
"""


class SchemaMismatch(ProgramError):
    """The database lacks tables or columns the model names (the message lists them)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("the model does not match the database:\n  " + "\n  ".join(problems))
        self.problems = problems


def _qualified(table: str) -> str:
    return table if "." in table else f"public.{table}"


def _expected(entity: Entity) -> dict[str, tuple[str, frozenset[str]]]:
    """column -> (what the model calls it, the data types it may have)."""
    expected = {name: (name, frozenset(types)) for name, types in _CONVENTIONS.items()}
    for name, kind in entity.attributes.items():
        expected[name] = (f"{name} ({kind})", _COMPATIBLE[kind])
    for name, association in entity.associations.items():
        expected[association.column] = (f"{name} (association)", _INTEGERS)
    return expected


def _entity_problems(name: str, entity: Entity, columns: dict[str, str] | None) -> list[str]:
    assert entity.table is not None
    if columns is None:
        return [f"table {entity.table} of {name}: missing, or not readable by this role"]
    problems = []
    for column, (member, types) in _expected(entity).items():
        found = columns.get(column)
        if found is None:
            problems.append(f"column {entity.table}.{column} for {name}.{member}: missing")
        elif found not in types:
            problems.append(
                f"column {entity.table}.{column} for {name}.{member}: type {found} "
                f"cannot hold it (expected {' or '.join(sorted(types))})"
            )
    return problems


async def schema_problems(conn: asyncpg.Connection, model: DomainModel) -> list[str]:
    """Everything the model names that the database lacks, one line each (empty: all is
    there). Only what this role can read counts, as that is what a worker sees."""
    tables = [_qualified(table) for table in model.tables]
    sync_tables = {**_SYNC_TABLES, **(_FOLLOW_TABLES if model.followed else {})}
    records = await conn.fetch(_COLUMNS, [*tables, *sync_tables])
    found: dict[str, dict[str, str]] = {}
    for record in records:
        found.setdefault(record["qualified"], {})[record["column_name"]] = record["data_type"]
    problems = [
        f"table {table}: missing or not readable (run `syncctl db init`)"
        for table, columns in sync_tables.items()
        if not set(columns) <= set(found.get(table, {}))
    ]
    problems += [
        f"routine {record['r']}: missing or not executable (run `syncctl db init`)"
        for record in await conn.fetch(_MISSING_ROUTINES, list(_ROUTINES))
    ]
    for name, entity in model.entities.items():
        if entity.persistable and entity.table is not None:
            problems += _entity_problems(name, entity, found.get(_qualified(entity.table)))
    if model.followed and not problems:
        problems += await capture_problems(conn, model)
    return problems


async def check_schema(conn: asyncpg.Connection, model: DomainModel) -> None:
    """Raise ``SchemaMismatch`` unless every table and column the model names exists with a
    compatible type."""
    problems = await schema_problems(conn, model)
    if problems:
        raise SchemaMismatch(problems)
