"""The domain model: what the server knows about entities, loaded from a YAML file.

Every name in the file is checked against a strict pattern at load time, so the SQL built
from it later only ever quotes identifiers that passed here. A bad file fails at load
with the position of the mistake (``entities.WorkOrder.access[0].read[1]: ...``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.errors import ConfigurationError
from broker.models import ENTITY_NAME_PATTERN, MEMBER_NAME_PATTERN
from worker.rules import Constraint, ConstraintError, Hop, check_constraint
from worker.system import FILE_ENTITIES, SYSTEM_ENTITIES, USER_ENTITY

__all__ = [
    "EXAMPLE_MODEL",
    "FILE_ENTITIES",
    "USER_ENTITY",
    "AccessRule",
    "Association",
    "DomainModel",
    "Entity",
    "ModelError",
    "Rule",
    "load_model",
    "parse_model",
]

# The field-service example ships inside the package: the demo runs on it, and
# `syncctl model example` prints it as a starting point for a model of one's own.
EXAMPLE_MODEL = Path(str(files("worker") / "examples" / "field_service.yaml"))

TABLE_PATTERN = r"^([a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$"
COLUMN_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"
# Columns every table has by convention; a member may not shadow them.
RESERVED_MEMBERS = frozenset({"id", "version", "autocommitted"})

EntityName = Annotated[str, Field(pattern=ENTITY_NAME_PATTERN)]
MemberName = Annotated[str, Field(pattern=MEMBER_NAME_PATTERN)]
RoleName = Annotated[str, Field(pattern=MEMBER_NAME_PATTERN)]
AttributeType = Literal["string", "integer", "long", "decimal", "boolean", "datetime"]


class ModelError(ConfigurationError):
    """The model file is invalid; ``where`` is the position, e.g. ``entities.A.table``."""

    def __init__(self, source: str, where: str, message: str) -> None:
        super().__init__(f"{source}: {where}: {message}")
        self.source = source
        self.where = where


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Association(_Spec):
    """A reference from this entity's table to another entity's id."""

    to: EntityName
    column: Annotated[str, Field(pattern=COLUMN_PATTERN)]


class AccessRule(_Spec):
    """Users with any of ``roles`` may read ``read`` of the objects matching ``constraint``."""

    roles: tuple[RoleName, ...] = Field(min_length=1)
    read: Literal["*"] | tuple[MemberName, ...] = ()
    constraint: str | None = None


class Entity(_Spec):
    table: Annotated[str, Field(pattern=TABLE_PATTERN)] | None = None
    persistable: bool = True
    offline: bool = False
    # Keep what devices hold of this entity fresh (SPEC §12, docs/follow.md).
    follow: bool = False
    generalization: EntityName | None = None
    attributes: dict[MemberName, AttributeType] = Field(default_factory=dict)
    associations: dict[MemberName, Association] = Field(default_factory=dict)
    access: tuple[AccessRule, ...] = ()

    @model_validator(mode="after")
    def _shape(self) -> Entity:
        if self.persistable and self.table is None:
            raise ValueError("a persistable entity needs a 'table'")
        clash = set(self.attributes) & set(self.associations)
        if clash:
            raise ValueError(f"members named twice: {sorted(clash)}")
        reserved = RESERVED_MEMBERS.intersection(self.members)
        if reserved:
            raise ValueError(f"reserved member names: {sorted(reserved)}")
        return self

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.attributes, *self.associations)

    def readable(self, rule: AccessRule) -> frozenset[str]:
        """The members ``rule`` lets its roles read."""
        return frozenset(self.members if rule.read == "*" else rule.read)


@dataclass(frozen=True)
class Rule:
    """An access rule as the worker applies it, checked at load: its roles, the members it
    lets them read, and its constraint compiled against the model."""

    roles: frozenset[str]
    reads: frozenset[str]
    constraint: Constraint | None

    def applies_to(self, roles: frozenset[str]) -> bool:
        return not self.roles.isdisjoint(roles)


class _RuleError(Exception):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where


class DomainModel(_Spec):
    entities: dict[EntityName, Entity]

    def entity(self, name: str) -> Entity | None:
        return self.entities.get(name)

    def rules(self, name: str) -> tuple[Rule, ...]:
        """The access rules of entity ``name``, checked."""
        return self.access_rules[name]

    @cached_property
    def access_rules(self) -> dict[str, tuple[Rule, ...]]:
        """Every entity's checked rules, by entity; computed once (``parse_model`` does)."""
        return {
            name: tuple(
                self._rule(name, entity, position, rule)
                for position, rule in enumerate(entity.access)
            )
            for name, entity in self.entities.items()
        }

    def _rule(self, name: str, entity: Entity, position: int, rule: AccessRule) -> Rule:
        constraint = None
        if rule.constraint is not None:
            try:
                constraint = check_constraint(rule.constraint, entities=self.entities, entity=name)
            except ConstraintError as error:
                raise _RuleError(
                    f"entities.{name}.access[{position}].constraint", str(error)
                ) from None
        return Rule(frozenset(rule.roles), entity.readable(rule), constraint)

    @property
    def followed(self) -> dict[str, Entity]:
        """The entities whose objects devices hold are kept fresh, by name."""
        return {name: entity for name, entity in self.entities.items() if entity.follow}

    def fingerprint(self, name: str) -> str:
        """What entity ``name``'s objects carry to a device, as a digest: its table and
        members, and its checked rules (roles, members read, constraint as compiled, with
        its constants). Equal digests send the same members of the same rows."""
        entity = self.entities[name]
        rules = sorted(
            json.dumps(
                [
                    sorted(rule.roles),
                    sorted(rule.reads),
                    rule.constraint.template if rule.constraint else None,
                    [repr(source) for source in rule.constraint.sources] if rule.constraint else [],
                ]
            )
            for rule in self.rules(name)
        )
        shape = {
            "table": entity.table,
            "attributes": entity.attributes,
            "associations": {key: [a.to, a.column] for key, a in entity.associations.items()},
            "rules": rules,
        }
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:32]

    def paths(self, name: str) -> tuple[tuple[Hop, ...], ...]:
        """The association paths the constraints of entity ``name``'s rules follow."""
        paths = (rule.constraint.paths for rule in self.rules(name) if rule.constraint)
        return tuple(dict.fromkeys(path for group in paths for path in group))

    def is_file(self, name: str) -> bool:
        """True when ``name`` generalizes System.FileDocument or System.Image."""
        seen: set[str] = set()
        current: str | None = name
        while current is not None and current not in seen:
            if current in FILE_ENTITIES:
                return True
            seen.add(current)
            entity = self.entities.get(current)
            current = entity.generalization if entity else None
        return False

    def why_not_syncable(self, name: str) -> str | None:
        """The reason ``name`` can never be synchronized, or ``None`` when it can."""
        entity = self.entities.get(name)
        if entity is None:
            return f"unknown-entity: {name}"
        if not entity.persistable:
            return f"non-persistable-entity: {name}"
        if self.is_file(name):
            return f"file-entity: {name}"
        if not entity.offline:
            return f"not-in-offline-profile: {name}"
        return None

    @property
    def tables(self) -> dict[str, Entity]:
        """The persistable entities, by their table."""
        return {
            entity.table: entity
            for entity in self.entities.values()
            if entity.persistable and entity.table is not None
        }

    @property
    def offline_entities(self) -> dict[str, Entity]:
        """The entities a device may hold, by name."""
        return {
            name: entity
            for name, entity in self.entities.items()
            if self.why_not_syncable(name) is None
        }


