"""Bringing a database written by an older store up to date, one version at a time.

The version is SQLite's ``user_version``; ``tables.STORE_VERSION`` is the current one.
"""

from __future__ import annotations

import aiosqlite

from device_agent.tables import SCHEMA, STORE_VERSION
from device_agent.transaction import Transaction, Writer
from device_agent.views import ViewCatalog

__all__ = ["create_and_upgrade"]


async def create_and_upgrade(db: aiosqlite.Connection, writer: Writer, views: ViewCatalog) -> None:
    """Create the tables a new file lacks, then upgrade an older one."""
    await db.executescript(SCHEMA)
    if await _user_version(db) >= STORE_VERSION:
        return  # the usual case: no write transaction at open
    async with writer.transaction() as tx:
        version = await _user_version(db)  # another process may have upgraded it
        if version < 1:
            await views.rebuild_from_objects(tx)
        if version < 2:
            await _date_tombstones(tx)
        if version < 3:
            await _count_batches(tx)
        await db.execute(f"PRAGMA user_version = {STORE_VERSION}")


async def _date_tombstones(tx: Transaction) -> None:
    """Version 2: tombstones carry the time of the removal, so old ones can be pruned."""
    if "removed_at" not in await _columns(tx, "tombstones"):
        await tx.db.execute("ALTER TABLE tombstones ADD COLUMN removed_at TEXT")
    # Undated ones count from now: they are kept one full horizon from the upgrade.
    await tx.db.execute(
        "UPDATE tombstones SET removed_at = CURRENT_TIMESTAMP WHERE removed_at IS NULL"
    )


async def _count_batches(tx: Transaction) -> None:
    """Version 3: applied batches carry their job's number of batches (``progress``).
    Batches applied before know none: their jobs' progress is unknown."""
    if "total" not in await _columns(tx, "applied_batches"):
        await tx.db.execute("ALTER TABLE applied_batches ADD COLUMN total INTEGER")


async def _columns(tx: Transaction, table: str) -> set[str]:
    async with tx.db.execute(f"PRAGMA table_info({table})") as cursor:
        return {row[1] for row in await cursor.fetchall()}


async def _user_version(db: aiosqlite.Connection) -> int:
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return 0 if row is None else int(row[0])
