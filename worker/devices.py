"""The device tables and every statement on them: the one module that owns them.

- ``sync.device``: a registered device, its owner, and its resync mark (set when batches
  for it were lost, cleared once it was told);
- ``sync.holding``: what each device holds of the followed entities (SPEC §12): entity,
  id, the version and the readable members sent. A row is *pending* (no version) from
  the moment a job for the object takes the device until the job's batches are
  confirmed, so a change committed meanwhile is routed to the device too;
- ``sync.job_result``: the answers of the jobs run, so a retried job gets the same answer;
- ``sync.take_device`` and ``sync.release_device``: how a worker takes a device and lets
  it go (``worker.handler``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

__all__ = [
    "DEVICES_SQL",
    "DEVICE_LOCK_CLASS",
    "LET_GO",
    "PEND",
    "RELEASE",
    "RELEASE_DEVICE",
    "TAKE",
    "TAKE_DEVICE",
    "WORKER_GRANTS",
    "delete_device",
    "delete_devices",
    "find_device",
    "forget_unfollowed",
    "held_of_entity",
    "holders_sql",
    "list_devices",
    "mark_lost",
    "mark_overflowed",
    "max_batches",
    "save_device",
    "save_devices",
]

# Namespaces the per-device advisory locks among any other advisory locks of the database.
DEVICE_LOCK_CLASS = 0x5D0C
# The routines workers take and release devices with, by signature.
TAKE_DEVICE = "sync.take_device(text,text[],text[],bigint[],text[],bigint[])"
RELEASE_DEVICE = (
    "sync.release_device(text,text[],text[],timestamptz,text[],bigint[],bigint[],text[])"
)

DEVICES_SQL = """
CREATE TABLE IF NOT EXISTS sync.device (
    device_id text PRIMARY KEY,
    user_id bigint NOT NULL,
    offline boolean NOT NULL DEFAULT true,
    registered_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE sync.device ADD COLUMN IF NOT EXISTS resync_reason text;
ALTER TABLE sync.device ADD COLUMN IF NOT EXISTS resync_since timestamptz;
-- The batches its queue holds at most (NULL: the default), to tell a full queue's refusal
-- from a queue that is unavailable for a moment.
ALTER TABLE sync.device ADD COLUMN IF NOT EXISTS max_batches integer;
CREATE TABLE IF NOT EXISTS sync.holding (
    device_id text NOT NULL REFERENCES sync.device ON DELETE CASCADE,
    entity text NOT NULL,
    object_id bigint NOT NULL,
    version bigint,
    members text[],
    PRIMARY KEY (device_id, entity, object_id)
);
-- Routing a change: which devices hold this object.
CREATE INDEX IF NOT EXISTS holding_object ON sync.holding (entity, object_id);
-- Taking a device: the pending rows a run that died left behind.
CREATE INDEX IF NOT EXISTS holding_pending ON sync.holding (device_id) WHERE version IS NULL;
CREATE TABLE IF NOT EXISTS sync.job_result (
    device_id text NOT NULL,
    job_id text NOT NULL,
    result text NOT NULL,
    answered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, job_id)
);
CREATE INDEX IF NOT EXISTS job_result_answered_at ON sync.job_result (answered_at);
DROP FUNCTION IF EXISTS sync.take_device(text, text[]);
DROP PROCEDURE IF EXISTS sync.release_device(text, text[], text[], timestamptz);
-- A worker takes a device with take_device and lets it go with release_device. The lock
-- is a session advisory lock, so a job's three statements (take, fetch, release) need no
-- transaction around them; each reads after the lock was taken, so it sees what the
-- previous holder committed. A frozen worker's session ends after idle_session_timeout,
-- and its lock with it.
--
-- take_device also marks the followed objects the jobs name as pending holdings (p_pend_*)
-- before they are read, and says which objects a follow push names the device holds
-- (p_push_* -> held_*, with the version and members sent): a push only ever refreshes
-- what the device was sent, and skips what it holds as it is.
CREATE OR REPLACE FUNCTION sync.take_device(
    p_device text, p_jobs text[], p_pend_entities text[], p_pend_ids bigint[],
    p_push_entities text[], p_push_ids bigint[])