def _check_references(model: DomainModel, source: str) -> None:
    known = set(model.entities) | SYSTEM_ENTITIES
    for name, entity in model.entities.items():
        where = f"entities.{name}"
        if entity.generalization is not None and entity.generalization not in known:
            raise ModelError(
                source, f"{where}.generalization", f"unknown entity {entity.generalization!r}"
            )
        for assoc_name, association in entity.associations.items():
            if association.to not in known:
                raise ModelError(
                    source,
                    f"{where}.associations.{assoc_name}.to",
                    f"unknown entity {association.to!r}",
                )
        if entity.follow and model.why_not_syncable(name) is not None:
            raise ModelError(
                source,
                f"{where}.follow",
                f"cannot be followed, devices cannot hold it: {model.why_not_syncable(name)}",
            )
        for position, rule in enumerate(entity.access):
            unknown = [] if rule.read == "*" else sorted(set(rule.read) - set(entity.members))
            if unknown:
                raise ModelError(
                    source, f"{where}.access[{position}].read", f"unknown members {unknown}"
                )
    try:
        # Constraints are compiled once, here, so a bad one fails at load, never at sync time.
        model.access_rules  # noqa: B018
    except _RuleError as error:
        raise ModelError(source, error.where, str(error)) from None


def parse_model(text: str, source: str = "<model>") -> DomainModel:
    """Parse and validate a model file's text.

    Example::

        model = parse_model("entities: {Note: {table: note, offline: true}}")
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "yaml"
        raise ModelError(
            source, where, f"not valid YAML: {getattr(error, 'problem', error)}"
        ) from None
    if not isinstance(raw, dict):
        raise ModelError(source, "top", "expected a mapping with 'entities'")
    try:
        model = DomainModel.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "entities"
        raise ModelError(source, where, first["msg"].removeprefix("Value error, ")) from None
    _check_references(model, source)
    return model


async def load_model(path: str | Path) -> DomainModel:
    """Read and validate the model file at ``path`` without blocking the event loop."""
    try:
        text = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ModelError(str(path), "file", f"cannot read: {reason}") from None
    return parse_model(text, source=str(path))
