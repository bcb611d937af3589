"""SQL for the app-facing views of the offline database: one view per synced entity.

Entity and member names arrive from the wire and become SQL identifiers here, so only
names matching the model's patterns are used, and they are quoted at the one place the
SQL text is built.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from broker.models import ENTITY_NAME_PATTERN, MEMBER_NAME_PATTERN, UpsertChange

__all__ = [
    "ENTITY_NAME",
    "MEMBER_NAME",
    "check_name",
    "json_path",
    "members_by_entity",
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


def check_name(name: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.fullmatch(name):
        raise ValueError(f"not a valid {what} name: {name!r} (must match {pattern.pattern})")


def valid_members(entity: str, names: Iterable[str]) -> frozenset[str]:
    given = set(names)
    valid = frozenset(name for name in given if MEMBER_NAME.fullmatch(name))
    if skipped := sorted(given - valid):
        log.warning(
            "entity %s: members %r are not valid member names, not in the view", entity, skipped
        )
    return valid


def members_by_entity(upserts: Iterable[UpsertChange]) -> dict[str, set[str]]:
    """One pass over a batch's upserts: the members each entity brings."""
    seen: dict[str, set[str]] = {}
    for upsert in upserts:
        seen.setdefault(upsert.entity, set()).update(upsert.data)
    return seen


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
    for member in sorted(members):
        # SQLite column names ignore case; a clash would be renamed ("a:1") silently.
        if member.lower() in taken:
            continue
        taken.add(member.lower())
        columns.append(f"json_extract(data, '{json_path(member)}') AS {quoted(member)}")
    return (
        f"CREATE VIEW {quoted(entity)} AS SELECT {', '.join(columns)} "
        f"FROM objects WHERE entity = '{entity}'"
    )