RETURNS TABLE (taken boolean, known boolean, owner bigint, is_offline boolean,
               lost_reason text, lost_since timestamptz, owner_roles text[],
               answered_ids text[], answered_results text[],
               held_entities text[], held_ids bigint[], held_versions bigint[],
               held_members text[])
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_lock(DEVICE_LOCK_CLASS, hashtext(p_device)) THEN
        RETURN QUERY SELECT false, false, NULL::bigint, NULL::boolean, NULL::text,
                            NULL::timestamptz, NULL::text[], NULL::text[], NULL::text[],
                            NULL::text[], NULL::bigint[], NULL::bigint[], NULL::text[];
        RETURN;
    END IF;
    -- Under the lock no run of this device is in flight: pending rows are leftovers.
    DELETE FROM sync.holding WHERE device_id = p_device AND version IS NULL;
    -- A statement of its own: its snapshot is taken now, after the lock.
    RETURN QUERY
    SELECT true, true, d.user_id, d.offline, d.resync_reason, d.resync_since,
           ARRAY(SELECT r.role FROM sync.user_role r WHERE r.user_id = d.user_id),
           coalesce(a.ids, '{}'), coalesce(a.results, '{}'),
           coalesce(h.entities, '{}'), coalesce(h.ids, '{}'), coalesce(h.versions, '{}'),
           coalesce(h.members, '{}')
    FROM sync.device d
    LEFT JOIN LATERAL (
        SELECT array_agg(j.job_id) AS ids, array_agg(j.result) AS results
        FROM sync.job_result j WHERE j.device_id = d.device_id AND j.job_id = ANY(p_jobs)
    ) a ON true
    LEFT JOIN LATERAL (
        SELECT array_agg(s.entity) AS entities, array_agg(s.object_id) AS ids,
               array_agg(s.version) AS versions,
               array_agg(array_to_string(s.members, ',')) AS members
        FROM sync.holding s
        JOIN unnest(p_push_entities, p_push_ids) AS p(entity, object_id)
          ON s.entity = p.entity AND s.object_id = p.object_id
        WHERE s.device_id = d.device_id AND s.version IS NOT NULL
    ) h ON true
    WHERE d.device_id = p_device;
    IF NOT FOUND THEN
        PERFORM pg_advisory_unlock(DEVICE_LOCK_CLASS, hashtext(p_device));
        RETURN QUERY SELECT true, false, NULL::bigint, NULL::boolean, NULL::text,
                            NULL::timestamptz, NULL::text[], NULL::text[], NULL::text[],
                            NULL::text[], NULL::bigint[], NULL::bigint[], NULL::text[];
        RETURN;
    END IF;
    INSERT INTO sync.holding (device_id, entity, object_id)
    SELECT p_device, p.entity, p.object_id
    FROM unnest(p_pend_entities, p_pend_ids) AS p(entity, object_id)
    ON CONFLICT DO NOTHING;
