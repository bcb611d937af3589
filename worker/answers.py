"""A job's answer as the worker sends, counts and remembers it: a few counts, and the
``SyncResult`` JSON written once.

A bulk job's result lists up to 100,000 per-object outcomes; they are written as JSON
text straight from the decision's codes (``Decision.objects_json``), never as one model
per object. A test checks the bytes read back as the ``SyncResult`` they stand for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from broker.models import SyncResult
from worker.eligibility import Decision

__all__ = ["Answer", "answer_of", "done", "remembered"]

_NO_OBJECTS = b'"objects":[]'


@dataclass(frozen=True, slots=True)
class Answer:
    job_id: str
    status: str
    reason: str | None
    synced: int
    removed: int
    skipped: int
    batches: int
    # The SyncResult as JSON: the reply's body, and what is remembered for retries.
    body: bytes


def answer_of(result: SyncResult) -> Answer:
    """A result built as a model (a rejection, an ignored job)."""
    return Answer(
        result.job_id,
        result.status,
        result.reason,
        result.synced,
        result.removed,
        result.skipped,
        len(result.batch_ids),
        result.model_dump_json().encode(),
    )


def done(job_id: str, decision: Decision, batch_ids: Sequence[str]) -> Answer:
    """A job served: its decision's counts and outcomes, and the batches that carry it."""
    counts = (decision.synced, decision.removed, decision.skipped)
    head = (
        SyncResult(
            job_id=job_id,
            status="done",
            synced=counts[0],
            removed=counts[1],
            skipped=counts[2],
            batch_ids=tuple(batch_ids),
        )
        .model_dump_json()
        .encode()
    )
    # The outcomes go where the model wrote an empty list: job and batch ids cannot hold
    # this text (their pattern has no quotes), so it occurs once.
    before, after = head.split(_NO_OBJECTS, 1)
    body = before + b'"objects":' + decision.objects_json().encode() + after
    return Answer(job_id, "done", None, *counts, len(batch_ids), body)


def remembered(body: str) -> Answer:
    """An answer given before, as the worker remembered it (``sync.job_result``)."""
    data = json.loads(body)
    return Answer(
        data["job_id"],
        data["status"],
        data["reason"],
        data["synced"],
        data["removed"],
        data["skipped"],
        len(data["batch_ids"]),
        body.encode(),
    )
