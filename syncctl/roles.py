"""A user's roles in ``sync.user_role``: read them, or replace them (SPEC §2, §3).

Workers read a user's roles from this relation on every job, never from the job message;
what is set here applies from the next job on. ``sync.user_role`` may also be a view over
the application's own tables (``docs/roles.md``); then roles are read here but changed in
the application.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import asyncpg

from broker.models import MAX_ID, MEMBER_NAME_PATTERN

__all__ = ["RolesError", "set_user_roles", "user_roles"]

# User ids are PostgreSQL bigints; 0 and below name no user.

# relkind as text: asyncpg returns the "char" type as bytes.
_RELKIND = "SELECT relkind::text FROM pg_class WHERE oid = to_regclass('sync.user_role')"
_VIEW_KINDS = frozenset({"v", "m"})  # a view, a materialized view


class RolesError(ValueError):
    """Roles that cannot be read or set: a bad user id or role name, or roles that the
    application owns (``sync.user_role`` is a view)."""


async def user_roles(conn: asyncpg.Connection, user_id: int) -> list[str]:
    """The user's roles, sorted; ``[]`` for a user with none. Works on the table and on a view.

    Example::

        >>> await user_roles(conn, 7)
        ['Admin', 'Worker']
    """
    _check_user(user_id)
    rows = await conn.fetch(
        "SELECT DISTINCT role FROM sync.user_role WHERE user_id = $1 AND role IS NOT NULL",
        user_id,
    )
    return sorted(row["role"] for row in rows)


async def set_user_roles(conn: asyncpg.Connection, user_id: int, roles: Collection[str]) -> None:
    """Replace the user's roles with ``roles`` (empty: no roles), in one transaction.

    Role names are the model's role names, case-sensitive, and must match
    ``MEMBER_NAME_PATTERN``. Raises ``RolesError``, before writing anything, for a bad user
    id or role name, or when ``sync.user_role`` is a view over the application's tables.

    Example::

        await set_user_roles(conn, 7, ["Admin", "Worker"])
        await set_user_roles(conn, 7, [])  # user 7 has no roles any more
    """
    _check_user(user_id)
    wanted = _checked_roles(roles)
    async with conn.transaction():
        await _refuse_view(conn)
        # Serializes writers (two replacements of one user's roles would otherwise
        # interleave their deletes and inserts); readers are not blocked.
        await conn.execute("LOCK TABLE sync.user_role IN SHARE ROW EXCLUSIVE MODE")
        await conn.execute("DELETE FROM sync.user_role WHERE user_id = $1", user_id)
        await conn.executemany(
            "INSERT INTO sync.user_role (user_id, role) VALUES ($1, $2)",
            [(user_id, role) for role in wanted],
        )


def _check_user(user_id: int) -> None:
    if isinstance(user_id, bool) or not isinstance(user_id, int):
        raise RolesError(f"not a valid user id: {user_id!r} (must be an integer)")
    if not 1 <= user_id <= MAX_ID:
        raise RolesError(f"not a valid user id: {user_id} (must be between 1 and {MAX_ID})")


def _checked_roles(roles: Collection[str]) -> list[str]:
    # A string is a collection of one-letter names: "Admin" would set A, d, m, i and n.
    if isinstance(roles, str):
        raise RolesError(f"roles must be a collection of names, not the string {roles!r}")
    bad = [role for role in roles if not isinstance(role, str)]
    bad += [role for role in roles if isinstance(role, str) and not _is_role_name(role)]
    if bad:
        listed = ", ".join(repr(role) for role in bad)
        raise RolesError(f"not a valid role name: {listed} (must match {MEMBER_NAME_PATTERN})")
    return sorted(set(roles))


def _is_role_name(role: str) -> bool:
    return re.fullmatch(MEMBER_NAME_PATTERN, role) is not None


async def _refuse_view(conn: asyncpg.Connection) -> None:
    """Refuse before writing: a view that selects from one table is updatable, and writing
    through it would change the application's own rows."""
    kind = await conn.fetchval(_RELKIND)
    if kind is None:
        raise RolesError("sync.user_role does not exist: run syncctl db init first")
    if kind in _VIEW_KINDS:
        raise RolesError(
            "sync.user_role is a view over the application's tables: change roles there"
        )