END
$$;
-- Remembers the answers, records what the device now holds (a NULL version: no longer
-- held), clears a resync mark the device was just told about (unless a newer loss moved
-- it), commits, and only then lets the device go.
CREATE OR REPLACE PROCEDURE sync.release_device(
    p_device text, p_jobs text[], p_results text[], p_announced timestamptz,
    p_entities text[], p_ids bigint[], p_versions bigint[], p_members text[])
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sync.job_result (device_id, job_id, result)
    SELECT p_device, t.job_id, t.result FROM unnest(p_jobs, p_results) AS t(job_id, result)
    ON CONFLICT DO NOTHING;
    IF cardinality(p_entities) > 0 THEN
        DELETE FROM sync.holding s
        USING unnest(p_entities, p_ids, p_versions) AS t(entity, object_id, version)
        WHERE s.device_id = p_device AND s.entity = t.entity AND s.object_id = t.object_id
          AND t.version IS NULL;
        INSERT INTO sync.holding (device_id, entity, object_id, version, members)
        SELECT p_device, t.entity, t.object_id, t.version, string_to_array(t.members, ',')
        FROM unnest(p_entities, p_ids, p_versions, p_members)
             AS t(entity, object_id, version, members)
        WHERE t.version IS NOT NULL
        ON CONFLICT (device_id, entity, object_id) DO UPDATE
            SET version = excluded.version, members = excluded.members;
    END IF;
    -- What the run named but did not send (or a job that was rejected) is not held.
    DELETE FROM sync.holding WHERE device_id = p_device AND version IS NULL;
    IF p_announced IS NOT NULL THEN
        UPDATE sync.device SET resync_reason = NULL, resync_since = NULL
        WHERE device_id = p_device AND resync_since = p_announced;
    END IF;
    COMMIT;
    PERFORM pg_advisory_unlock(DEVICE_LOCK_CLASS, hashtext(p_device));
END
$$;
""".replace("DEVICE_LOCK_CLASS", str(DEVICE_LOCK_CLASS))

# What the worker role may do here, and no more: read the devices, write their resync
# mark, their holdings (through the routines) and the answers.
WORKER_GRANTS = (
    "GRANT SELECT ON sync.device TO {role}",
    "GRANT UPDATE (resync_reason, resync_since) ON sync.device TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON sync.holding TO {role}",
    "GRANT SELECT, INSERT, DELETE ON sync.job_result TO {role}",
    f"GRANT EXECUTE ON FUNCTION {TAKE_DEVICE} TO {{role}}",
    f"GRANT EXECUTE ON PROCEDURE {RELEASE_DEVICE} TO {{role}}",
)

# The lock, the device, its user's roles (always from PostgreSQL, never from the job), the
# answers it gave before to jobs in hand (a caller that retried), and the pushed objects
# it holds; the followed objects named become pending holdings.
TAKE = "SELECT * FROM sync.take_device($1, $2::text[], $3::text[], $4::bigint[], $5, $6)"
RELEASE = "CALL sync.release_device($1, $2::text[], $3::text[], $4, $5, $6, $7, $8)"
# The followed objects a job's queries listed, under the device's lock and before they
# are read: pending holdings, as take_device makes of the objects jobs name.
PEND = (
    "INSERT INTO sync.holding (device_id, entity, object_id) "
    "SELECT $1, p.entity, p.object_id FROM unnest($2::text[], $3::bigint[]) "
    "AS p(entity, object_id) ON CONFLICT DO NOTHING"
)
# After a run that failed: the device goes back, nothing is remembered.
LET_GO = "SELECT pg_advisory_unlock($1, hashtext($2))"

_COLUMNS = (
    "d.device_id, d.user_id, d.offline, d.registered_at, d.resync_reason, d.resync_since, "
    "(SELECT count(*) FROM sync.holding h WHERE h.device_id = d.device_id "
    "AND h.version IS NOT NULL) AS holdings"
)


async def save_device(
    conn: asyncpg.Connection,
    device_id: str,
    user_id: int,
    *,
    offline: bool,
    max_batches: int | None = None,
) -> None:
    """Register a device, or register it again (its owner, kind and queue bound may
    change); ``max_batches`` is its queue's length limit, when not the default."""
    await conn.execute(
        "INSERT INTO sync.device (device_id, user_id, offline, max_batches) "
        "VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (device_id) DO UPDATE SET user_id = excluded.user_id, "
        "offline = excluded.offline, max_batches = excluded.max_batches",
        device_id,
        user_id,
        offline,
        max_batches,
    )


async def max_batches(conn: asyncpg.Connection, device_id: str) -> int | None:
    """The length limit the device's queue was declared with, when not the default."""
    limit: int | None = await conn.fetchval(
        "SELECT max_batches FROM sync.device WHERE device_id = $1", device_id
    )
    return limit


