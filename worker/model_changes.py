"""Model changes that reach devices (docs/model-changes.md): when the model changes what a
device may hold of a followed entity, the devices holding its objects are brought in
line without the app asking.

``sync.entity_rules`` keeps each followed entity's fingerprint (``DomainModel.fingerprint``)
as the workers last saw it. A starting worker stamps its own (``stamp``): an entity whose
fingerprint changed gets a resync cursor. Then one worker at a time
(``worker.leading``) walks the devices holding the entity's objects, in device order, a
bounded number a second, and serves each a push of what it holds (``worker.pushes``):
the worker reads the objects again under the new rules, and the device gets what
changed (a member no longer readable disappears, a new one appears, an object no longer
readable is removed) while what it holds as it is is not sent again. The cursor moves
on after each step's pushes were served, so a worker killed midway leaves the rest to
the next; an entity stamped again by a different model starts over.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from worker.devices import held_of_entity
from worker.impact import Push
from worker.leading import MODEL_LOCK, lead
from worker.metrics import MODEL_RESYNC_DEVICES
from worker.model import DomainModel
from worker.pushes import PushService

__all__ = ["ENTITY_RULES_SQL", "WORKER_GRANTS", "ModelResync", "resync_pending", "stamp"]

log = logging.getLogger(__name__)

ENTITY_RULES_SQL = """
CREATE TABLE IF NOT EXISTS sync.entity_rules (
    entity text PRIMARY KEY,
    fingerprint text NOT NULL,
    stamped_at timestamptz NOT NULL DEFAULT now(),
    -- While its holders are brought in line: the last device served ('' before the first).
    resync_after text
);
"""
WORKER_GRANTS = ("GRANT SELECT, INSERT, UPDATE, DELETE ON sync.entity_rules TO {role}",)

# A first sight records the fingerprint; nothing was sent under other rules that is known.
_STAMP = """
WITH dropped AS (DELETE FROM sync.entity_rules WHERE entity <> ALL($1::text[])),
stamped AS (
    INSERT INTO sync.entity_rules AS r (entity, fingerprint)
    SELECT * FROM unnest($1::text[], $2::text[])
    ON CONFLICT (entity) DO UPDATE
    SET fingerprint = excluded.fingerprint, stamped_at = now(), resync_after = ''
    WHERE r.fingerprint <> excluded.fingerprint
    RETURNING r.entity, r.resync_after
)
SELECT entity FROM stamped WHERE resync_after IS NOT NULL
"""
_WORK = """
SELECT r.entity, r.resync_after FROM sync.entity_rules r
JOIN unnest($1::text[], $2::text[]) AS m(entity, fingerprint) USING (entity, fingerprint)
WHERE r.resync_after IS NOT NULL ORDER BY r.entity
"""
# Moves on only while the entity still has this fingerprint: a model stamped since starts over.
_ADVANCE = (
    "UPDATE sync.entity_rules SET resync_after = $3 "
    "WHERE entity = $1 AND fingerprint = $2 AND resync_after IS NOT NULL"
)
_FINISH = "UPDATE sync.entity_rules SET resync_after = NULL WHERE entity = $1 AND fingerprint = $2"


def _fingerprints(model: DomainModel) -> tuple[list[str], list[str]]:
    names = sorted(model.followed)
    return names, [model.fingerprint(name) for name in names]


async def stamp(conn: asyncpg.Connection, model: DomainModel) -> list[str]:
    """Record ``model``'s fingerprints; returns the followed entities whose rules changed
    since the last stamp (their holders are to be brought in line)."""
    rows = await conn.fetch(_STAMP, *_fingerprints(model))
    return [row["entity"] for row in rows]


async def resync_pending(conn: asyncpg.Connection, model: DomainModel) -> bool:
    """Whether holders of an entity are still to be brought in line with ``model``'s rules
    (by this worker, or by another one with the same model)."""
    return bool(await conn.fetch(_WORK, *_fingerprints(model)))


class ModelResync:
    """Brings the holders of changed entities in line, ``rate`` devices a second, while
    this worker leads that work; returns once none is left (by this model's rules).

    Example::

        resync = ModelResync(settings.database_url, model, pushes, name="worker-1", ...)
        task = asyncio.create_task(resync.run())
    """

    def __init__(
        self,
        database_url: str,
        model: DomainModel,
        pushes: PushService,
        *,
        name: str,
        rate: int,
        takeover: float,
    ) -> None:
        self._url = database_url
        self._names, self._prints = _fingerprints(model)
        self._fingerprint = dict(zip(self._names, self._prints, strict=True))
        self._pushes = pushes
        self._name = name
        self._rate = rate
        self._takeover = takeover

    async def run(self) -> None:
        await lead(
            self._url,
            lock=MODEL_LOCK,
            name=self._name,
            what="model resync",
            takeover=self._takeover,
            work=self._resync,
            done=self._nothing_left,
        )

    async def _nothing_left(self, conn: asyncpg.Connection) -> bool:
        return not await conn.fetch(_WORK, self._names, self._prints)

    async def _resync(self, conn: asyncpg.Connection) -> None:
        for row in await conn.fetch(_WORK, self._names, self._prints):
            await self._entity(conn, row["entity"], row["resync_after"])

    async def _entity(self, conn: asyncpg.Connection, entity: str, after: str) -> None:
        fingerprint = self._fingerprint[entity]
        started = time.monotonic()
        served = 0
        log.info("model resync started", extra={"entity": entity, "after": after or None})
        while True:
            step = time.monotonic()
            holders = await held_of_entity(conn, entity, after=after, limit=self._rate)
            if not holders:
                break
            cause = f"model change of {entity}"
            pushes = {
                device_id: Push(user_id, dict.fromkeys((entity, i) for i in ids), cause)
                for device_id, user_id, ids in holders
            }
            await self._pushes.serve(f"model.{fingerprint}", pushes)
            MODEL_RESYNC_DEVICES.inc(len(pushes))
            served += len(pushes)
            after = holders[-1][0]
            if await conn.execute(_ADVANCE, entity, fingerprint, after) == "UPDATE 0":
                log.info("model resync superseded", extra={"entity": entity})
                return
            # A bounded rate: the devices' own jobs and the follow feed come first.
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - step)))
        await conn.execute(_FINISH, entity, fingerprint)
        log.info(
            "model resync done",
            extra={
                "entity": entity,
                "devices": served,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
