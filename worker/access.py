"""What a user may read: per entity and set of roles, one query that fetches the named
objects together with which of the user's access rules match each of them.

Rules without a constraint decide for every object at once; each rule with a constraint
becomes one boolean column computed by PostgreSQL, so the readable members of an object
are the union of ``read`` over the rules whose column is true (SPEC §4, §5). Only the
members some applicable rule may read are selected: the rest never leave the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.eligibility import Row
from worker.model import DomainModel, Entity
from worker.rules import Parameters, compile_constraint
from worker.sql import quote_ident, quote_table

__all__ = ["AccessPolicy", "EntityQuery"]

_FIXED = ("id", "version", "autocommitted")


@dataclass(frozen=True)
class EntityQuery:
    """The fetch of one entity for one set of roles: ``$1`` is the ``bigint[]`` of ids."""

    sql: str
    members: tuple[str, ...]
    # Readable through rules without a constraint; None when no such rule applies.
    base: frozenset[str] | None
    # One entry per constraint column, in select order: what that rule lets the user read.
    rule_reads: tuple[frozenset[str], ...]
    params: Parameters
    _readable_by_match: dict[tuple[bool, ...], frozenset[str] | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def arguments(self, ids: Sequence[int], *, user_id: int) -> list[Any]:
        return [list(ids), *self.params.values(user_id=user_id)]

    def row(self, record: Sequence[Any]) -> Row:
        first_rule = len(_FIXED) + len(self.members)
        values = dict(zip(self.members, record[len(_FIXED) : first_rule], strict=True))
        matches = tuple(bool(flag) for flag in record[first_rule:])
        return Row(record[0], record[1], record[2], values, self._readable(matches))

    def _readable(self, matches: tuple[bool, ...]) -> frozenset[str] | None:
        # Few distinct combinations occur, so the union is computed once for each.
        if matches not in self._readable_by_match:
            pairs = zip(self.rule_reads, matches, strict=True)
            granted = [read for read, matched in pairs if matched]
            if self.base is None and not granted:
                readable = None
            else:
                readable = (self.base or frozenset()).union(*granted)
            self._readable_by_match[matches] = readable
        return self._readable_by_match[matches]


class AccessPolicy:
    """Builds, and keeps, the ``EntityQuery`` of each entity and set of roles.

    Example::

        policy = AccessPolicy(model)
        query = policy.query("WorkOrder", frozenset({"Technician"}))
        rows = [query.row(r) for r in await conn.fetch(query.sql, *query.arguments(ids, user_id=7))]
    """

    def __init__(self, model: DomainModel) -> None:
        self._model = model
        self._queries: dict[tuple[str, frozenset[str]], EntityQuery] = {}

    def query(self, entity_name: str, roles: frozenset[str]) -> EntityQuery:
        key = (entity_name, roles)
        if key not in self._queries:
            self._queries[key] = self._build(entity_name, roles)
        return self._queries[key]

    def _build(self, entity_name: str, roles: frozenset[str]) -> EntityQuery:
        entity = self._model.entities[entity_name]
        assert entity.table is not None, "only persistable entities are fetched"
        applicable = [rule for rule in entity.access if not roles.isdisjoint(rule.roles)]
        base: frozenset[str] | None = None
        for rule in applicable:
            if rule.constraint is None:
                base = (base or frozenset()) | entity.readable(rule)
        # A constrained rule that grants nothing beyond the base cannot change the outcome.
        constrained = [
            rule
            for rule in applicable
            if rule.constraint is not None and (base is None or not entity.readable(rule) <= base)
        ]
        wanted = (base or frozenset()).union(*(entity.readable(rule) for rule in constrained))
        members = tuple(member for member in entity.members if member in wanted)
        params = Parameters(first=2)
        conditions = [
            compile_constraint(
                rule.constraint or "",
                entities=self._model.entities,
                entity=entity_name,
                params=params,
            )
            for rule in constrained
        ]
        columns = [f"t0.{name}" for name in _FIXED]
        columns += [_member_column(entity, member) for member in members]
        columns += conditions
        sql = (
            f"SELECT {', '.join(columns)} FROM {quote_table(entity.table)} t0 "
            "WHERE t0.id = ANY($1::bigint[])"
        )
        return EntityQuery(
            sql, members, base, tuple(entity.readable(rule) for rule in constrained), params
        )


def _member_column(entity: Entity, member: str) -> str:
    association = entity.associations.get(member)
    return f"t0.{quote_ident(association.column if association else member)}"
