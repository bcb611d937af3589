"""The store's write transactions: one at a time on its connection, with savepoints inside
and work to run once the transaction commits (as asyncpg's ``Transaction`` has).

Example::

    writer = Writer(db)
    async with writer.transaction() as tx:
        async with tx.savepoint() as batch:      # rolled back alone if it raises
            await batch.db.execute("INSERT ...")
            batch.on_commit(lambda: cache.update(...))   # only once the COMMIT is done
"""

from __future__ import annotations

import asyncio
import itertools
from collections import ChainMap
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite

__all__ = ["Transaction", "Writer"]

_savepoints = itertools.count(1)


class Transaction:
    """A write transaction, or a savepoint inside one.

    ``on_commit(work)`` runs ``work`` after the outermost COMMIT; work registered in a
    savepoint that rolls back is dropped with it. ``memo`` holds what participants learnt
    in this transaction (the members a view now covers), visible to the savepoints inside
    it and kept or dropped with them, so nothing outside sees it before the commit.
    """

    def __init__(self, db: aiosqlite.Connection, memo: ChainMap[Hashable, Any]) -> None:
        self.db = db
        self.memo = memo
        self._on_commit: list[Callable[[], None]] = []

    def on_commit(self, work: Callable[[], None]) -> None:
        self._on_commit.append(work)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[Transaction]:
        """A savepoint: rolled back (and its on-commit work dropped) if the block raises."""
        name = f"s{next(_savepoints)}"
        inner = Transaction(self.db, self.memo.new_child())
        await self.db.execute(f"SAVEPOINT {name}")
        try:
            yield inner
        except BaseException:
            # A failed statement can end the whole transaction (SQLITE_FULL, I/O errors):
            # then there is no savepoint left, and the COMMIT after it fails too.
            if self.db.in_transaction:
                await self.db.execute(f"ROLLBACK TO {name}")
                await self.db.execute(f"RELEASE {name}")
            raise
        await self.db.execute(f"RELEASE {name}")
        self.memo.update(inner.memo.maps[0])
        self._on_commit += inner._on_commit

    def _committed(self) -> None:
        for work in self._on_commit:
            work()


class Writer:
    """Starts the store's write transactions, one at a time: the store has one connection,
    shared by the coroutines using it (the app and the agent may share one store)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self._lock:
            tx = Transaction(self._db, ChainMap())
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield tx
                await self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    await self._db.execute("ROLLBACK")
                raise
            tx._committed()
