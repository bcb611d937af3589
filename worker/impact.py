"""From captured changes to the devices whose followed objects they may change.

A change to a followed object concerns every device holding it. A change to another
table concerns the followed objects whose constraint paths pass through the changed row:
each path is walked backwards from the row to the followed entity, in one query per path
and position. Where the last hop is an association the changed table holds, the old
values captured with the change are followed too, so objects the row reached before the
change are found as well as those it reaches now. A change to a user's roles concerns
every device of that user. The worker then reads each object's latest state and the
user's rules decide again what the device gets (``worker.handler``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import asyncpg

from broker.models import ObjectKey
from worker.capture import Captured
from worker.devices import holders_sql
from worker.model import DomainModel
from worker.rules import Hop
from worker.sql import quote_ident, quote_table
from worker.system import USER_ENTITY

__all__ = ["Impact", "Push", "reverse_sql"]

_DIRECT = holders_sql("(h.entity, h.object_id) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))")
_USERS = holders_sql("d.user_id = ANY($1::bigint[])")


@dataclass
class Push:
    """What one device gets refreshed: its owner, the objects, and what caused it."""

    user_id: int
    keys: dict[ObjectKey, None] = field(default_factory=dict)
    cause: str = ""


@dataclass(frozen=True, slots=True)
class _Reverse:
    """The holders of ``entity`` objects reached through changed rows: ``$1`` the entity,
    ``$2`` the changed ids, ``$3`` the old values of ``column`` (a reverse last hop)."""

    entity: str
    column: str | None
    sql: str


def reverse_sql(model: DomainModel, entity: str, hops: tuple[Hop, ...]) -> str:
    """The ids of ``entity`` objects whose path ``hops`` ends at a changed row of the last
    hop's target: ``$2`` the changed ids, ``$3`` old values of a reverse last hop's
    column (the current ones are read here); ``$1`` is left to the caller."""
    source = model.entities[entity]
    assert source.table is not None
    tables = f"{quote_table(source.table)} t0"
    alias = "t0"
    for number, hop in enumerate(hops[:-1], start=1):
        target = model.entities[hop.target]
        assert target.table is not None
        new = f"a{number}"
        column = quote_ident(hop.column)
        link = f"{new}.id = {alias}.{column}" if hop.forward else f"{new}.{column} = {alias}.id"
        tables += f" JOIN {quote_table(target.table)} {new} ON {link}"
        alias = new
    last = hops[-1]
    column = quote_ident(last.column)
    if last.forward:
        where = f"{alias}.{column} = ANY($2::bigint[])"
    else:
        target = model.entities[last.target]
        assert target.table is not None
        now = f"SELECT x.{column} FROM {quote_table(target.table)} x WHERE x.id = ANY($2::bigint[])"
        where = f"{alias}.id = ANY(ARRAY({now}) || $3::bigint[])"
    return f"SELECT t0.id FROM {tables} WHERE {where}"


class Impact:
    """Which devices hold objects that captured changes may change.

    Example::

        impact = Impact(model)
        pushes = await impact.pushes(conn, await read_changes(conn, 1000))
    """

    def __init__(self, model: DomainModel) -> None:
        self._followed = frozenset(model.followed)
        self._reverse: dict[str, list[_Reverse]] = defaultdict(list)
        for name in model.followed:
            for path in model.paths(name):
                for end in range(1, len(path) + 1):
                    hops = path[:end]
                    last = hops[-1]
                    select = reverse_sql(model, name, hops)
                    sql = holders_sql(f"h.entity = $1 AND h.object_id IN ({select})")
                    column = None if last.forward else last.column
                    self._reverse[last.target].append(_Reverse(name, column, sql))

    async def pushes(self, conn: asyncpg.Connection, captured: Captured) -> dict[str, Push]:
        """The devices to refresh and what, by device."""
        ids: dict[str, dict[int, None]] = defaultdict(dict)
        old: dict[tuple[str, str], set[int]] = defaultdict(set)
        for entity, object_id, refs in captured.changes:
            ids[entity][object_id] = None
            for column, value in (refs or {}).items():
                if value is not None:
                    old[(entity, column)].add(int(value))
        pushes: dict[str, Push] = {}
        direct = [(e, i) for e in ids if e in self._followed for i in ids[e]]
        if direct:
            rows = await conn.fetch(_DIRECT, [e for e, _ in direct], [i for _, i in direct])
            _collect(pushes, rows, "changed")
        if USER_ENTITY in ids:
            rows = await conn.fetch(_USERS, list(ids[USER_ENTITY]))
            _collect(pushes, rows, f"roles of user {next(iter(ids[USER_ENTITY]))}")
        for entity, changed in ids.items():
            for reverse in self._reverse.get(entity, ()):
                arguments: list[object] = [reverse.entity, list(changed)]
                if reverse.column is not None:
                    arguments.append(list(old.get((entity, reverse.column), ())))
                rows = await conn.fetch(reverse.sql, *arguments)
                _collect(pushes, rows, f"via {entity} {next(iter(changed))}")
        return pushes


def _collect(pushes: dict[str, Push], rows: Iterable[asyncpg.Record], cause: str) -> None:
    for device_id, user_id, entity, object_id in rows:
        push = pushes.get(device_id)
        if push is None:
            push = pushes[device_id] = Push(user_id, cause=f"{entity} {object_id} {cause}")
        push.keys[(entity, object_id)] = None
