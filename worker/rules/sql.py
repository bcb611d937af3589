"""Compiles a constraint's syntax tree to one SQL condition over an entity's table.

Identifiers come only from the validated model and are quoted; every value written in the
constraint and the session user travel as bind parameters. Each condition on the object
itself is two-valued (an empty attribute makes a comparison false, never NULL), so
``not()`` means what it says. Association paths become ``EXISTS`` subqueries, so the
condition is evaluated by PostgreSQL in the query that fetches the objects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from worker.rules import ast
from worker.rules.errors import ConstraintError
from worker.rules.parser import parse
from worker.sql import quote_ident, quote_table
from worker.system import USER_ENTITY, USER_ROLES

__all__ = [
    "CURRENT_USER",
    "Constraint",
    "EntityShape",
    "Hop",
    "Parameters",
    "check_constraint",
]

_ROLE_TOKEN = re.compile(r"^UserRole_([A-Za-z][A-Za-z0-9_]*)$")
_DATETIME_TOKENS = {
    "CurrentDateTime": "now()",
    "BeginOfCurrentDay": "date_trunc('day', now(), 'UTC')",
}
_BIGINT_MIN, _BIGINT_MAX = -(2**63), 2**63 - 1
# The alias of the constrained entity's own table.
_ROOT = "t0"
_SUPPORTED_TOKENS = "CurrentUser, CurrentDateTime, BeginOfCurrentDay, UserRole_<name>"


class _CurrentUser:
    """Marks the parameter that takes the session user's id when a job runs."""

    def __repr__(self) -> str:
        return "CURRENT_USER"


CURRENT_USER = _CurrentUser()


class AssociationShape(Protocol):
    @property
    def to(self) -> str: ...
    @property
    def column(self) -> str: ...


class EntityShape(Protocol):
    """What the compiler reads of an entity of the model (``worker.model.Entity`` has it),
    so this package does not depend on the model module that uses it."""

    @property
    def table(self) -> str | None: ...
    @property
    def persistable(self) -> bool: ...
    @property
    def attributes(self) -> Mapping[str, str]: ...
    @property
    def associations(self) -> Mapping[str, AssociationShape]: ...


class Parameters:
    """The bind parameters of one statement: constants, and the session user bound per job.

    Example::

        params = Parameters(first=2)      # $1 is taken by the ids
        params.constant("Open", "text")   # '$2::text'
        params.values(user_id=7)          # ['Open']
    """

    def __init__(self, *, first: int = 1) -> None:
        self._first = first
        self._sources: list[Any] = []

    def constant(self, value: object, sql_type: str) -> str:
        return f"${self.number(value)}::{sql_type}"

    def current_user(self) -> str:
        return f"${self.number(CURRENT_USER)}::bigint"

    def number(self, source: object) -> int:
        """The number of the parameter that takes ``source`` (the session user's is shared)."""
        if source is not CURRENT_USER or CURRENT_USER not in self._sources:
            self._sources.append(source)
            return self._first + len(self._sources) - 1
        return self._first + self._sources.index(CURRENT_USER)

    @property
    def sources(self) -> tuple[Any, ...]:
        return tuple(self._sources)

    def values(self, *, user_id: int) -> list[Any]:
        return [user_id if source is CURRENT_USER else source for source in self._sources]


_PLACEHOLDER = re.compile(r"\$(\d+)::")


@dataclass(frozen=True, slots=True)
class Hop:
    """One association hop of a path: from ``source`` to ``target`` through ``column``,
    which ``source``'s table holds when ``forward``, else ``target``'s."""

    source: str
    column: str
    forward: bool
    target: str


@dataclass(frozen=True)
class Constraint:
    """A constraint checked against the model once, at load: its text, its SQL over the
    table aliased ``t0`` with parameters numbered from ``$1``, the association paths it
    follows (what a change elsewhere can change about the objects it matches) and the
    members of the entity itself it reads."""

    text: str
    template: str
    sources: tuple[Any, ...]
    paths: tuple[tuple[Hop, ...], ...] = ()
    members: frozenset[str] = frozenset()

    def sql(self, params: Parameters) -> str:
        """The condition, its parameters numbered after those ``params`` holds already."""
        numbers = [params.number(source) for source in self.sources]
        return _PLACEHOLDER.sub(lambda match: f"${numbers[int(match[1]) - 1]}::", self.template)


