"""The device tables and every statement on them: the one module that owns them.

- ``objects``: the latest committed state per object, its row ``version`` and the
  ``dirty`` flag (committed on the device, not yet on the server);
- ``uncommitted``: the app's uncommitted changes, one row per member, shown on top of
  the committed state until the app commits or rolls back;
- ``tombstones``: objects removed because they were deleted or gone, so a late upsert
  cannot bring them back;
- ``applied_batches``: every change batch applied, with its job and the job's number of
  batches, recorded in the same transaction, so a redelivered batch changes nothing and
  the app can read how far a job has come;
- ``device_state``: flags about the device as a whole, such as "resync required".

The views' own catalog (``synced_entities``, ``entity_members``) is created here with the
rest, and written by ``device_agent.views`` only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import aiosqlite

__all__ = [
    "OBJECTS_TABLE",
    "RESYNC",
    "SCHEMA",
    "STORE_VERSION",
    "ObjectKey",
    "TombstoneRow",
    "UpsertRow",
    "applied_batch_ids",
    "clear_state",
    "commit_object",
    "committed",
    "delete_objects",
    "delete_uncommitted",
    "ids",
    "mark_resync",
    "progress",
    "prune",
    "query",
    "record_batch",
    "record_batches",
    "set_members",
    "state",
    "timestamp",
    "to_json",
    "uncommitted",
    "upsert_objects",
    "write_tombstones",
]

RESYNC = "resync_required"
# Incremented when a new version of the store needs existing databases brought up to date.
STORE_VERSION = 3

OBJECTS_TABLE = """
CREATE TABLE IF NOT EXISTS objects (
    entity TEXT NOT NULL,
    id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    data TEXT NOT NULL,
    dirty INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (entity, id)
) WITHOUT ROWID;
"""
SCHEMA = (
    OBJECTS_TABLE
    + """
