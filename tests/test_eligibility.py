"""The per-object rules of SPEC §4 as pure logic, in the table's order of precedence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from broker import (
    ObjectRef,
    OverlayChange,
    RemoveChange,
    Session,
    SyncJob,
    UncommittedChange,
    UpsertChange,
)
from broker.models import Change
from worker.eligibility import Decision, Found, check_job_names, decide
from worker.errors import JobRejected
from worker.model import parse_model

MODEL = parse_model((Path(__file__).with_name("model.yaml")).read_text())
WORKER_READS = frozenset({"title", "status"})
_CHANGE: TypeAdapter[Change] = TypeAdapter(Change)


def _job(*refs: ObjectRef, **context: Any) -> SyncJob:
    return SyncJob(
        job_id="j",
        session=Session(user_id=1, device_id="d"),
        origin="nanoflow",
        objects=refs,
        **context,
    )


def _row(
    object_id: int,
    autocommitted: bool = False,
    readable: frozenset[str] | None = WORKER_READS,
) -> tuple[Any, ...]:
    """A record as ``worker.access`` fetches it; ``matches`` here names the readable set."""
    data = {"title": "t", "secret": "s"}
    upsert = None
    if readable is not None:
        visible = {member: value for member, value in data.items() if member in readable}
        upsert = UpsertChange(entity="Task", id=object_id, version=10, data=visible)
    matches = ",".join(sorted(readable)) if readable is not None else "none"
    return (object_id, 10, autocommitted, matches, upsert and upsert.model_dump_json())


def _readable(matches: str) -> frozenset[str] | None:
    return None if matches == "none" else frozenset(matches.split(","))


def _decide(job: SyncJob, rows: dict[str, dict[int, tuple[Any, ...]]]) -> Decision:
    return decide(job, job.targets(), {name: Found(rs, _readable) for name, rs in rows.items()})


def _reasons(decision: Decision) -> list[tuple[str, str | None]]:
    return [(o["outcome"], o["reason"]) for o in json.loads(decision.objects_json())]


def _changes(decision: Decision) -> list[Change]:
    return [_CHANGE.validate_json(change) for change in decision.changes]


def test_deleted_wins_over_new_and_is_removed_with_the_version_seen():
    ref = ObjectRef("Task", 1)
    decision = _decide(_job(ref, deleted=(ref,), new=(ref,)), {"Task": {1: _row(1)}})
    assert _reasons(decision) == [("removed", "deleted")]
    assert _changes(decision) == [RemoveChange(entity="Task", id=1, reason="deleted", version=10)]


def test_new_is_checked_before_gone():
    ref = ObjectRef("Task", 1)
    decision = _decide(_job(ref, new=(ref,)), {"Task": {}})
    assert _reasons(decision) == [("skipped", "new")]
    assert _changes(decision) == []


def test_gone_then_autocommitted_then_no_access_then_synced():
    refs = [ObjectRef("Task", 1), ObjectRef("Task", 2), ObjectRef("Note", 3), ObjectRef("Task", 4)]
    rows = {
        "Task": {2: _row(2, autocommitted=True, readable=None), 4: _row(4)},
        "Note": {3: _row(3, readable=None)},
    }
    decision = _decide(_job(*refs), rows)
    assert _reasons(decision) == [
        ("removed", "gone"),
        ("skipped", "autocommitted"),
        ("removed", "no-access"),
        ("synced", None),
    ]


def test_synced_data_and_overlay_carry_readable_members_only():
    ref = ObjectRef("Task", 4)
    job = _job(
        ref, uncommitted=(UncommittedChange(ref=ref, changes={"status": "Done", "secret": "x"}),)
    )
    decision = _decide(job, {"Task": {4: _row(4)}})
    assert _changes(decision) == [
        UpsertChange(entity="Task", id=4, version=10, data={"title": "t"}),
        OverlayChange(entity="Task", id=4, changes={"status": "Done"}),
    ]


@pytest.mark.parametrize(
    ("entity", "reason"),
    [
        ("Nope", "unknown-entity"),
        ("Draft", "non-persistable-entity"),
        ("File", "file-entity"),
        ("Report", "not-in-offline-profile"),
    ],
)
def test_job_naming_an_unsyncable_entity_is_rejected(entity, reason):
    with pytest.raises(JobRejected) as rejected:
        job = _job(ObjectRef("Task", 1), ObjectRef(entity, 1))
        check_job_names(job, MODEL, job.targets())
    assert rejected.value.reason == f"{reason}: {entity}"