def check_constraint(
    text: str, *, entities: Mapping[str, EntityShape], entity: str, hops: bool = True
) -> Constraint:
    """Constraint ``text`` on ``entity``, checked. Raises ``ConstraintError`` (with the
    position) when the text does not parse or names something the model does not have,
    or, with ``hops=False``, when it follows an association to another object.

    Example::

        constraint = check_constraint("[status = 'Open']", entities=model.entities,
                                      entity="WorkOrder")
        constraint.sql(Parameters(first=2))
        # '(lower(t0."status") = lower($2::text)) IS TRUE'
    """
    params = Parameters()
    compiler = _Compiler(text, entities, params, hops=hops)
    template = compiler.expr(parse(text), entity, _ROOT)
    return Constraint(
        text,
        template,
        params.sources,
        tuple(dict.fromkeys(compiler.paths)),
        frozenset(compiler.members),
    )


# What a path leads to.
@dataclass(frozen=True, slots=True)
class _Attribute:
    name: str
    sql: str
    type: str


@dataclass(frozen=True, slots=True)
class _Reference:
    """A forward association's column: the referenced object's id."""

    name: str
    sql: str
    to: str


@dataclass(frozen=True, slots=True)
class _Roles:
    """``System.User/System.UserRoles``: the roles of the user whose id is ``user_sql``."""

    user_sql: str


@dataclass(frozen=True, slots=True)
class _Object:
    """A path ending at an entity; ``present`` is the SQL saying it exists."""

    entity: str
    present: str


_Target = _Attribute | _Reference | _Roles | _Object


@dataclass(frozen=True, slots=True)
class _Join:
    table: str
    alias: str
    link: str


