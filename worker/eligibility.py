"""The eligibility table of SPEC §4, as pure functions over a job and the rows read.

The job-level rows of the table (origin, online app, device ownership) are decided by the
handler; this module decides what each named object gets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.models import (
    Change,
    ObjectKey,
    ObjectOutcome,
    OverlayChange,
    RemoveChange,
    RemoveReason,
    SyncJob,
    UpsertChange,
)
from worker.errors import JobRejected
from worker.model import DomainModel

__all__ = ["Decision", "Row", "check_job_names", "decide"]


@dataclass(frozen=True, slots=True)
class Row:
    """An object's latest committed state as read from PostgreSQL.

    ``readable`` holds the members the user's matching access rules let them read, or
    ``None`` when no rule of any of their roles matches the object.
    """

    id: int
    version: int
    autocommitted: bool
    values: Mapping[str, Any]
    readable: frozenset[str] | None


@dataclass
class Decision:
    outcomes: list[ObjectOutcome] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for item in self.outcomes if item.outcome == outcome)


def check_job_names(job: SyncJob, model: DomainModel, targets: Sequence[ObjectKey]) -> None:
    """Reject the whole job when it names an entity or member that cannot be synchronized.

    ``targets`` are the job's ``targets()``, computed once by the caller.
    """
    for entity_name in dict.fromkeys(entity for entity, _ in targets):
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


def decide(
    job: SyncJob, targets: Sequence[ObjectKey], rows: Mapping[str, Mapping[int, Row]]
) -> Decision:
    """What each named object gets, in the order of SPEC §4, each object once.

    ``rows`` holds, per entity, the rows found for the named ids; a missing id is gone.
    """
    deleted = {(ref.entity, ref.id) for ref in job.deleted}
    new = {(ref.entity, ref.id) for ref in job.new}
    overlays = {change.key: change.changes for change in job.uncommitted}
    decision = Decision()
    for key in targets:
        row = rows.get(key[0], {}).get(key[1])
        if key in deleted:
            _remove(decision, key, "deleted", row)
        elif key in new:
            # A new object was never committed, so it is not in the database either:
            # this check must come before "gone".
            _skip(decision, key, "new")
        elif row is None:
            _remove(decision, key, "gone", None)
        elif row.autocommitted:
            _skip(decision, key, "autocommitted")
        elif row.readable is None:
            _remove(decision, key, "no-access", row)
        else:
            _sync(decision, key, row, row.readable, overlays.get(key))
    return decision


def _remove(decision: Decision, key: ObjectKey, reason: RemoveReason, row: Row | None) -> None:
    decision.outcomes.append(
        ObjectOutcome(entity=key[0], id=key[1], outcome="removed", reason=reason)
    )
    decision.changes.append(
        RemoveChange(entity=key[0], id=key[1], reason=reason, version=row.version if row else None)
    )


def _skip(decision: Decision, key: ObjectKey, reason: str) -> None:
    decision.outcomes.append(
        ObjectOutcome(entity=key[0], id=key[1], outcome="skipped", reason=reason)
    )


def _sync(
    decision: Decision,
    key: ObjectKey,
    row: Row,
    readable: frozenset[str],
    overlay: Mapping[str, Any] | None,
) -> None:
    decision.outcomes.append(ObjectOutcome(entity=key[0], id=key[1], outcome="synced"))
    data = {member: value for member, value in row.values.items() if member in readable}
    decision.changes.append(UpsertChange(entity=key[0], id=key[1], version=row.version, data=data))
    visible = {member: value for member, value in (overlay or {}).items() if member in readable}
    if visible:
        decision.changes.append(OverlayChange(entity=key[0], id=key[1], changes=visible))
