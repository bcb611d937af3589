"""``syncctl db init``: the ``sync`` schema, the version trigger, optionally the app tables."""

from __future__ import annotations

import hashlib
import re

import asyncpg

from worker.model import AttributeType, DomainModel, Entity
from worker.sql import quote_ident, quote_table

__all__ = [
    "DEVICE_LOCK_CLASS",
    "RELEASE_DEVICE",
    "SYNC_SCHEMA_SQL",
    "TAKE_DEVICE",
    "create_index_sqls",
    "create_table_sql",
    "create_worker_role",
    "init_database",
]

# Namespaces the per-device advisory locks among any other advisory locks of the database.
DEVICE_LOCK_CLASS = 0x5D0C
# The routines workers take and release devices with, by signature.
TAKE_DEVICE = "sync.take_device(text,text[])"
RELEASE_DEVICE = "sync.release_device(text,text[],text[],timestamptz)"

SYNC_SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS sync;
CREATE TABLE IF NOT EXISTS sync.user_role (
    user_id bigint NOT NULL,
    role text NOT NULL,
    PRIMARY KEY (user_id, role)
);
CREATE TABLE IF NOT EXISTS sync.device (
    device_id text PRIMARY KEY,
    user_id bigint NOT NULL,
    offline boolean NOT NULL DEFAULT true,
    registered_at timestamptz NOT NULL DEFAULT now()
);
-- Set when batches for the device were lost; cleared once it was told to resync.
ALTER TABLE sync.device ADD COLUMN IF NOT EXISTS resync_reason text;
ALTER TABLE sync.device ADD COLUMN IF NOT EXISTS resync_since timestamptz;
-- The answers of the jobs run, by device and job id, so a caller that retries with the
-- same job id gets the same answer and effect; workers forget them after a while.
CREATE TABLE IF NOT EXISTS sync.job_result (
    device_id text NOT NULL,
    job_id text NOT NULL,
    result text NOT NULL,
    answered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, job_id)
);
CREATE INDEX IF NOT EXISTS job_result_answered_at ON sync.job_result (answered_at);
-- A worker takes a device with take_device and lets it go with release_device. The lock
-- is a session advisory lock, so a job's three statements (take, fetch, release) need no
-- transaction around them; each reads after the lock was taken, so it sees what the
-- previous holder committed. A frozen worker's session ends after idle_session_timeout,
-- and its lock with it.
CREATE OR REPLACE FUNCTION sync.take_device(p_device text, p_jobs text[])
RETURNS TABLE (taken boolean, known boolean, owner bigint, is_offline boolean,
               lost_reason text, lost_since timestamptz, owner_roles text[],
               answered_ids text[], answered_results text[])
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_lock(DEVICE_LOCK_CLASS, hashtext(p_device)) THEN
        RETURN QUERY SELECT false, false, NULL::bigint, NULL::boolean, NULL::text,
                            NULL::timestamptz, NULL::text[], NULL::text[], NULL::text[];
        RETURN;
    END IF;
    -- A statement of its own: its snapshot is taken now, after the lock.
    RETURN QUERY
    SELECT true, true, d.user_id, d.offline, d.resync_reason, d.resync_since,
           ARRAY(SELECT r.role FROM sync.user_role r WHERE r.user_id = d.user_id),
           coalesce(a.ids, '{}'), coalesce(a.results, '{}')
    FROM sync.device d
    LEFT JOIN LATERAL (
        SELECT array_agg(j.job_id) AS ids, array_agg(j.result) AS results
        FROM sync.job_result j WHERE j.device_id = d.device_id AND j.job_id = ANY(p_jobs)
    ) a ON true
    WHERE d.device_id = p_device;
    IF NOT FOUND THEN
        PERFORM pg_advisory_unlock(DEVICE_LOCK_CLASS, hashtext(p_device));
        RETURN QUERY SELECT true, false, NULL::bigint, NULL::boolean, NULL::text,
                            NULL::timestamptz, NULL::text[], NULL::text[], NULL::text[];
    END IF;
