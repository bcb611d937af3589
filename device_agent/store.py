"""``OfflineStore``: the device's offline database on SQLite (WAL).

Tables:
- ``objects``: the latest committed state per object, its row ``version`` and the
  ``dirty`` flag (committed on the device, not yet on the server);
- ``uncommitted``: the app's uncommitted changes, one row per member, shown on top of
  the committed state until the app commits or rolls back;
- ``tombstones``: objects removed because they were deleted or gone, so a late upsert
  cannot bring them back;
- ``applied_batches``: every change batch applied, recorded in the same transaction, so a
  redelivered batch changes nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from broker.closing import AsyncClosable
from broker.models import ChangeBatch, OverlayChange, RemoveChange, UpsertChange

__all__ = ["OfflineStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    entity TEXT NOT NULL,
    id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    data TEXT NOT NULL,
    dirty INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (entity, id)
) WITHOUT ROWID;
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
    PRIMARY KEY (entity, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS applied_batches (
    batch_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
"""

# An upsert lands unless the device holds a newer version or a tombstone that covers it.
# A tombstone without a version (the object was gone from the server) covers every
# version, because object ids are never reused.
_UPSERT = """
INSERT INTO objects (entity, id, version, data, dirty)
SELECT :entity, :id, :version, :data, 0
WHERE NOT EXISTS (
    SELECT 1 FROM tombstones t
    WHERE t.entity = :entity AND t.id = :id AND (t.version IS NULL OR t.version >= :version)
)
ON CONFLICT (entity, id) DO UPDATE
    SET version = excluded.version, data = excluded.data, dirty = 0
    WHERE excluded.version >= objects.version
"""
_TOMBSTONE = """
INSERT INTO tombstones (entity, id, version, reason) VALUES (:entity, :id, :version, :reason)
ON CONFLICT (entity, id) DO UPDATE SET version = excluded.version, reason = excluded.reason
"""
_SET_MEMBER = """
INSERT INTO uncommitted (entity, id, member, value) VALUES (?, ?, ?, ?)
ON CONFLICT (entity, id, member) DO UPDATE SET value = excluded.value
"""


