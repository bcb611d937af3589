"""Roles end to end: set and read them, a sync that follows them, and roles from a view
over the application's own tables (docs/roles.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from broker import ObjectRef, SyncClient
from syncctl.roles import RolesError, set_user_roles, user_roles
from tests.conftest import WORKER_ROLE, MakeDevice, insert, sync_settled
from worker import DomainModel
from worker.schema import create_worker_role, init_database

USER = 7
OTHER = 8

APP_TABLES_SQL = """
CREATE TABLE app_user (id bigint PRIMARY KEY, login text NOT NULL);
CREATE TABLE app_role (user_id bigint NOT NULL, name text);
"""
# As in docs/roles.md.
JOINED_VIEW = """
CREATE VIEW sync.user_role (user_id, role) AS
    SELECT u.id::bigint, r.name::text
    FROM app_user u
    JOIN app_role r ON r.user_id = u.id
    WHERE r.name IS NOT NULL
"""
# Over one table, so PostgreSQL would let INSERT and DELETE through to app_role.
UPDATABLE_VIEW = "CREATE VIEW sync.user_role (user_id, role) AS SELECT user_id, name FROM app_role"


def _outcomes(result) -> dict[int, tuple[str, str | None]]:
    return {item.id: (item.outcome, item.reason) for item in result.objects}


async def test_set_roles_and_read_them_back(pg):
    await set_user_roles(pg, USER, ["Worker", "Admin", "Admin"])
    await set_user_roles(pg, OTHER, ["Auditor"])
    assert await user_roles(pg, USER) == ["Admin", "Worker"]
    assert await user_roles(pg, OTHER) == ["Auditor"]
    assert await user_roles(pg, 99) == []


async def test_setting_roles_replaces_the_old_ones(pg):
    await set_user_roles(pg, USER, ["Admin", "Auditor"])
    await set_user_roles(pg, OTHER, ["Admin"])
    await set_user_roles(pg, USER, ["Worker"])
    assert await user_roles(pg, USER) == ["Worker"]
    await set_user_roles(pg, USER, [])
    assert await user_roles(pg, USER) == []
    assert await user_roles(pg, OTHER) == ["Admin"]


@pytest.mark.parametrize(
    "roles",
    [[""], ["1st"], ["has space"], ["Admin;DROP"], ["Admin\n"], ["_x"], ["A" * 64], "Admin"],
)
async def test_invalid_role_names_are_refused_before_writing(pg, roles):
    await set_user_roles(pg, USER, ["Admin"])
    with pytest.raises(RolesError, match=r"role name|not the string"):
        await set_user_roles(pg, USER, roles)
    assert await user_roles(pg, USER) == ["Admin"]


@pytest.mark.parametrize("user_id", [0, -1, 2**63, True])
async def test_invalid_user_ids_are_refused(pg, user_id):
    with pytest.raises(RolesError, match="not a valid user id"):
        await set_user_roles(pg, user_id, ["Admin"])
    with pytest.raises(RolesError, match="not a valid user id"):
        await user_roles(pg, user_id)
    assert await pg.fetchval("SELECT count(*) FROM sync.user_role") == 0


def test_roles_error_is_a_value_error():
    assert issubclass(RolesError, ValueError)


@pytest.mark.usefixtures("worker")
async def test_a_sync_follows_the_roles_set(client: SyncClient, make_device: MakeDevice, pg):
    device = await make_device(USER)
    note = await insert(pg, "t_note", text="admins only")
    ref = ObjectRef("Note", note)

    await set_user_roles(pg, USER, ["Admin"])
    result = await sync_settled(client, device, [ref])
    assert _outcomes(result) == {note: ("synced", None)}
    assert await device.store.get_committed("Note", note) == {"text": "admins only"}

    await set_user_roles(pg, USER, ["Worker"])
    result = await sync_settled(client, device, [ref])
    assert _outcomes(result) == {note: ("removed", "no-access")}
    assert await device.store.get_committed("Note", note) is None


@asynccontextmanager
async def _roles_from_app_tables(pg: asyncpg.Connection, view_sql: str) -> AsyncIterator[None]:
    """``sync.user_role`` as a view over ``app_user``/``app_role`` (docs/roles.md) for the
    block; the table is moved aside, not dropped, and put back afterwards."""
    await pg.execute("ALTER TABLE sync.user_role RENAME TO user_role_saved")
    try:
        async with pg.transaction():
            await pg.execute(APP_TABLES_SQL)
            await pg.execute(view_sql)
            await pg.execute(f"GRANT SELECT ON sync.user_role TO {WORKER_ROLE}")
        yield
    finally:
        async with pg.transaction():
            await pg.execute("DROP VIEW IF EXISTS sync.user_role")
            await pg.execute("ALTER TABLE sync.user_role_saved RENAME TO user_role")
            await pg.execute("DROP TABLE IF EXISTS app_user, app_role")


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("view_sql", [JOINED_VIEW, UPDATABLE_VIEW], ids=["joined", "updatable"])
async def test_roles_from_a_view_over_the_app_tables(
    client: SyncClient, make_device: MakeDevice, pg, view_sql
):
    device = await make_device(USER)  # no roles: make_device would write them to the table
    note = await insert(pg, "t_note", text="admins only")
    ref = ObjectRef("Note", note)
    async with _roles_from_app_tables(pg, view_sql):
        await pg.execute("INSERT INTO app_user VALUES ($1, 'ann'), ($2, 'bob')", USER, OTHER)
        await pg.execute("INSERT INTO app_role VALUES ($1, 'Admin'), ($2, 'Worker')", USER, OTHER)
        assert await user_roles(pg, USER) == ["Admin"]

        result = await sync_settled(client, device, [ref])
        assert _outcomes(result) == {note: ("synced", None)}
        assert await device.store.get_committed("Note", note) == {"text": "admins only"}

        with pytest.raises(RolesError, match=r"sync\.user_role is a view .* change roles there"):
            await set_user_roles(pg, USER, [])
        assert await pg.fetchval("SELECT count(*) FROM app_role") == 2

        await pg.execute("UPDATE app_role SET name = 'Worker' WHERE user_id = $1", USER)
        result = await sync_settled(client, device, [ref])
        assert _outcomes(result) == {note: ("removed", "no-access")}
        assert await device.store.get_committed("Note", note) is None
    assert await pg.fetchval("SELECT to_regclass('sync.user_role_saved')") is None
    assert await pg.fetchval("SELECT to_regclass('app_role')") is None


async def test_db_init_leaves_the_view_alone(pg, model: DomainModel):
    async with _roles_from_app_tables(pg, JOINED_VIEW):
        await pg.execute(f"REVOKE SELECT ON sync.user_role FROM {WORKER_ROLE}")
        await init_database(pg, model, create_tables=True)
        await create_worker_role(pg, model, WORKER_ROLE, WORKER_ROLE)
        kind = await pg.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = 'sync.user_role'::regclass"
        )
        assert kind == "v"
        assert await pg.fetchval(
            "SELECT has_table_privilege($1, 'sync.user_role', 'SELECT')", WORKER_ROLE
        )
        assert not await pg.fetchval(
            "SELECT has_table_privilege($1, 'app_role', 'SELECT')", WORKER_ROLE
        )