CREATE TABLE IF NOT EXISTS uncommitted (
    entity TEXT NOT NULL,
    id INTEGER NOT NULL,
    member TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (entity, id, member)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tombstones (
    entity TEXT NOT NULL,
    id INTEGER NOT NULL,
    version INTEGER,
    reason TEXT NOT NULL,
    removed_at TEXT,
    PRIMARY KEY (entity, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS applied_batches (
    batch_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    total INTEGER
);
CREATE INDEX IF NOT EXISTS applied_batches_job ON applied_batches (job_id);
CREATE TABLE IF NOT EXISTS synced_entities (
    entity TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entity_members (
    entity TEXT NOT NULL,
    member TEXT NOT NULL,
    PRIMARY KEY (entity, member)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    since TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
"""
)

ObjectKey = tuple[str, int]
# (entity, id, version, data): data is JSON text, or its UTF-8 bytes as the batch reader
# encodes it; CAST stores both as TEXT, which SQLite's JSON functions read.
UpsertRow = tuple[str, int, int, str | bytes]
# (entity, id, version or None, reason)
TombstoneRow = tuple[str, int, int | None, str]

# An upsert lands unless the device holds a newer version or a tombstone that covers it.
# A tombstone without a version (the object was gone from the server) covers every
# version, because object ids are never reused.
_UPSERT = """
INSERT INTO objects (entity, id, version, data, dirty)
SELECT ?1, ?2, ?3, CAST(?4 AS TEXT), 0
WHERE NOT EXISTS (
    SELECT 1 FROM tombstones t
    WHERE t.entity = ?1 AND t.id = ?2 AND (t.version IS NULL OR t.version >= ?3)
)
ON CONFLICT (entity, id) DO UPDATE
    SET version = excluded.version, data = excluded.data, dirty = 0
    WHERE excluded.version >= objects.version
"""
_TOMBSTONE = """
INSERT INTO tombstones (entity, id, version, reason, removed_at)
VALUES (?, ?, ?, ?, CURRENT_TIMESTAMP)
ON CONFLICT (entity, id) DO UPDATE SET
    version = excluded.version, reason = excluded.reason, removed_at = excluded.removed_at
"""
_SET_MEMBER = """
INSERT INTO uncommitted (entity, id, member, value) VALUES (?, ?, ?, ?)
ON CONFLICT (entity, id, member) DO UPDATE SET value = excluded.value
"""
# The latest reason, the earliest ``since``: timestamps are UTC ISO 8601 with microseconds,
# so text order is time order.
_SET_STATE = """
INSERT INTO device_state (key, value, since, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    value = excluded.value, since = MIN(since, excluded.since), updated_at = excluded.updated_at
"""
_COMMIT_OBJECT = """
INSERT INTO objects (entity, id, version, data, dirty) VALUES (?, ?, ?, ?, 1)
ON CONFLICT (entity, id) DO UPDATE SET data = excluded.data, dirty = 1
"""


def to_json(value: object) -> str:
    """JSON that SQLite's JSON functions can read back: NaN and Infinity are refused
    (``ValueError``) rather than stored as text that breaks every read of the views."""
    return json.dumps(value, allow_nan=False)


def timestamp(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


# Writes, in the caller's transaction.


async def record_batch(db: aiosqlite.Connection, batch_id: str, job_id: str, total: int) -> bool:
    """Record a batch of a job of ``total`` batches as applied; ``False`` when it was
    applied before."""
    cursor = await db.execute(
        "INSERT OR IGNORE INTO applied_batches (batch_id, job_id, total) VALUES (?, ?, ?)",
        (batch_id, job_id, total),
    )
    return cursor.rowcount == 1


async def record_batches(db: aiosqlite.Connection, batches: Sequence[tuple[str, str, int]]) -> None:
    """Record batches (batch id, job id, the job's total) known not to be recorded yet."""
    if batches:
        await db.executemany(
            "INSERT INTO applied_batches (batch_id, job_id, total) VALUES (?, ?, ?)", batches
        )


async def upsert_objects(db: aiosqlite.Connection, rows: Sequence[UpsertRow]) -> None:
    if rows:
        await db.executemany(_UPSERT, rows)


async def delete_objects(db: aiosqlite.Connection, keys: Sequence[ObjectKey]) -> None:
    """The objects and their uncommitted changes."""
    if keys:
        await db.executemany("DELETE FROM objects WHERE entity = ? AND id = ?", keys)
        await delete_uncommitted(db, keys)


async def write_tombstones(db: aiosqlite.Connection, rows: Sequence[TombstoneRow]) -> None:
    if rows:
        await db.executemany(_TOMBSTONE, rows)


async def set_members(db: aiosqlite.Connection, rows: Sequence[tuple[str, int, str, str]]) -> None:
    """Uncommitted member values: (entity, id, member, value as JSON text)."""
    if rows:
        await db.executemany(_SET_MEMBER, rows)


async def delete_uncommitted(db: aiosqlite.Connection, keys: Sequence[ObjectKey]) -> None:
    await db.executemany("DELETE FROM uncommitted WHERE entity = ? AND id = ?", keys)


async def commit_object(
    db: aiosqlite.Connection, entity: str, object_id: int, version: int, data: str
) -> None:
    """The app's commit: the merged state becomes committed and dirty."""
    await db.execute(_COMMIT_OBJECT, (entity, object_id, version, data))


async def mark_resync(db: aiosqlite.Connection, reason: str, since: datetime | None) -> None:
    now = timestamp(datetime.now(UTC))
    at = now if since is None else timestamp(since)
    await db.execute(_SET_STATE, (RESYNC, reason, at, now))


async def clear_state(db: aiosqlite.Connection, key: str, before: datetime | None) -> None:
    """Drop a flag; with ``before``, only when it was last set before that moment."""
    sql = "DELETE FROM device_state WHERE key = ?"
    params: tuple[str, ...] = (key,)
    if before is not None:
        sql += " AND updated_at < ?"
        params += (timestamp(before),)
    await db.execute(sql, params)


async def prune(db: aiosqlite.Connection, cutoff: str) -> tuple[int, int]:
    """Forget applied batches and tombstones older than ``cutoff``; how many of each."""
    batches = await db.execute("DELETE FROM applied_batches WHERE applied_at < ?", (cutoff,))
    tombstones = await db.execute("DELETE FROM tombstones WHERE removed_at < ?", (cutoff,))
    return batches.rowcount, tombstones.rowcount


# Reads.


async def committed(
    db: aiosqlite.Connection, entity: str, object_id: int
) -> tuple[int, int, str] | None:
    """(version, dirty, data) of an object, or ``None``."""
    async with db.execute(
        "SELECT version, dirty, data FROM objects WHERE entity = ? AND id = ?",
        (entity, object_id),
    ) as cursor:
        row = await cursor.fetchone()
    return None if row is None else (int(row[0]), int(row[1]), str(row[2]))


async def uncommitted(db: aiosqlite.Connection, entity: str, object_id: int) -> dict[str, Any]:
    async with db.execute(
        "SELECT member, value FROM uncommitted WHERE entity = ? AND id = ?", (entity, object_id)
    ) as cursor:
        return {member: json.loads(value) for member, value in await cursor.fetchall()}


async def ids(db: aiosqlite.Connection, entity: str) -> list[int]:
    async with db.execute(
        "SELECT id FROM objects WHERE entity = ? ORDER BY id", (entity,)
    ) as cursor:
        return [int(row[0]) for row in await cursor.fetchall()]


async def query(
    db: aiosqlite.Connection, entity: str, filters: Iterable[tuple[str, Any]]
) -> list[tuple[int, str]]:
    """(id, data) of the objects of ``entity`` whose JSON paths equal the values."""
    sql = "SELECT id, data FROM objects WHERE entity = ?"
    params: list[Any] = [entity]
    for path, value in filters:
        # IS, not =: a None filter then matches JSON null (and a missing member).
        sql += " AND json_extract(data, ?) IS ?"
        params += [path, value]
    async with db.execute(sql + " ORDER BY id", params) as cursor:
        return [(int(object_id), str(data)) for object_id, data in await cursor.fetchall()]


async def applied_batch_ids(db: aiosqlite.Connection, batch_ids: list[str]) -> set[str]:
    placeholders = ", ".join("?" * len(batch_ids))
    async with db.execute(
        f"SELECT batch_id FROM applied_batches WHERE batch_id IN ({placeholders})", batch_ids
    ) as cursor:
        return {row[0] for row in await cursor.fetchall()}


async def progress(db: aiosqlite.Connection, job_id: str) -> tuple[int, int] | None:
    """(batches applied, the job's total) of a job, or ``None`` when no batch of it that
    carried its total is recorded. A job run twice (a worker killed after its batches
    went out) may have made some batches anew: the count stops at the total."""
    async with db.execute(
        "SELECT COUNT(*), MAX(total) FROM applied_batches WHERE job_id = ?", (job_id,)
    ) as cursor:
        row = await cursor.fetchone()
    if row is None or row[1] is None:
        return None
    return min(int(row[0]), int(row[1])), int(row[1])


async def state(db: aiosqlite.Connection, key: str) -> tuple[str, str] | None:
    """(value, since) of a device flag, or ``None``."""
    async with db.execute("SELECT value, since FROM device_state WHERE key = ?", (key,)) as cursor:
        row = await cursor.fetchone()
    return None if row is None else (str(row[0]), str(row[1]))