class _Compiler:
    def __init__(
        self, text: str, entities: Mapping[str, EntityShape], params: Parameters, *, hops: bool
    ) -> None:
        self._text = text
        self._entities = entities
        self._params = params
        self._hops = hops
        self._aliases = 0
        self.paths: list[tuple[Hop, ...]] = []
        self.members: set[str] = set()

    def _error(self, message: str, span: ast.Span) -> ConstraintError:
        return ConstraintError(message, self._text, span.start, span.end)

    def expr(self, node: ast.Expr, entity: str, alias: str) -> str:
        if isinstance(node, ast.And | ast.Or):
            joiner = " AND " if isinstance(node, ast.And) else " OR "
            return "(" + joiner.join(self.expr(item, entity, alias) for item in node.operands) + ")"
        if isinstance(node, ast.Not):
            return f"NOT {self.expr(node.operand, entity, alias)}"
        if isinstance(node, ast.Constant):
            return "TRUE" if node.value else "FALSE"
        joins, target = self._walk(node.path, entity, alias)
        atom = self._atom(node, target)
        if not joins:
            return f"({atom}) IS TRUE"
        # Inside EXISTS a NULL rejects the row just as FALSE does, and the bare comparison
        # lets PostgreSQL use an index on the hop's far side.
        first, rest = joins[0], joins[1:]
        tables = f"{first.table} {first.alias}" + "".join(
            f" JOIN {join.table} {join.alias} ON {join.link}" for join in rest
        )
        return f"EXISTS (SELECT 1 FROM {tables} WHERE {first.link} AND {atom})"

    # Paths

    def _walk(self, path: ast.Path, entity: str, alias: str) -> tuple[list[_Join], _Target]:
        """The joins a path needs and what it ends at; hops come in (association, entity) pairs."""
        joins: list[_Join] = []
        hops: list[Hop] = []
        steps = path.steps
        while len(steps) >= 2:
            association, target = steps[0], steps[1]
            if not self._hops:
                raise self._error(
                    f"a query cannot follow association {association.name!r} to another "
                    f"object; compare members of {entity} itself",
                    ast.Span(association.span.start, target.span.end),
                )
            column, forward = self._hop(entity, association, target)
            if forward and alias == _ROOT:
                self.members.add(association.name)
            hops.append(Hop(entity, column, forward, target.name))
            if target.name == USER_ENTITY:
                self.paths.append(tuple(hops))
                return joins, self._user_end(f"{alias}.{quote_ident(column)}", steps[2:])
            table = self._table(target)
            self._aliases += 1
            new_alias = f"a{self._aliases}"
            link = (
                f"{new_alias}.id = {alias}.{quote_ident(column)}"
                if forward
                else f"{new_alias}.{quote_ident(column)} = {alias}.id"
            )
            joins.append(_Join(table, new_alias, link))
            entity, alias, steps = target.name, new_alias, steps[2:]
        if hops:
            self.paths.append(tuple(hops))
        if not steps:
            return joins, _Object(entity, "TRUE")
        return joins, self._member(entity, alias, steps[0])

    def _hop(self, entity: str, association: ast.Step, target: ast.Step) -> tuple[str, bool]:
        """The column of one hop and whether it is owned by ``entity`` (forward)."""
        own = self._entities[entity].associations.get(association.name)
        if own is not None and own.to == target.name:
            return own.column, True
        other = self._entities.get(target.name)
        theirs = other.associations.get(association.name) if other is not None else None
        if theirs is not None and theirs.to == entity:
            return theirs.column, False
        span = ast.Span(association.span.start, target.span.end)
        if own is None and theirs is None:
            raise self._error(
                f"no association {association.name!r} between {entity} and {target.name}", span
            )
        raise self._error(
            f"association {association.name!r} does not lead from {entity} to {target.name}",
            span,
        )

    def _table(self, step: ast.Step) -> str:
        entity = self._entities.get(step.name)
        if entity is None or entity.table is None or not entity.persistable:
            raise self._error(f"{step.name} has no table to follow", step.span)
        return quote_table(entity.table)

    def _user_end(self, user_sql: str, rest: tuple[ast.Step, ...]) -> _Target:
        if not rest:
            return _Object(USER_ENTITY, f"{user_sql} IS NOT NULL")
        if len(rest) == 1 and rest[0].name == USER_ROLES:
            return _Roles(user_sql)
        raise self._error(
            f"only {USER_ROLES} may follow {USER_ENTITY}",
            ast.Span(rest[0].span.start, rest[-1].span.end),
        )

    def _member(self, entity: str, alias: str, step: ast.Step) -> _Target:
        model_entity = self._entities[entity]
        if alias == _ROOT and (
            step.name in model_entity.attributes or step.name in model_entity.associations
        ):
            self.members.add(step.name)
        kind = model_entity.attributes.get(step.name)
        if kind is not None:
            return _Attribute(step.name, f"{alias}.{quote_ident(step.name)}", kind)
        association = model_entity.associations.get(step.name)
        if association is not None:
            return _Reference(
                step.name, f"{alias}.{quote_ident(association.column)}", association.to
            )
        raise self._error(f"unknown member {step.name!r} of {entity}", step.span)

    # Atoms

    def _atom(self, node: ast.Comparison | ast.Function | ast.Exists, target: _Target) -> str:
        if isinstance(node, ast.Exists):
            return self._exists(node, target)
        if isinstance(node, ast.Function):
            return self._function(node, target)
        if isinstance(target, _Attribute):
            return self._compare_attribute(node, target)
        if isinstance(target, _Reference):
            return self._compare_reference(node, target)
        if isinstance(target, _Roles):
            return self._compare_roles(node, target)
        raise self._error(
            f"{target.entity} is an object; compare one of its members instead", node.path.span
        )

    def _exists(self, node: ast.Exists, target: _Target) -> str:
        if isinstance(target, _Object):
            return target.present
        if isinstance(target, _Reference):
            return f"{target.sql} IS NOT NULL"
        raise self._error(
            "a path on its own must end at an entity or an association; "
            "compare an attribute with a value",
            node.path.span,
        )

    def _function(self, node: ast.Function, target: _Target) -> str:
        if not isinstance(target, _Attribute) or target.type != "string":
            raise self._error(f"{node.name}() needs a string attribute", node.path.span)
        if not isinstance(node.value, ast.Literal) or not isinstance(node.value.value, str):
            raise self._error(f"{node.name}() needs a string literal", node.value.span)
        pattern = self._params.constant(node.value.value, "text")
        if node.name == "contains":
            return f"strpos(lower({target.sql}), lower({pattern})) > 0"
        return f"starts_with(lower({target.sql}), lower({pattern}))"

    def _compare_attribute(self, node: ast.Comparison, target: _Attribute) -> str:
        if isinstance(node.value, ast.Empty):
            return self._compare_empty(node, target.sql, blank=target.type == "string")
        if target.type == "boolean" and node.operator not in ("=", "!="):
            raise self._error(f"{target.name} is a boolean: only = and != apply", node.span)
        value = self._attribute_value(target, node.value)
        return _comparison(target.sql, node.operator, value, fold_case=target.type == "string")

    def _attribute_value(self, target: _Attribute, value: ast.Literal | ast.TokenRef) -> str:
        if isinstance(value, ast.TokenRef):
            return self._token_value(target, value)
        literal = value.value
        if target.type == "string" and isinstance(literal, str):
            return self._params.constant(literal, "text")
        if target.type == "boolean" and isinstance(literal, bool):
            return self._params.constant(literal, "boolean")
        if target.type == "datetime" and isinstance(literal, str):
            return self._params.constant(self._datetime(literal, value.span), "timestamptz")
        if isinstance(literal, bool | str) or target.type in ("boolean", "string"):
            raise self._error(_mismatch(target, _describe(literal)), value.span)
        if target.type in ("integer", "long") and isinstance(literal, int):
            return self._bigint(literal, value.span)
        if target.type == "decimal":
            return self._params.constant(Decimal(literal), "numeric")
        if target.type == "datetime":
            raise self._error(_mismatch(target, "a number"), value.span)
        raise self._error(_mismatch(target, "a decimal number"), value.span)

    def _bigint(self, value: int, span: ast.Span) -> str:
        if not _BIGINT_MIN <= value <= _BIGINT_MAX:
            raise self._error("number out of range for a 64-bit integer", span)
        return self._params.constant(value, "bigint")

    def _datetime(self, text: str, span: ast.Span) -> datetime:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise self._error(f"not an ISO 8601 date or time: {text!r}", span) from None
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)

    def _token_value(self, target: _Attribute, token: ast.TokenRef) -> str:
        role = _ROLE_TOKEN.match(token.name)
        if token.name == "CurrentUser":
            if target.type in ("integer", "long"):
                return self._params.current_user()
            raise self._error(_mismatch(target, "[%CurrentUser%] (a user id)"), token.span)
        if token.name in _DATETIME_TOKENS:
            if target.type == "datetime":
                return _DATETIME_TOKENS[token.name]
            raise self._error(_mismatch(target, f"[%{token.name}%] (a datetime)"), token.span)
        if role is not None:
            if target.type == "string":
                return self._params.constant(role.group(1), "text")
            raise self._error(_mismatch(target, f"[%{token.name}%] (a role name)"), token.span)
        raise self._unknown_token(token)

    def _compare_reference(self, node: ast.Comparison, target: _Reference) -> str:
        if node.operator not in ("=", "!="):
            raise self._error(f"{target.name} is an association: only = and != apply", node.span)
        value = node.value
        if isinstance(value, ast.Empty):
            return self._compare_empty(node, target.sql, blank=False)
        if isinstance(value, ast.TokenRef) and value.name == "CurrentUser":
            if target.to != USER_ENTITY:
                raise self._error(
                    f"{target.name} leads to {target.to}, not to {USER_ENTITY}", value.span
                )
            return _comparison(target.sql, node.operator, self._params.current_user())
        if isinstance(value, ast.Literal) and type(value.value) is int:
            object_id = self._bigint(value.value, value.span)
            return _comparison(target.sql, node.operator, object_id)
        if isinstance(value, ast.TokenRef) and not _is_known_token(value.name):
            raise self._unknown_token(value)
        raise self._error(
            f"{target.name} is an association: compare it with empty, an id or [%CurrentUser%]",
            value.span,
        )

    def _compare_roles(self, node: ast.Comparison, target: _Roles) -> str:
        value = node.value
        role = _ROLE_TOKEN.match(value.name) if isinstance(value, ast.TokenRef) else None
        if node.operator not in ("=", "!=") or role is None:
            raise self._error(
                f"{USER_ROLES} can only be compared (= or !=) with a [%UserRole_<name>%] token",
                node.span,
            )
        name = self._params.constant(role.group(1), "text")
        has_role = (
            f"EXISTS (SELECT 1 FROM sync.user_role ur "
            f"WHERE ur.user_id = {target.user_sql} AND ur.role = {name})"
        )
        return has_role if node.operator == "=" else f"NOT {has_role}"

    def _compare_empty(self, node: ast.Comparison, sql: str, *, blank: bool) -> str:
        if node.operator not in ("=", "!="):
            raise self._error("empty can only be compared with = or !=", node.span)
        # Strings treat '' as empty too, as an app does when it shows the field.
        if node.operator == "=":
            return f"({sql} IS NULL OR {sql} = '')" if blank else f"{sql} IS NULL"
        return f"{sql} <> ''" if blank else f"{sql} IS NOT NULL"

    def _unknown_token(self, token: ast.TokenRef) -> ConstraintError:
        return self._error(
            f"unsupported token [%{token.name}%]; supported: {_SUPPORTED_TOKENS}", token.span
        )


def _comparison(left: str, operator: ast.Operator, right: str, *, fold_case: bool = False) -> str:
    # Strings compare case-insensitively, as in Mendix XPath.
    if fold_case:
        left, right = f"lower({left})", f"lower({right})"
    if operator == "!=":
        return f"{left} IS DISTINCT FROM {right}"
    return f"{left} {operator} {right}"


def _is_known_token(name: str) -> bool:
    return name == "CurrentUser" or name in _DATETIME_TOKENS or bool(_ROLE_TOKEN.match(name))


def _describe(literal: str | int | Decimal | bool) -> str:
    if isinstance(literal, bool):
        return "a boolean"
    return "a string" if isinstance(literal, str) else "a number"


def _mismatch(target: _Attribute, found: str) -> str:
    return f"{target.name} is {_ARTICLE[target.type]}, not comparable with {found}"


_ARTICLE: dict[str, str] = {
    "string": "a string",
    "integer": "an integer",
    "long": "a long",
    "decimal": "a decimal",
    "boolean": "a boolean",
    "datetime": "a datetime",
}