class OfflineStore(AsyncClosable):
    """The device's offline database.

    Example::

        store = await OfflineStore.open("dev-1.sqlite")
        await store.get("WorkOrder", 1)      # committed state + the app's uncommitted changes
        await store.change("WorkOrder", 1, status="Draft")
        await store.rollback("WorkOrder", 1)
    """

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        # One connection, so one transaction at a time across the coroutines using it.
        self._writing = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> OfflineStore:
        db = await aiosqlite.connect(path, isolation_level=None)
        # WAL lets the app read while the agent writes; FULL makes a commit durable
        # before the agent acks the batch it came in.
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=5000")
        await db.executescript(_SCHEMA)
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    # The app's view.

    async def get(self, entity: str, object_id: int) -> dict[str, Any] | None:
        """What the app sees: the committed state with its uncommitted changes on top."""
        committed = await self.get_committed(entity, object_id)
        changes = await self._uncommitted(entity, object_id)
        if committed is None and not changes:
            return None
        return {**(committed or {}), **changes}

    async def get_committed(self, entity: str, object_id: int) -> dict[str, Any] | None:
        async with self._db.execute(
            "SELECT data FROM objects WHERE entity = ? AND id = ?", (entity, object_id)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else dict(json.loads(row[0]))

    async def version(self, entity: str, object_id: int) -> int | None:
        async with self._db.execute(
            "SELECT version FROM objects WHERE entity = ? AND id = ?", (entity, object_id)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else int(row[0])

    async def is_dirty(self, entity: str, object_id: int) -> bool:
        """True when the app committed changes on the device that the server has not seen."""
        async with self._db.execute(
            "SELECT dirty FROM objects WHERE entity = ? AND id = ?", (entity, object_id)
        ) as cursor:
            row = await cursor.fetchone()
        return bool(row and row[0])

    async def ids(self, entity: str) -> list[int]:
        async with self._db.execute(
            "SELECT id FROM objects WHERE entity = ? ORDER BY id", (entity,)
        ) as cursor:
            return [int(row[0]) for row in await cursor.fetchall()]

    async def change(self, entity: str, object_id: int, **changes: Any) -> None:
        """Record uncommitted changes the app made to an object."""
        async with self._transaction():
            await self._set_members(entity, object_id, changes)

    async def commit(self, entity: str, object_id: int) -> None:
        """Commit the app's changes on the device: they become committed and dirty."""
        async with self._transaction():
            committed = await self.get_committed(entity, object_id) or {}
            version = await self.version(entity, object_id) or 0
            merged = {**committed, **await self._uncommitted(entity, object_id)}
            await self._db.execute(
                "INSERT INTO objects (entity, id, version, data, dirty) VALUES (?, ?, ?, ?, 1) "
                "ON CONFLICT (entity, id) DO UPDATE SET data = excluded.data, dirty = 1",
                (entity, object_id, version, json.dumps(merged)),
            )
            await self._delete_uncommitted([(entity, object_id)])

    async def rollback(self, entity: str, object_id: int) -> None:
        """Drop the app's uncommitted changes: the object returns to its committed state."""
        async with self._transaction():
            await self._delete_uncommitted([(entity, object_id)])

    # The agent's side.

    async def applied_batch_ids(self, batch_ids: Iterable[str]) -> set[str]:
        """Which of ``batch_ids`` this device has applied."""
        wanted = list(batch_ids)
        placeholders = ", ".join("?" * len(wanted))
        async with self._db.execute(
            f"SELECT batch_id FROM applied_batches WHERE batch_id IN ({placeholders})", wanted
        ) as cursor:
            return {row[0] for row in await cursor.fetchall()}

    async def wait_for_batches(
        self, batch_ids: Iterable[str], *, timeout: float, interval: float = 0.02
    ) -> None:
        """Wait until every batch in ``batch_ids`` is applied (``TimeoutError`` after
        ``timeout`` s); e.g. the ``batch_ids`` of a ``SyncResult``.
        """
        wanted = set(batch_ids)
        async with asyncio.timeout(timeout):
            # The agent may be another process, so there is nothing to be notified by:
            # the database itself is the only shared state.
            while await self.applied_batch_ids(wanted) != wanted:  # noqa: ASYNC110
                await asyncio.sleep(interval)

    async def apply_batch(self, batch: ChangeBatch) -> bool:
        """Apply a change batch in one transaction; ``False`` when it was applied before."""
        async with self._transaction():
            cursor = await self._db.execute(
                "INSERT OR IGNORE INTO applied_batches (batch_id, job_id) VALUES (?, ?)",
                (batch.batch_id, batch.job_id),
            )
            if cursor.rowcount == 0:
                return False
            await self._apply_changes(batch)
        return True

    async def _apply_changes(self, batch: ChangeBatch) -> None:
        upserts = [c for c in batch.changes if isinstance(c, UpsertChange)]
        removes = [c for c in batch.changes if isinstance(c, RemoveChange)]
        overlays = [c for c in batch.changes if isinstance(c, OverlayChange)]
        if upserts:
            await self._db.executemany(
                _UPSERT,
                [
                    {
                        "entity": c.entity,
                        "id": c.id,
                        "version": c.version,
                        "data": json.dumps(c.data),
                    }
                    for c in upserts
                ],
            )
        if removes:
            keys = [(c.entity, c.id) for c in removes]
            await self._db.executemany("DELETE FROM objects WHERE entity = ? AND id = ?", keys)
            await self._delete_uncommitted(keys)
            await self._db.executemany(
                _TOMBSTONE,
                [
                    {"entity": c.entity, "id": c.id, "version": c.version, "reason": c.reason}
                    for c in removes
                    if c.reason != "no-access"
                ],
            )
        for overlay in overlays:
            await self._set_members(overlay.entity, overlay.id, overlay.changes)

    async def _set_members(self, entity: str, object_id: int, changes: dict[str, Any]) -> None:
        await self._db.executemany(
            _SET_MEMBER,
            [(entity, object_id, member, json.dumps(value)) for member, value in changes.items()],
        )

    async def _delete_uncommitted(self, keys: list[tuple[str, int]]) -> None:
        await self._db.executemany("DELETE FROM uncommitted WHERE entity = ? AND id = ?", keys)

    async def _uncommitted(self, entity: str, object_id: int) -> dict[str, Any]:
        async with self._db.execute(
            "SELECT member, value FROM uncommitted WHERE entity = ? AND id = ?", (entity, object_id)
        ) as cursor:
            return {member: json.loads(value) for member, value in await cursor.fetchall()}

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        async with self._writing:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")
