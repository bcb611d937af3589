"""Reads the named objects from PostgreSQL: one query per entity per chunk of ids."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import asyncpg

from broker.models import ObjectRef
from worker.eligibility import Row
from worker.model import DomainModel
from worker.sql import select_objects_sql

__all__ = ["fetch_roles", "fetch_rows"]

_FIXED_COLUMNS = ("id", "version", "autocommitted")


async def fetch_roles(conn: asyncpg.Connection, user_id: int) -> frozenset[str]:
    """The user's roles, always from PostgreSQL, never from the job."""
    records = await conn.fetch("SELECT role FROM sync.user_role WHERE user_id = $1", user_id)
    return frozenset(record["role"] for record in records)


async def fetch_rows(
    conn: asyncpg.Connection,
    model: DomainModel,
    refs: Iterable[ObjectRef],
    *,
    chunk_size: int,
) -> dict[str, dict[int, Row]]:
    """The latest committed rows of ``refs``, by entity and id; absent ids are gone."""
    ids_by_entity: dict[str, list[int]] = defaultdict(list)
    for ref in refs:
        ids_by_entity[ref.entity].append(ref.id)
    rows: dict[str, dict[int, Row]] = {}
    for entity_name, ids in ids_by_entity.items():
        entity = model.entities[entity_name]
        statement = await conn.prepare(select_objects_sql(entity))
        found: dict[int, Row] = {}
        for start in range(0, len(ids), chunk_size):
            for record in await statement.fetch(ids[start : start + chunk_size]):
                values = {key: value for key, value in record.items() if key not in _FIXED_COLUMNS}
                found[record["id"]] = Row(
                    record["id"], record["version"], record["autocommitted"], values
                )
        rows[entity_name] = found
    return rows
