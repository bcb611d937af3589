"""Reads the named objects from PostgreSQL: one query per entity per chunk of ids.

The same query evaluates the user's access rules (``worker.access``), so each row comes
back with the members the user may read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import asyncpg

from broker.models import ObjectKey, Session
from worker.access import AccessPolicy
from worker.eligibility import Row

__all__ = ["fetch_rows"]


async def fetch_rows(
    conn: asyncpg.Connection,
    policy: AccessPolicy,
    targets: Iterable[ObjectKey],
    *,
    session: Session,
    roles: frozenset[str],
    chunk_size: int,
) -> dict[str, dict[int, Row]]:
    """The latest committed rows of ``targets``, by entity and id; absent ids are gone."""
    ids_by_entity: dict[str, list[int]] = defaultdict(list)
    for entity, object_id in targets:
        ids_by_entity[entity].append(object_id)
    rows: dict[str, dict[int, Row]] = {}
    for entity_name, ids in ids_by_entity.items():
        query = policy.query(entity_name, roles)
        found: dict[int, Row] = {}
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start : start + chunk_size]
            # fetch() keeps the statement prepared per connection: one round trip per chunk.
            records = await conn.fetch(query.sql, *query.arguments(chunk, user_id=session.user_id))
            for record in records:
                row = query.row(record)
                found[row.id] = row
        rows[entity_name] = found
    return rows
