"""Applying change batches: a batch becomes rows of column values once, then one
``executemany`` per kind of change, in the caller's transaction.

No pydantic model and no per-object statement: the batch reader's structs give the
values, and each upsert's ``data`` is encoded to JSON in C.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import msgspec

from broker.wire import ReadBatch, ReadOverlay, ReadRemove, ReadResync, ReadUpsert
from device_agent import tables
from device_agent.tables import ObjectKey, TombstoneRow, UpsertRow
from device_agent.transaction import Transaction
from device_agent.views import ViewCatalog, members_by_entity

__all__ = ["BatchRows", "apply_rows", "batch_rows"]

Encode = Callable[[object], str | bytes]
_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class BatchRows:
    """One batch as the rows its statements take."""

    batch_id: str
    job_id: str
    members: dict[str, set[str]]
    upserts: list[UpsertRow]
    removed: list[ObjectKey]
    tombstones: list[TombstoneRow]
    overlays: list[tuple[str, int, str, str]]
    resyncs: list[tuple[str, datetime]]


def batch_rows(batch: ReadBatch, encode: Encode = _ENCODER.encode) -> BatchRows:
    """The rows of ``batch``. ``encode`` writes ``data`` as JSON: msgspec's by default (a
    batch read off the wire holds no NaN); ``tables.to_json`` for batches built in Python,
    so NaN and Infinity are refused with ``ValueError``.
    """
    upserts = [c for c in batch.changes if isinstance(c, ReadUpsert)]
    removes = [c for c in batch.changes if isinstance(c, ReadRemove)]
    return BatchRows(
        batch.batch_id,
        batch.job_id,
        members_by_entity(upserts),
        [(c.entity, c.id, c.version, encode(c.data)) for c in upserts],
        [(c.entity, c.id) for c in removes],
        [
            (
                c.entity,
                c.id,
                None if isinstance(c.version, msgspec.UnsetType) else c.version,
                c.reason,
            )
            for c in removes
            if c.reason != "no-access"
        ],
        [
            (c.entity, c.id, member, tables.to_json(value))
            for c in batch.changes
            if isinstance(c, ReadOverlay)
            for member, value in c.changes.items()
        ],
        [(c.reason, c.since) for c in batch.changes if isinstance(c, ReadResync)],
    )


async def apply_rows(tx: Transaction, views: ViewCatalog, rows: BatchRows) -> bool:
    """Apply one batch in ``tx``; ``False`` when it was applied before (nothing changes)."""
    db = tx.db
    if not await tables.record_batch(db, rows.batch_id, rows.job_id):
        return False
    await views.discover(tx, rows.members)
    await tables.upsert_objects(db, rows.upserts)
    await tables.delete_objects(db, rows.removed)
    await tables.write_tombstones(db, rows.tombstones)
    await tables.set_members(db, rows.overlays)
    for reason, since in rows.resyncs:
        await tables.mark_resync(db, reason, since)
    return True
