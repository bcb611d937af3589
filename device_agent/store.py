"""``OfflineStore``: the device's offline database on SQLite (WAL).

Tables:
- ``objects``: the latest committed state per object, its row ``version`` and the
  ``dirty`` flag (committed on the device, not yet on the server);
- ``uncommitted``: the app's uncommitted changes, one row per member, shown on top of
  the committed state until the app commits or rolls back;
- ``tombstones``: objects removed because they were deleted or gone, so a late upsert
  cannot bring them back;
- ``applied_batches``: every change batch applied, recorded in the same transaction, so a
  redelivered batch changes nothing;
- ``synced_entities`` and ``entity_members``: every entity and member seen so far, so the
  app-facing views (one per entity, named like the entity) are rebuilt only when
  something new appears;
- ``device_state``: flags about the device as a whole, such as "resync required".

App-facing views: ``SELECT * FROM "WorkOrder" WHERE status = 'Open'`` reads the
committed state, with the columns ``id``, ``version``, ``dirty`` and one per member.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from broker.closing import AsyncClosable
from broker.models import (
    ChangeBatch,
    OverlayChange,
    RemoveChange,
    ResyncChange,
    UpsertChange,
)
from device_agent.views import (
    ENTITY_NAME,
    MEMBER_NAME,
    ViewCatalog,
    check_name,
    json_path,
    members_by_entity,
)

__all__ = ["OfflineStore"]

log = logging.getLogger(__name__)

_RESYNC = "resync_required"
# Incremented when a new version of the store needs existing databases brought up to date.
_STORE_VERSION = 2

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
    removed_at TEXT,
    PRIMARY KEY (entity, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS applied_batches (
    batch_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
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
INSERT INTO tombstones (entity, id, version, reason, removed_at)
VALUES (:entity, :id, :version, :reason, CURRENT_TIMESTAMP)
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
        self._views = ViewCatalog(db)

    @classmethod
    async def open(cls, path: str | Path) -> OfflineStore:
        db = await aiosqlite.connect(path, isolation_level=None)
        store = cls(db)
        try:
            # WAL lets the app read while the agent writes; FULL makes a commit durable
            # before the agent acks the batch it came in.
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA busy_timeout=5000")
            await db.executescript(_SCHEMA)
            await store._upgrade()
            await store._views.load()
        except BaseException:
            # Closed here, or aiosqlite's thread outlives the program that gave up.
            await db.close()
            raise
        return store

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

    async def query(self, entity: str, **filters: Any) -> list[dict[str, Any]]:
        """The committed objects of ``entity`` whose members equal ``filters``, by id.

        Each row is ``{"id": ..., **members}``, as ``get_committed`` plus the id. A filter
        value of ``None`` also matches objects that lack the member. An unknown entity, or
        a filter on a member never seen for it, gives ``[]``; a name that cannot be an
        entity or member raises ``ValueError``. Reads ``objects`` with ``json_extract``
        rather than the view: the JSON path is a bind parameter, so no name is ever put
        into the SQL text, and members a view leaves out (case clashes) still work.

        Example::

            await store.query("WorkOrder", status="Open")  # [{"id": 1, "status": "Open"}]
        """
        check_name(entity, ENTITY_NAME, "entity")
        for member, value in filters.items():
            check_name(member, MEMBER_NAME, "member")
            if not isinstance(value, str | int | float | None):
                raise TypeError(f"filter {member}: expected str, int, float, bool or None")
        if filters and not await self._views.has_members(entity, filters):
            return []
        sql = "SELECT id, data FROM objects WHERE entity = ?"
        params: list[Any] = [entity]
        for member, value in filters.items():
            # IS, not =: a None filter then matches JSON null (and a missing member).
            sql += " AND json_extract(data, ?) IS ?"
            params += [json_path(member), value]
        async with self._db.execute(sql + " ORDER BY id", params) as cursor:
            rows = await cursor.fetchall()
        return [_row(int(object_id), data) for object_id, data in rows]

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
            await self._views.discover({entity: merged.keys()})
            await self._db.execute(
                "INSERT INTO objects (entity, id, version, data, dirty) VALUES (?, ?, ?, ?, 1) "
                "ON CONFLICT (entity, id) DO UPDATE SET data = excluded.data, dirty = 1",
                (entity, object_id, version, _to_json(merged)),
            )
            await self._delete_uncommitted([(entity, object_id)])

    async def rollback(self, entity: str, object_id: int) -> None:
        """Drop the app's uncommitted changes: the object returns to its committed state."""
        async with self._transaction():
            await self._delete_uncommitted([(entity, object_id)])

    async def resync_required(self) -> str | None:
        """Why the device must synchronize everything again, or ``None``.

        Set when the device lost batches (its queue overflowed or they expired); the app
        re-synchronizes and then calls ``clear_resync_required()``.
        """
        state = await self._state(_RESYNC)
        return None if state is None else state[0]

    async def resync_required_since(self) -> datetime | None:
        """When the first loss not yet resynchronized happened (UTC), or ``None``."""
        state = await self._state(_RESYNC)
        return None if state is None else datetime.fromisoformat(state[1])

    async def clear_resync_required(self, *, started: datetime | None = None) -> None:
        """The app re-synchronized everything: the flag is cleared.

        Give ``started``, when the app began that resync, and a loss announced while it
        ran keeps the flag set, so the app resyncs once more rather than miss it.

        Example::

            started = datetime.now(UTC)
            ...  # synchronize everything
            await store.clear_resync_required(started=started)
        """
        sql = "DELETE FROM device_state WHERE key = ?"
        params: tuple[str, ...] = (_RESYNC,)
        if started is not None:
            sql += " AND updated_at < ?"
            params += (_timestamp(started),)
        async with self._transaction():
            await self._db.execute(sql, params)

    # The agent's side.

    async def mark_resync_required(self, reason: str, *, since: datetime | None = None) -> None:
        """Record that the device lost batches and must resync everything.

        Keeps the latest ``reason`` and the earliest ``since`` (default: now) until
        ``clear_resync_required()``. A ``ResyncChange`` in a batch does the same.

        Example::

            await store.mark_resync_required("maxlen")
        """
        async with self._transaction():
            await self._mark_resync(reason, since)

    async def prune(self, older_than: timedelta) -> tuple[int, int]:
        """Forget applied batch ids and tombstones older than ``older_than``; returns how
        many of each. Both guard against batches arriving late or twice, which can only
        happen while a batch can still wait in the device queue: past the queue's TTL it
        is dead-lettered instead. So any horizon longer than that TTL is safe.

        Example::

            await store.prune(timedelta(days=35))   # the queue TTL is 30 days
        """
        cutoff = (datetime.now(UTC) - older_than).strftime("%Y-%m-%d %H:%M:%S")
        async with self._transaction():
            batches = await self._db.execute(
                "DELETE FROM applied_batches WHERE applied_at < ?", (cutoff,)
            )
            tombstones = await self._db.execute(
                "DELETE FROM tombstones WHERE removed_at < ?", (cutoff,)
            )
        return batches.rowcount, tombstones.rowcount

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
        resyncs = [c for c in batch.changes if isinstance(c, ResyncChange)]
        await self._views.discover(members_by_entity(upserts))
        if upserts:
            await self._db.executemany(
                _UPSERT,
                [
                    {
                        "entity": c.entity,
                        "id": c.id,
                        "version": c.version,
                        "data": _to_json(c.data),
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
        for resync in resyncs:
            await self._mark_resync(resync.reason, resync.since)

    async def _set_members(self, entity: str, object_id: int, changes: dict[str, Any]) -> None:
        await self._db.executemany(
            _SET_MEMBER,
            [(entity, object_id, member, _to_json(value)) for member, value in changes.items()],
        )

    async def _delete_uncommitted(self, keys: list[tuple[str, int]]) -> None:
        await self._db.executemany("DELETE FROM uncommitted WHERE entity = ? AND id = ?", keys)

    async def _uncommitted(self, entity: str, object_id: int) -> dict[str, Any]:
        async with self._db.execute(
            "SELECT member, value FROM uncommitted WHERE entity = ? AND id = ?", (entity, object_id)
        ) as cursor:
            return {member: json.loads(value) for member, value in await cursor.fetchall()}

    async def _upgrade(self) -> None:
        """Bring a database written by an older store up to date, one version at a time."""
        if await self._user_version() >= _STORE_VERSION:
            return  # the usual case: no write transaction at open
        async with self._transaction():
            version = await self._user_version()  # another process may have upgraded it
            if version < 1:
                await self._views.rebuild_from_objects()
            if version < 2:
                await self._date_tombstones()
            await self._db.execute(f"PRAGMA user_version = {_STORE_VERSION}")

    async def _date_tombstones(self) -> None:
        """Version 2: tombstones carry the time of the removal, so old ones can be pruned."""
        async with self._db.execute("PRAGMA table_info(tombstones)") as cursor:
            columns = {row[1] for row in await cursor.fetchall()}
        if "removed_at" not in columns:
            await self._db.execute("ALTER TABLE tombstones ADD COLUMN removed_at TEXT")
        # Undated ones count from now: they are kept one full horizon from the upgrade.
        await self._db.execute(
            "UPDATE tombstones SET removed_at = CURRENT_TIMESTAMP WHERE removed_at IS NULL"
        )

    async def _user_version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        return 0 if row is None else int(row[0])

    # Device state.

    async def _mark_resync(self, reason: str, since: datetime | None) -> None:
        now = _timestamp(datetime.now(UTC))
        at = now if since is None else _timestamp(since)
        await self._db.execute(_SET_STATE, (_RESYNC, reason, at, now))

    async def _state(self, key: str) -> tuple[str, str] | None:
        async with self._db.execute(
            "SELECT value, since FROM device_state WHERE key = ?", (key,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        async with self._writing:
            self._views.begin()
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._views.rolled_back()
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")
            self._views.committed()


def _to_json(value: object) -> str:
    """JSON that SQLite's JSON functions can read back: NaN and Infinity are refused
    (``ValueError``) rather than stored as text that breaks every read of the views."""
    return json.dumps(value, allow_nan=False)


def _row(object_id: int, data: str) -> dict[str, Any]:
    members = json.loads(data)
    return {"id": object_id, **{k: v for k, v in members.items() if k != "id"}}


def _timestamp(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")
