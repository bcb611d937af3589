"""Reads the named objects from PostgreSQL: one query per entity per chunk of ids.

The same query evaluates the user's access rules and writes each readable object's
upsert change (``worker.access``), so the records pass on without being turned into
objects.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import asyncpg

from broker.models import ObjectKey
from worker.access import ID, AccessPolicy
from worker.eligibility import Found

__all__ = ["fetch_rows"]


async def fetch_rows(
    conn: asyncpg.Connection,
    policy: AccessPolicy,
    targets: Iterable[ObjectKey],
    *,
    user_id: int,
    roles: frozenset[str],
    chunk_size: int,
) -> dict[str, Found]:
    """The latest committed records of ``targets``, by entity and id; absent ids are gone."""
    ids_by_entity: dict[str, list[int]] = defaultdict(list)
    for entity, object_id in targets:
        ids_by_entity[entity].append(object_id)
    found: dict[str, Found] = {}
    for entity_name, ids in ids_by_entity.items():
        query = policy.query(entity_name, roles)
        records: dict[int, asyncpg.Record] = {}
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start : start + chunk_size]
            # fetch() keeps the statement prepared per connection: one round trip per chunk.
            fetched = await conn.fetch(query.sql, *query.arguments(chunk, user_id=user_id))
            records.update((record[ID], record) for record in fetched)
        found[entity_name] = Found(records, query.readable)
    return found
