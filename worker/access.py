"""What a user may read: per entity and set of roles, one query that fetches the named
objects, decides which of the user's access rules match each, and writes each object's
upsert change as JSON text, readable members only.

Rules without a constraint decide for every object at once; each rule with a constraint
becomes one boolean computed by PostgreSQL. The readable members of an object are the
union of ``read`` over the rules that match it (SPEC §4, §5), so a member granted by
constrained rules only is written when one of them matched. Only the members some
applicable rule may read are selected: the rest never leave the database. PostgreSQL
writes the JSON, so the worker passes it on as text and builds no object per row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.model import DomainModel, Entity, Rule
from worker.rules import Constraint, Parameters
from worker.sql import quote_ident, quote_table

__all__ = ["AccessPolicy", "EntityQuery", "Listing", "json_value"]

# Where each value sits in a fetched record.
ID, VERSION, AUTOCOMMITTED, MATCHES, UPSERT = range(5)
_ID, _VERSION, _DATA = ',"id":', ',"version":', ',"data":{'


def json_value(kind: str, sql: str) -> str:
    """The SQL writing the value ``sql`` of a member of type ``kind`` as JSON text, in the
    format of docs/device-db.md (decimals as strings with every digit, datetimes as ISO
    8601 in UTC). Needs the session's ``TimeZone`` to be UTC, as the worker's pool sets."""
    if kind == "decimal":
        # As strings with every digit; integer and float columns stay JSON numbers.
        value = (
            f"CASE WHEN pg_typeof({sql}) = 'numeric'::regtype THEN to_json({sql}::text) "
            f"ELSE to_json({sql}) END"
        )
    elif kind == "datetime":
        moment = f"{sql}::timestamp"
        fraction = (
            f"CASE WHEN date_trunc('second', {moment}) = {moment} THEN '' "
            f"ELSE to_char({moment}, '.US') END"
        )
        zone = f"CASE WHEN pg_typeof({sql}) = 'timestamptz'::regtype THEN 'Z' ELSE '' END"
        value = (
            f"CASE WHEN pg_typeof({sql}) = 'date'::regtype THEN to_json({sql}) ELSE "
            f"to_json(to_char({moment}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || {fraction} || {zone}) END"
        )
    else:
        value = f"to_json({sql})"
    return f"coalesce(({value})::text, 'null')"


@dataclass(frozen=True)
class EntityQuery:
    """The fetch of one entity for one set of roles: ``$1`` is the ``bigint[]`` of ids.

    Each record is ``(id, version, autocommitted, matches, upsert)``: ``matches`` has a
    ``1`` or ``0`` per constrained rule, for whether it matched the object; ``upsert`` is
    the object's upsert change as JSON text (``NULL`` when no rule lets the user read it).
    """

    sql: str
    # Readable through rules without a constraint; None when no such rule applies.
    base: frozenset[str] | None
    # One entry per constrained rule, in bit order: what that rule lets the user read.
    rule_reads: tuple[frozenset[str], ...]
    params: Parameters
    _readable_by_matches: dict[str, frozenset[str] | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def arguments(self, ids: Sequence[int], *, user_id: int) -> list[Any]:
        return [list(ids), *self.params.values(user_id=user_id)]

    def readable(self, matches: str) -> frozenset[str] | None:
        """The members of an object whose rules matched as ``matches``, or ``None`` when no
        rule lets the user read it."""
        # Few distinct combinations occur, so the union is computed once for each.
        if matches not in self._readable_by_matches:
            pairs = zip(self.rule_reads, matches, strict=True)
            granted = [read for read, matched in pairs if matched == "1"]
            readable = None
            if self.base is not None or granted:
                readable = (self.base or frozenset()).union(*granted)
            self._readable_by_matches[matches] = readable
        return self._readable_by_matches[matches]


@dataclass(frozen=True)
class Listing:
    """The ids of one entity that match a job's query and that the user may read, in id
    order, a chunk at a time: ``$1`` is the last id listed (``0`` at first), ``$2`` how
    many at most."""

    sql: str
    params: Parameters

    def arguments(self, after: int, limit: int, *, user_id: int) -> list[Any]:
        return [after, limit, *self.params.values(user_id=user_id)]


class AccessPolicy:
    """Builds, and keeps, the ``EntityQuery`` of each entity and set of roles.

    Example::

        policy = AccessPolicy(model)
        query = policy.query("WorkOrder", frozenset({"Technician"}))
        records = await conn.fetch(query.sql, *query.arguments(ids, user_id=7))
    """

    def __init__(self, model: DomainModel) -> None:
        self._model = model
        self._queries: dict[tuple[str, frozenset[str]], EntityQuery] = {}

    def query(self, entity_name: str, roles: frozenset[str]) -> EntityQuery:
        key = (entity_name, roles)
        if key not in self._queries:
            self._queries[key] = self._build(entity_name, roles)
        return self._queries[key]

    def listing(
        self, entity_name: str, roles: frozenset[str], constraint: Constraint
    ) -> Listing | None:
        """The listing of the objects of ``entity_name`` that match ``constraint`` and on
        which the user may read every member it compares (a condition on a member they
        may not read would tell them its value); that implies a rule matches the object.
        ``None`` when no object can qualify (no rule grants one of those members)."""
        entity = self._model.entities[entity_name]
        assert entity.table is not None, "only persistable entities are listed"
        applicable = self._applicable(entity_name, roles)
        params = Parameters(first=3)
        conditions = [constraint.sql(params)]
        # Each rule's condition is compiled once, and only when used: every parameter
        # numbered must appear in the statement.
        compiled: dict[int, str] = {}

        def granted(member: str | None) -> str:
            """When some rule lets the user read ``member`` (``None``: the object at all)."""
            rules = [i for i, r in enumerate(applicable) if member is None or member in r.reads]
            if any(applicable[i].constraint is None for i in rules):
                return "TRUE"
            for i in rules:
                rule_constraint = applicable[i].constraint
                if i not in compiled and rule_constraint is not None:
                    compiled[i] = rule_constraint.sql(params)
            return " OR ".join(f"({compiled[i]})" for i in rules) or "FALSE"

        members: list[str | None] = [*sorted(constraint.members)] or [None]
        conditions.extend(granted(member) for member in members)
        if "FALSE" in conditions:
            return None
        where = ["t0.id > $1::bigint", *(f"({c})" for c in conditions if c != "TRUE")]
        sql = (
            f"SELECT t0.id FROM {quote_table(entity.table)} t0 WHERE {' AND '.join(where)} "
            "ORDER BY t0.id LIMIT $2::int"
        )
        return Listing(sql, params)

    def _applicable(self, entity_name: str, roles: frozenset[str]) -> list[Rule]:
        return [rule for rule in self._model.rules(entity_name) if rule.applies_to(roles)]

    def _build(self, entity_name: str, roles: frozenset[str]) -> EntityQuery:
        entity = self._model.entities[entity_name]
        assert entity.table is not None, "only persistable entities are fetched"
        applicable = self._applicable(entity_name, roles)
        base: frozenset[str] | None = None
        for rule in applicable:
            if rule.constraint is None:
                base = (base or frozenset()) | rule.reads
        # A constrained rule that grants nothing beyond the base cannot change the outcome.
        constrained = [
            rule
            for rule in applicable
            if rule.constraint is not None and (base is None or not rule.reads <= base)
        ]
        params = Parameters(first=2)
        conditions = [rule.constraint.sql(params) for rule in constrained if rule.constraint]
        # Each condition is computed once per row in the inner query, under a name no column
        # can have; OFFSET 0 keeps PostgreSQL from folding the inner query into the outer
        # one, which would evaluate a condition again for every member it grants.
        flags = [f'"rule {bit}"' for bit in range(len(conditions))]
        columns = dict.fromkeys(["t0.id", "t0.version", "t0.autocommitted"])
        columns.update(dict.fromkeys(_column(entity, member) for member in entity.members))
        inner = ", ".join(
            [*columns, *(f"({sql}) AS {flag}" for sql, flag in zip(conditions, flags, strict=True))]
        )
        matches = f"concat({', '.join(f'{flag}::int' for flag in flags)})" if flags else "''"
        readable = "TRUE" if base is not None else " OR ".join(flags) or "FALSE"
        members = []
        for member in entity.members:
            granted_by = [
                flag for flag, rule in zip(flags, constrained, strict=True) if member in rule.reads
            ]
            if base is not None and member in base:
                members.append(_member_json(entity, member))
            elif granted_by:
                members.append(
                    f"CASE WHEN {' OR '.join(granted_by)} THEN {_member_json(entity, member)} END"
                )
        head = json.dumps({"op": "upsert", "entity": entity_name}, separators=(",", ":"))[:-1]
        upsert = (
            f"CASE WHEN {readable} THEN {_literal(head + _ID)} || t0.id || {_literal(_VERSION)} "
            f"|| t0.version || {_literal(_DATA)} || concat_ws(',', {', '.join(members) or 'NULL'}) "
            "|| '}}' END"
        )
        sql = (
            f"SELECT t0.id, t0.version, t0.autocommitted, {matches}, {upsert} FROM "
            f"(SELECT {inner} FROM {quote_table(entity.table)} t0 "
            "WHERE t0.id = ANY($1::bigint[]) OFFSET 0) t0"
        )
        return EntityQuery(sql, base, tuple(rule.reads for rule in constrained), params)


def _column(entity: Entity, member: str) -> str:
    association = entity.associations.get(member)
    return f"t0.{quote_ident(association.column if association else member)}"


def _member_json(entity: Entity, member: str) -> str:
    """``"member":value`` as SQL text."""
    kind = entity.attributes.get(member, "association")
    return f"{_literal(json.dumps(member) + ':')} || {json_value(kind, _column(entity, member))}"


def _literal(text: str) -> str:
    """``text`` as an SQL string literal (names passed the model's patterns already)."""
    return "'" + text.replace("'", "''") + "'"
