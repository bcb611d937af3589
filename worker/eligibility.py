"""The eligibility table of SPEC §4, as pure functions over a job and the rows read.

The job-level rows of the table (origin, online app, device ownership) are decided by the
handler; this module decides what each named object gets. It works on the records as
fetched (``worker.access``): an object's upsert change is JSON text PostgreSQL wrote, so
deciding builds no object per row, and outcomes are one code per named object.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.models import ObjectKey, OverlayChange, RemoveChange, RemoveReason, SyncJob
from worker.access import AUTOCOMMITTED, MATCHES, UPSERT, VERSION
from worker.errors import JobRejected
from worker.model import DomainModel

__all__ = ["Decision", "Found", "check_job_names", "decide"]

# One code per named object: what it gets, as it appears in the result.
SYNCED, DELETED, GONE, NO_ACCESS, NEW, AUTOCOMMITTED_SKIP = range(6)
_OUTCOMES = (
    '"outcome":"synced","reason":null',
    '"outcome":"removed","reason":"deleted"',
    '"outcome":"removed","reason":"gone"',
    '"outcome":"removed","reason":"no-access"',
    '"outcome":"skipped","reason":"new"',
    '"outcome":"skipped","reason":"autocommitted"',
)
_RUNS = re.compile(rb"(.)\1*", re.DOTALL)
_ENTITY, _ID = operator.itemgetter(0), operator.itemgetter(1)
_REMOVE_CODE: dict[RemoveReason, int] = {"deleted": DELETED, "gone": GONE, "no-access": NO_ACCESS}


@dataclass(frozen=True)
class Found:
    """The records of one entity read for the jobs in hand, by id, and what an object
    whose rules matched as ``matches`` lets the user read (``EntityQuery.readable``)."""

    records: Mapping[int, Sequence[Any]]
    readable: Callable[[str], frozenset[str] | None]


@dataclass
class Decision:
    """What the named objects get: ``codes[i]`` for the ``i``-th target, and the changes
    for the device as JSON texts, in the order of the targets."""

    targets: Sequence[ObjectKey]
    codes: bytearray = field(default_factory=bytearray)
    changes: list[str] = field(default_factory=list)

    @property
    def synced(self) -> int:
        return self.codes.count(SYNCED)

    @property
    def removed(self) -> int:
        return sum(self.codes.count(code) for code in (DELETED, GONE, NO_ACCESS))

    @property
    def skipped(self) -> int:
        return self.codes.count(NEW) + self.codes.count(AUTOCOMMITTED_SKIP)

    def objects_json(self) -> str:
        """The per-object outcomes as the result's ``objects`` JSON array.

        Written a run at a time (objects in a row with the same entity and outcome, as a
        bulk job's are), with the ids joined by C code, not formatted one by one.
        """
        runs = []
        for run in _RUNS.finditer(self.codes):
            tail = f",{_OUTCOMES[run[0][0]]}}}"
            for entity, keys in itertools.groupby(self.targets[run.start() : run.end()], _ENTITY):
                head = f'{{"entity":"{entity}","id":'
                runs.append(head + (tail + "," + head).join(map(str, map(_ID, keys))) + tail)
        return "[" + ",".join(runs) + "]"


def check_job_names(job: SyncJob, model: DomainModel, targets: Sequence[ObjectKey]) -> None:
    """Reject the whole job when it names an entity or member that cannot be synchronized.

    ``targets`` are the job's ``targets()``, computed once by the caller; the entities of
    its queries are checked the same way.
    """
    named = itertools.chain((entity for entity, _ in targets), (q.entity for q in job.queries))
    for entity_name in dict.fromkeys(named):
        reason = model.why_not_syncable(entity_name)
        if reason is not None:
            raise JobRejected(reason)
    for change in job.uncommitted:
        entity = model.entity(change.ref.entity)
        if entity is None:
            raise JobRejected(f"unknown-entity: {change.ref.entity}")
        unknown = sorted(set(change.changes) - set(entity.members))
        if unknown:
            raise JobRejected(f"unknown-member: {change.ref.entity}.{unknown[0]}")


_NOTHING: Mapping[int, Sequence[Any]] = {}


def decide(job: SyncJob, targets: Sequence[ObjectKey], found: Mapping[str, Found]) -> Decision:
    """What each named object gets, in the order of SPEC §4, each object once.

    ``found`` holds, per entity, the records read for the named ids; a missing id is gone.
    """
    deleted = {(ref.entity, ref.id) for ref in job.deleted}
    new = {(ref.entity, ref.id) for ref in job.new}
    overlays = {change.key: change.changes for change in job.uncommitted}
    decision = Decision(targets)
    codes, changes = decision.codes, decision.changes
    for key in targets:
        entity = found.get(key[0])
        row = (entity.records if entity else _NOTHING).get(key[1])
        if key in deleted:
            _remove(decision, key, "deleted", row)
        elif key in new:
            # A new object was never committed, so it is not in the database either:
            # this check must come before "gone".
            codes.append(NEW)
        elif row is None:
            _remove(decision, key, "gone", None)
        elif row[AUTOCOMMITTED]:
            codes.append(AUTOCOMMITTED_SKIP)
        elif row[UPSERT] is None:
            _remove(decision, key, "no-access", row)
        else:
            codes.append(SYNCED)
            changes.append(row[UPSERT])
            if key in overlays:
                assert entity is not None
                _overlay(decision, key, overlays[key], entity.readable(row[MATCHES]))
    return decision


def _remove(
    decision: Decision, key: ObjectKey, reason: RemoveReason, row: Sequence[Any] | None
) -> None:
    decision.codes.append(_REMOVE_CODE[reason])
    version = row[VERSION] if row is not None else None
    change = RemoveChange(entity=key[0], id=key[1], reason=reason, version=version)
    decision.changes.append(change.model_dump_json())


def _overlay(
    decision: Decision,
    key: ObjectKey,
    overlay: Mapping[str, Any],
    readable: frozenset[str] | None,
) -> None:
    visible = {member: value for member, value in overlay.items() if member in (readable or ())}
    if visible:
        change = OverlayChange(entity=key[0], id=key[1], changes=visible)
        decision.changes.append(change.model_dump_json())
