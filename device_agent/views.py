"""The app-facing views of the offline database: one view per synced entity, their SQL,
and the catalog of entities and members they cover (``ViewCatalog``).

Entity and member names arrive from the wire and become SQL identifiers here, so only
names matching the model's patterns are used, and they are quoted at the one place the
SQL text is built.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from functools import partial

import aiosqlite

from broker.models import ENTITY_NAME_PATTERN, MEMBER_NAME_PATTERN
from device_agent.transaction import Transaction

__all__ = [
    "ENTITY_NAME",
    "MAX_VIEW_MEMBERS",
    "MEMBER_NAME",
    "ViewCatalog",
    "check_name",
    "json_path",
    "quoted",
    "valid_members",
    "view_sql",
]

log = logging.getLogger(__name__)

# Names from the wire become SQL identifiers in the views, so only these shapes are used
# (no quotes, no spaces). fullmatch: ``$`` alone would accept a trailing newline.
ENTITY_NAME = re.compile(ENTITY_NAME_PATTERN)
MEMBER_NAME = re.compile(MEMBER_NAME_PATTERN)
# The columns every view starts with; a member named like one of them (in any case) is
# left out of the view, as is a second member differing only in case.
_VIEW_COLUMNS = ("id", "version", "dirty")
# SQLite refuses a result of more than 2,000 columns (SQLITE_MAX_COLUMN), and then every
# read of the view fails. Past this many, members stay in ``objects.data`` only, readable
# with ``get()``, ``query()`` and ``json_extract``; the first ones by name make the view.
MAX_VIEW_MEMBERS = 1000


def check_name(name: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.fullmatch(name):
        raise ValueError(f"not a valid {what} name: {name!r} (must match {pattern.pattern})")


def valid_members(entity: str, names: Iterable[str]) -> frozenset[str]:
    given = set(names)
    valid = frozenset(name for name in given if MEMBER_NAME.fullmatch(name))
    if skipped := sorted(given - valid):
        log.warning(
            "members left out of the view: not valid member names",
            extra={"entity": entity, "members": skipped},
        )
    return valid


def quoted(name: str) -> str:
    # The patterns admit no quote; checking again here keeps every identifier that reaches
    # SQL text validated at the one place it is built.
    if not (ENTITY_NAME.fullmatch(name) or MEMBER_NAME.fullmatch(name)):
        raise ValueError(f"not a valid SQL identifier here: {name!r}")
    return f'"{name}"'


def json_path(member: str) -> str:
    return f'$."{member}"'


def view_sql(entity: str, members: Iterable[str]) -> str:
    """``CREATE VIEW "Entity" AS SELECT id, version, dirty, <members> FROM objects ...``"""
    columns = list(_VIEW_COLUMNS)
    taken = {column.lower() for column in columns}
    left_out = 0
    for member in sorted(members):
        # SQLite column names ignore case; a clash would be renamed ("a:1") silently.
        if member.lower() in taken:
            continue
        if len(taken) - len(_VIEW_COLUMNS) >= MAX_VIEW_MEMBERS:
            left_out += 1
            continue
        taken.add(member.lower())
        columns.append(f"json_extract(data, '{json_path(member)}') AS {quoted(member)}")
    if left_out:
        log.warning(
            "members left out of the view: too many",
            extra={"entity": entity, "left_out": left_out, "max_members": MAX_VIEW_MEMBERS},
        )
    return (
        f"CREATE VIEW {quoted(entity)} AS SELECT {', '.join(columns)} "
        f"FROM objects WHERE entity = '{entity}'"
    )


class ViewCatalog:
    """The app-facing views and the entities and members they cover.

    Members per entity known to be in ``entity_members`` (and so in the views) are cached.
    Members are never forgotten, so the cache only ever lags behind the database. What a
    transaction adds is kept in its ``memo`` (later batches of the same transaction see
    it) and enters the cache as on-commit work: a rolled-back view change is gone.
    """

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._members: dict[str, frozenset[str]] = {}

    async def discover(self, tx: Transaction, seen: Mapping[str, Iterable[str]]) -> None:
        """Record the entities and members in ``seen`` not known yet and rebuild their
        views, in ``tx``. Names that cannot be SQL identifiers are skipped (their values
        stay in ``data``, readable with ``get()``)."""
        for entity, names in sorted(seen.items()):
            members = valid_members(entity, names)
            known = tx.memo.get(("view", entity), self._members.get(entity))
            if known is not None and members <= known:
                continue
            if not ENTITY_NAME.fullmatch(entity):
                log.warning("no view: not a valid entity name", extra={"entity": entity})
                continue
            # Something is new: start from what the database holds, since another process
            # on the same file may have added members this one has not seen.
            stored = await self._stored_members(entity)
            await self._db.execute(
                "INSERT OR IGNORE INTO synced_entities (entity) VALUES (?)", (entity,)
            )
            await self._db.executemany(
                "INSERT OR IGNORE INTO entity_members (entity, member) VALUES (?, ?)",
                [(entity, member) for member in sorted(members - stored)],
            )
            await self._rebuild_view(entity, stored | members)
            tx.memo[("view", entity)] = stored | members
            tx.on_commit(partial(self._members.__setitem__, entity, stored | members))

    async def _rebuild_view(self, entity: str, members: frozenset[str]) -> None:
        if not await self._view_name_free(entity):
            log.warning(
                "no view: the name is taken by another table or view", extra={"entity": entity}
            )
            return
        await self._db.execute(f"DROP VIEW IF EXISTS {quoted(entity)}")
        await self._db.execute(view_sql(entity, members))

    async def _view_name_free(self, entity: str) -> bool:
        """True unless the name (SQLite compares names without case) is reserved, a table
        of the store, or the view of an entity spelled differently."""
        if entity.lower().startswith("sqlite_"):
            return False
        async with self._db.execute(
            "SELECT type, name FROM sqlite_master WHERE name = ? COLLATE NOCASE", (entity,)
        ) as cursor:
            taken = await cursor.fetchall()
        return all(kind == "view" and name == entity for kind, name in taken)

    async def _stored_members(self, entity: str) -> frozenset[str]:
        async with self._db.execute(
            "SELECT member FROM entity_members WHERE entity = ?", (entity,)
        ) as cursor:
            return frozenset(row[0] for row in await cursor.fetchall())

    async def has_members(self, entity: str, members: Iterable[str]) -> bool:
        """Whether every one of ``members`` was seen for ``entity``. The database is read
        only when the cache does not know one: another process on the same file (the
        agent, when the app has its own store) may have added it."""
        wanted = set(members)
        if wanted <= self._members.get(entity, frozenset()):
            return True
        return wanted <= await self._stored_members(entity)

    async def load(self) -> None:
        async with self._db.execute("SELECT entity FROM synced_entities") as cursor:
            members: dict[str, set[str]] = {row[0]: set() for row in await cursor.fetchall()}
        async with self._db.execute("SELECT entity, member FROM entity_members") as cursor:
            for entity, member in await cursor.fetchall():
                members.setdefault(entity, set()).add(member)
        self._members = {entity: frozenset(names) for entity, names in members.items()}

    async def rebuild_from_objects(self, tx: Transaction) -> None:
        """A database from before the views (store version 0) gets them from its objects."""
        seen: dict[str, set[str]] = {}
        async with self._db.execute("SELECT DISTINCT entity FROM objects") as cursor:
            for (entity,) in await cursor.fetchall():
                seen[entity] = set()
        async with self._db.execute(
            "SELECT DISTINCT o.entity, j.key FROM objects AS o, json_each(o.data) AS j "
            "WHERE json_type(o.data) = 'object'"
        ) as cursor:
            for entity, member in await cursor.fetchall():
                seen[entity].add(member)
        await self.discover(tx, dict(seen))