async def save_devices(conn: asyncpg.Connection, device_ids: Sequence[str], user_id: int) -> None:
    """Register many offline devices of one user at once (benches, fleets); registered
    ones are left as they are."""
    await conn.execute(
        "INSERT INTO sync.device (device_id, user_id) SELECT unnest($1::text[]), $2 "
        "ON CONFLICT (device_id) DO NOTHING",
        list(device_ids),
        user_id,
    )


async def delete_devices(conn: asyncpg.Connection, device_ids: Sequence[str]) -> None:
    await conn.execute(
        "DELETE FROM sync.device WHERE device_id = ANY($1::text[])", list(device_ids)
    )


async def delete_device(conn: asyncpg.Connection, device_id: str) -> bool:
    """Forget a device and what it holds; ``False`` when it was not registered."""
    status: str = await conn.execute("DELETE FROM sync.device WHERE device_id = $1", device_id)
    return status != "DELETE 0"


async def forget_unfollowed(conn: asyncpg.Connection, followed: Sequence[str]) -> None:
    """Drop the holdings of entities the model no longer follows: nothing keeps them true."""
    await conn.execute("DELETE FROM sync.holding WHERE entity <> ALL($1::text[])", followed)


async def find_device(conn: asyncpg.Connection, device_id: str) -> asyncpg.Record | None:
    """The device's registration, resync mark and ``holdings`` (objects held), or ``None``."""
    record: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM sync.device d WHERE d.device_id = $1", device_id
    )
    return record


async def list_devices(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch(f"SELECT {_COLUMNS} FROM sync.device d ORDER BY d.device_id"))


async def mark_lost(db: asyncpg.Pool | asyncpg.Connection, device_id: str, reason: str) -> None:
    """Batches for the device were lost: it must resync. The first loss's time is kept,
    as the device must resync everything since then."""
    await db.execute(
        "UPDATE sync.device SET resync_reason = $2, "
        "resync_since = coalesce(resync_since, now()) WHERE device_id = $1",
        device_id,
        reason,
    )


async def mark_overflowed(
    conn: asyncpg.Connection, since: datetime, reason: str
) -> list[tuple[str, int]]:
    """Every device holding followed objects must resync: changes since ``since`` were
    not captured. Returns the devices marked, with their owners."""
    rows: Sequence[asyncpg.Record] = await conn.fetch(
        "UPDATE sync.device SET resync_reason = $2, resync_since = coalesce(resync_since, $1) "
        "WHERE device_id IN (SELECT DISTINCT device_id FROM sync.holding) "
        "RETURNING device_id, user_id",
        since,
        reason,
    )
    return [(row["device_id"], row["user_id"]) for row in rows]


_HOLDERS = (
    "SELECT h.device_id, d.user_id, h.entity, h.object_id FROM sync.holding h "
    "JOIN sync.device d ON d.device_id = h.device_id WHERE "
)


def holders_sql(where: str) -> str:
    """The statement listing ``(device_id, user_id, entity, object_id)`` for the holdings
    (held or about to be) that ``where`` selects (over ``h``, and the device as ``d``)."""
    return _HOLDERS + where


async def held_of_entity(
    conn: asyncpg.Connection, entity: str, *, after: str, limit: int
) -> list[tuple[str, int, list[int]]]:
    """The next ``limit`` devices after ``after`` (by id) holding objects of ``entity``:
    each with its owner and the ids it holds (confirmed holdings only: a pending one's
    job is reading it now)."""
    rows: Sequence[asyncpg.Record] = await conn.fetch(
        "SELECT h.device_id, d.user_id, array_agg(h.object_id ORDER BY h.object_id) AS ids "
        "FROM sync.holding h JOIN sync.device d ON d.device_id = h.device_id "
        "WHERE h.entity = $1 AND h.device_id > $2 AND h.version IS NOT NULL "
        "GROUP BY h.device_id, d.user_id ORDER BY h.device_id LIMIT $3",
        entity,
        after,
        limit,
    )
    return [(row["device_id"], row["user_id"], list(row["ids"])) for row in rows]
