"""``OfflineStore``: the device's offline database on SQLite (WAL), as the app uses it.

The tables and their statements are in ``device_agent.tables``, batch apply in
``device_agent.apply``, upgrades of older files in ``device_agent.migrations``; every write
runs in one ``device_agent.transaction.Transaction``.

App-facing views: ``SELECT * FROM "WorkOrder" WHERE status = 'Open'`` reads the
committed state, with the columns ``id``, ``version``, ``dirty`` and one per member.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from broker.closing import AsyncClosable
from broker.models import ChangeBatch
from broker.wire import as_read_batch
from device_agent import tables
from device_agent.apply import BatchRows, apply_many, apply_rows, batch_rows
from device_agent.migrations import create_and_upgrade
from device_agent.transaction import Writer
from device_agent.views import (
    ENTITY_NAME,
    MEMBER_NAME,
    ViewCatalog,
    check_name,
    json_path,
)

__all__ = ["JobProgress", "OfflineStore", "Outcome"]

log = logging.getLogger(__name__)

# What became of one batch of a group: applied (True), applied before (False), or the
# error that made it unappliable (rolled back alone).
Outcome = bool | Exception


@dataclass(frozen=True, slots=True)
class JobProgress:
    """How far the device has applied a job: ``applied`` of its ``total`` batches."""

    applied: int
    total: int


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
        self._writer = Writer(db)
        self._views = ViewCatalog(db)

    @classmethod
    async def open(cls, path: str | Path) -> OfflineStore:
        db = await aiosqlite.connect(path, isolation_level=None)
        store = cls(db)
        try:
            # WAL lets the app read while the agent writes; FULL makes a commit durable
            # before the agent acks the batches it applied.
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA busy_timeout=5000")
            await create_and_upgrade(db, store._writer, store._views)
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
        changes = await tables.uncommitted(self._db, entity, object_id)
        if committed is None and not changes:
            return None
        return {**(committed or {}), **changes}

    async def get_committed(self, entity: str, object_id: int) -> dict[str, Any] | None:
        row = await tables.committed(self._db, entity, object_id)
        return None if row is None else dict(json.loads(row[2]))

    async def version(self, entity: str, object_id: int) -> int | None:
        row = await tables.committed(self._db, entity, object_id)
        return None if row is None else row[0]

    async def is_dirty(self, entity: str, object_id: int) -> bool:
        """True when the app committed changes on the device that the server has not seen."""
        row = await tables.committed(self._db, entity, object_id)
        return bool(row and row[1])

    async def ids(self, entity: str) -> list[int]:
        return await tables.ids(self._db, entity)

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
        paths = [(json_path(member), value) for member, value in filters.items()]
        return [
            _row(object_id, data) for object_id, data in await tables.query(self._db, entity, paths)
        ]

    async def change(self, entity: str, object_id: int, **changes: Any) -> None:
        """Record uncommitted changes the app made to an object."""
        rows = [
            (entity, object_id, member, tables.to_json(value)) for member, value in changes.items()
        ]
        async with self._writer.transaction() as tx:
            await tables.set_members(tx.db, rows)

    async def commit(self, entity: str, object_id: int) -> None:
        """Commit the app's changes on the device: they become committed and dirty."""
        async with self._writer.transaction() as tx:
            committed = await self.get_committed(entity, object_id) or {}
            version = await self.version(entity, object_id) or 0
            merged = {**committed, **await tables.uncommitted(tx.db, entity, object_id)}
            await self._views.discover(tx, {entity: merged.keys()})
            await tables.commit_object(tx.db, entity, object_id, version, tables.to_json(merged))
            await tables.delete_uncommitted(tx.db, [(entity, object_id)])

    async def rollback(self, entity: str, object_id: int) -> None:
        """Drop the app's uncommitted changes: the object returns to its committed state."""
        async with self._writer.transaction() as tx:
            await tables.delete_uncommitted(tx.db, [(entity, object_id)])

    async def resync_required(self) -> str | None:
        """Why the device must synchronize everything again, or ``None``.

        Set when the device lost batches (its queue overflowed or they expired); the app
        re-synchronizes and then calls ``clear_resync_required()``.
        """
        state = await tables.state(self._db, tables.RESYNC)
        return None if state is None else state[0]

    async def resync_required_since(self) -> datetime | None:
        """When the first loss not yet resynchronized happened (UTC), or ``None``."""
        state = await tables.state(self._db, tables.RESYNC)
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
        async with self._writer.transaction() as tx:
            await tables.clear_state(tx.db, tables.RESYNC, started)

    # The agent's side.

    async def mark_resync_required(self, reason: str, *, since: datetime | None = None) -> None:
        """Record that the device lost batches and must resync everything.

        Keeps the latest ``reason`` and the earliest ``since`` (default: now) until
        ``clear_resync_required()``. A ``ResyncChange`` in a batch does the same.

        Example::

            await store.mark_resync_required("maxlen")
        """
        async with self._writer.transaction() as tx:
            await tables.mark_resync(tx.db, reason, since)

    async def prune(self, older_than: timedelta) -> tuple[int, int]:
        """Forget applied batch ids and tombstones older than ``older_than``; returns how
        many of each. Both guard against batches arriving late or twice, which can only
        happen while a batch can still wait in the device queue: past the queue's TTL it
        is dead-lettered instead. So any horizon longer than that TTL is safe.

        Example::

            await store.prune(timedelta(days=35))   # the queue TTL is 30 days
        """
        cutoff = (datetime.now(UTC) - older_than).strftime("%Y-%m-%d %H:%M:%S")
        async with self._writer.transaction() as tx:
            return await tables.prune(tx.db, cutoff)

    async def applied_batch_ids(self, batch_ids: Iterable[str]) -> set[str]:
        """Which of ``batch_ids`` this device has applied."""
        return await tables.applied_batch_ids(self._db, list(batch_ids))

    async def progress(self, job_id: str) -> JobProgress | None:
        """How many of a job's batches this device has applied, of the job's total;
        ``None`` for a job it has applied no batch of (or only batches from before the
        store recorded totals). Each batch counts once, however often it was delivered;
        readable as long as the batch ids are remembered (see ``prune``).

        Example::

            progress = await store.progress(result.job_id)  # JobProgress(applied=3, total=40)
        """
        found = await tables.progress(self._db, job_id)
        return None if found is None else JobProgress(*found)

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
        """Apply a change batch in one transaction; ``False`` when it was applied before.

        Values SQLite cannot read back (NaN, Infinity) raise ``ValueError``, and nothing
        of the batch is kept.
        """
        rows = batch_rows(as_read_batch(batch), tables.to_json)
        async with self._writer.transaction() as tx:
            return await apply_rows(tx, self._views, rows)

    async def apply_group(self, batches: Sequence[BatchRows]) -> list[Outcome]:
        """Apply ``batches`` in order in ONE transaction; their outcomes, once it committed
        (durable: ``synchronous=FULL``).

        First all at once, their statements merged (``apply_many``). When that fails, the
        transaction is rolled back and the group applied again with a savepoint per batch:
        a batch that raises anything but a SQLite error is rolled back alone, and its
        outcome is the error; the others still apply. A SQLite error (disk full, the app
        holding the write lock) stops the group before that batch: the outcomes then cover
        only the batches before it, and when it is the first one, the error is raised with
        nothing applied. A batch is never applied after a later one.

        Example::

            outcomes = await store.apply_group([batch_rows(b) for b in batches])
        """
        try:
            async with self._writer.transaction() as tx:
                return list(await apply_many(tx, self._views, batches))
        except Exception as error:  # rare: the careful path finds which batch it was
            log.warning(
                "group rolled back; applying it one savepoint per batch",
                extra={"batches": len(batches), "error": repr(error)},
            )
        outcomes: list[Outcome] = []
        async with self._writer.transaction() as tx:
            for rows in batches:
                try:
                    async with tx.savepoint() as batch:
                        outcomes.append(await apply_rows(batch, self._views, rows))
                except sqlite3.Error:
                    if not outcomes:
                        raise
                    break
                except Exception as error:  # a value SQLite cannot store, or a bug
                    outcomes.append(error)
        return outcomes


def _row(object_id: int, data: str) -> dict[str, Any]:
    members = json.loads(data)
    return {"id": object_id, **{k: v for k, v in members.items() if k != "id"}}
