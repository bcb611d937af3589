"""A job's answer is written as JSON text from the decision's codes; it must read back, on
the strict wire reader, as the ``SyncResult`` it stands for."""

from __future__ import annotations

from broker.models import ObjectOutcome, SyncResult
from broker.wire import decode
from worker.answers import answer_of, done, remembered
from worker.eligibility import DELETED, GONE, NEW, NO_ACCESS, SYNCED, Decision

TARGETS = [("Task", 1), ("Task", 2), ("Note", 3), ("Note", 4), ("Task", 5)]


def test_a_done_answer_reads_back_as_its_result_with_every_outcome():
    decision = Decision(TARGETS, bytearray([SYNCED, DELETED, GONE, NO_ACCESS, NEW]))
    answer = done("job-1", decision, ["b1", "b2"])

    assert decode(SyncResult, answer.body) == SyncResult(
        job_id="job-1",
        status="done",
        synced=1,
        removed=3,
        skipped=1,
        objects=(
            ObjectOutcome(entity="Task", id=1, outcome="synced"),
            ObjectOutcome(entity="Task", id=2, outcome="removed", reason="deleted"),
            ObjectOutcome(entity="Note", id=3, outcome="removed", reason="gone"),
            ObjectOutcome(entity="Note", id=4, outcome="removed", reason="no-access"),
            ObjectOutcome(entity="Task", id=5, outcome="skipped", reason="new"),
        ),
        batch_ids=("b1", "b2"),
    )
    assert (answer.synced, answer.removed, answer.skipped, answer.batches) == (1, 3, 1, 2)


def test_a_remembered_answer_is_the_same_answer():
    answer = done("job-1", Decision(TARGETS[:1], bytearray([SYNCED])), ["b1"])
    assert remembered(answer.body.decode()) == answer


def test_an_answer_of_a_model_keeps_its_json():
    result = SyncResult(job_id="job-2", status="rejected", reason="rate-limited")
    assert decode(SyncResult, answer_of(result).body) == result
