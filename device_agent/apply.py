"""Applying change batches: a batch becomes rows of column values once, then one
``executemany`` per kind of change, in the caller's transaction.

No pydantic model and no per-object statement: the batch reader's structs give the
values, and each upsert's ``data`` is encoded to JSON in C. ``apply_many`` applies a
group of batches with the statements of consecutive batches merged, so a group of small
batches costs a few statements, not a few per batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiosqlite
import msgspec

from broker.wire import ReadBatch, ReadOverlay, ReadRemove, ReadUpsert
from device_agent import tables
from device_agent.tables import ObjectKey, TombstoneRow, UpsertRow
from device_agent.transaction import Transaction
from device_agent.views import ViewCatalog

__all__ = ["BatchRows", "apply_many", "apply_rows", "batch_rows"]

Encode = Callable[[object], str | bytes]
_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class BatchRows:
    """One batch as the rows its statements take."""

    batch_id: str
    job_id: str
    # The number of batches of the job.
    total: int
    members: dict[str, set[str]]
    upserts: list[UpsertRow]
    removed: list[ObjectKey]
    tombstones: list[TombstoneRow]
    overlays: list[tuple[str, int, str, str]]
    resyncs: list[tuple[str, datetime]]


def batch_rows(batch: ReadBatch, encode: Encode = _ENCODER.encode) -> BatchRows:
    """The rows of ``batch``, in one pass over its changes. ``encode`` writes ``data`` as
    JSON: msgspec's by default (a batch read off the wire holds no NaN); ``tables.to_json``
    for batches built in Python, so NaN and Infinity are refused with ``ValueError``.
    """
    rows = BatchRows(batch.batch_id, batch.job_id, batch.total, {}, [], [], [], [], [])
    for change in batch.changes:
        if isinstance(change, ReadUpsert):
            rows.upserts.append((change.entity, change.id, change.version, encode(change.data)))
            rows.members.setdefault(change.entity, set()).update(change.data)
        elif isinstance(change, ReadRemove):
            rows.removed.append((change.entity, change.id))
            if change.reason != "no-access":
                version = None if isinstance(change.version, msgspec.UnsetType) else change.version
                rows.tombstones.append((change.entity, change.id, version, change.reason))
        elif isinstance(change, ReadOverlay):
            rows.overlays.extend(
                (change.entity, change.id, member, tables.to_json(value))
                for member, value in change.changes.items()
            )
        else:
            rows.resyncs.append((change.reason, change.since))
    return rows


async def apply_rows(tx: Transaction, views: ViewCatalog, rows: BatchRows) -> bool:
    """Apply one batch in ``tx``; ``False`` when it was applied before (nothing changes)."""
    db = tx.db
    if not await tables.record_batch(db, rows.batch_id, rows.job_id, rows.total):
        return False
    await views.discover(tx, rows.members)
    for statement, values in _statements(rows):
        if values:
            await statement(db, values)
    return True


Statement = Callable[[aiosqlite.Connection, Sequence[Any]], Awaitable[None]]


async def apply_many(tx: Transaction, views: ViewCatalog, group: Sequence[BatchRows]) -> list[bool]:
    """Apply ``group`` in ``tx`` as ``apply_rows`` would one after the other (``False``
    for a batch applied before, or seen earlier in the group), with the same statements
    in the same order, each run of one statement over consecutive batches merged into one
    ``executemany``. A failure leaves ``tx`` half done: roll it back.
    """
    db = tx.db
    applied = await tables.applied_batch_ids(db, list({rows.batch_id for rows in group}))
    fresh: list[BatchRows] = []
    outcomes: list[bool] = []
    for rows in group:
        new = rows.batch_id not in applied
        outcomes.append(new)
        if new:
            applied.add(rows.batch_id)
            fresh.append(rows)
    # Only the fresh ones: a redelivered batch does not count twice in its job's progress.
    await tables.record_batches(db, [(rows.batch_id, rows.job_id, rows.total) for rows in fresh])
    members: dict[str, set[str]] = {}
    for rows in fresh:
        for entity, names in rows.members.items():
            members.setdefault(entity, set()).update(names)
    # Views are definitions, not rows: discovering the group's members first changes no
    # row any batch writes.
    await views.discover(tx, members)
    runs: list[tuple[Statement, list[Any]]] = []
    for rows in fresh:
        for statement, values in _statements(rows):
            if not values:
                continue
            if runs and runs[-1][0] is statement:
                runs[-1][1].extend(values)
            else:
                runs.append((statement, list(values)))
    for statement, values in runs:
        await statement(db, values)
    return outcomes


def _statements(rows: BatchRows) -> list[tuple[Statement, Sequence[Any]]]:
    """The statements ``apply_rows`` runs after recording the batch, in its order."""
    return [
        (tables.upsert_objects, rows.upserts),
        (tables.delete_objects, rows.removed),
        (tables.write_tombstones, rows.tombstones),
        (tables.set_members, rows.overlays),
        (_mark_resyncs, rows.resyncs),
    ]


async def _mark_resyncs(db: aiosqlite.Connection, resyncs: Sequence[tuple[str, datetime]]) -> None:
    for reason, since in resyncs:
        await tables.mark_resync(db, reason, since)