END
$$;
-- Remembers the answers, clears a resync mark the device was just told about (unless a
-- newer loss moved it), commits, and only then lets the device go.
CREATE OR REPLACE PROCEDURE sync.release_device(
    p_device text, p_jobs text[], p_results text[], p_announced timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sync.job_result (device_id, job_id, result)
    SELECT p_device, t.job_id, t.result FROM unnest(p_jobs, p_results) AS t(job_id, result)
    ON CONFLICT DO NOTHING;
    IF p_announced IS NOT NULL THEN
        UPDATE sync.device SET resync_reason = NULL, resync_since = NULL
        WHERE device_id = p_device AND resync_since = p_announced;
    END IF;
    COMMIT;
    PERFORM pg_advisory_unlock(DEVICE_LOCK_CLASS, hashtext(p_device));
END
$$;
-- One sequence for all tables: a row's version only ever grows, in commit order per row.
CREATE SEQUENCE IF NOT EXISTS sync.version_seq;
CREATE OR REPLACE FUNCTION sync.bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := nextval('sync.version_seq');
    RETURN NEW;
END
$$;
""".replace("DEVICE_LOCK_CLASS", str(DEVICE_LOCK_CLASS))

_ROLE_PATTERN = r"[a-z_][a-z0-9_]{0,62}"

_SQL_TYPES: dict[AttributeType, str] = {
    "string": "text",
    "integer": "integer",
    "long": "bigint",
    "decimal": "numeric",
    "boolean": "boolean",
    "datetime": "timestamptz",
}


def create_table_sql(entity: Entity) -> str:
    """The table an entity's conventions ask for (SPEC §2)."""
    assert entity.table is not None
    columns = [
        "id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        "version bigint NOT NULL DEFAULT 0",
        "autocommitted boolean NOT NULL DEFAULT false",
    ]
    columns += [
        f"{quote_ident(name)} {_SQL_TYPES[kind]}" for name, kind in entity.attributes.items()
    ]
    columns += [f"{quote_ident(a.column)} bigint" for a in entity.associations.values()]
    return f"CREATE TABLE IF NOT EXISTS {quote_table(entity.table)} ({', '.join(columns)})"


def create_index_sqls(entity: Entity) -> list[str]:
    """One index per association column: constraints follow associations in both directions."""
    assert entity.table is not None
    return [
        f"CREATE INDEX IF NOT EXISTS {quote_ident(_index_name(entity.table, a.column))} "
        f"ON {quote_table(entity.table)} ({quote_ident(a.column)})"
        for a in entity.associations.values()
    ]


def _index_name(table: str, column: str) -> str:
    """``<table>_<column>_<hash>``, at most 63 characters; the hash keeps names apart that
    would otherwise meet (``a_b``.``c`` and ``a``.``b_c``) or be cut to the same prefix."""
    digest = hashlib.sha256(f"{table}.{column}".encode()).hexdigest()[:8]
    return f"{table.split('.')[-1]}_{column}"[:54] + f"_{digest}"


def _trigger_sql(table: str) -> str:
    return (
        f"CREATE OR REPLACE TRIGGER sync_version BEFORE INSERT OR UPDATE ON {quote_table(table)} "
        "FOR EACH ROW EXECUTE FUNCTION sync.bump_version()"
    )


async def init_database(
    conn: asyncpg.Connection, model: DomainModel, *, create_tables: bool = False
) -> list[str]:
    """Install the sync schema and a version trigger on each persistable table.

    Returns the tables that got the trigger. Safe to run again.
    """
    async with conn.transaction():
        await conn.execute(SYNC_SCHEMA_SQL)
        for table, entity in model.tables.items():
            if create_tables:
                await conn.execute(create_table_sql(entity))
                for statement in create_index_sqls(entity):
                    await conn.execute(statement)
            await conn.execute(_trigger_sql(table))
    return list(model.tables)


async def create_worker_role(
    conn: asyncpg.Connection, model: DomainModel, role: str, password: str
) -> None:
    """Create (or update) the role workers log in with: it reads the application tables and
    ``sync``'s, and may write only the device's resync mark and the jobs' answers. Safe to
    run again.

    Example::

        await create_worker_role(conn, model, "sync_worker", os.environ["SYNC_WORKER_DB_PASSWORD"])
    """
    if not re.fullmatch(_ROLE_PATTERN, role):
        raise ValueError(f"not a valid role name: {role!r} (must match {_ROLE_PATTERN})")
    tables = list(model.tables)
    await _refuse_privileged_role(conn, role, tables)
    exists = await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role)
    verb = "ALTER" if exists else "CREATE"
    # PostgreSQL quotes the name and the password itself: DDL takes no bind parameters.
    statement = await conn.fetchval(
        f"SELECT format('{verb} ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L', "
        "$1::text, $2::text)",
        role,
        password,
    )
    schemas = sorted({table.split(".")[0] if "." in table else "public" for table in tables})
    grantee = quote_ident(role)
    async with conn.transaction():
        await conn.execute(statement)
        for schema in [*schemas, "sync"]:
            await conn.execute(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {grantee}")
        await conn.execute(f"GRANT SELECT ON sync.device, sync.user_role TO {grantee}")
        await conn.execute(
            f"GRANT UPDATE (resync_reason, resync_since) ON sync.device TO {grantee}"
        )
        await conn.execute(f"GRANT SELECT, INSERT, DELETE ON sync.job_result TO {grantee}")
        await conn.execute(f"GRANT EXECUTE ON FUNCTION {TAKE_DEVICE} TO {grantee}")
        await conn.execute(f"GRANT EXECUTE ON PROCEDURE {RELEASE_DEVICE} TO {grantee}")
        for table in tables:
            await conn.execute(f"GRANT SELECT ON {quote_table(table)} TO {grantee}")


async def _refuse_privileged_role(conn: asyncpg.Connection, role: str, tables: list[str]) -> None:
    """Refuse to turn a role that can write anyway (a superuser, the operator's own role,
    an owner of the application tables) into "the read-only worker role"."""
    superuser = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = $1", role)
    is_me = await conn.fetchval("SELECT current_user = $1::name", role)
    owns = await conn.fetchval(
        "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
        "WHERE r.rolname = $1 AND c.oid IN (SELECT to_regclass(t) FROM unnest($2::text[]) t)",
        role,
        [quote_table(table) for table in tables],
    )
    if superuser or is_me or owns:
        raise ValueError(
            f"role {role!r} is a superuser, the current user or owns application tables; "
            "the worker role must be a role of its own"
        )
