"""The batch encoder wraps the changes' JSON texts as they are: the batch must be exactly
the model's JSON, and carries its place among its job's batches."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from broker.models import ChangeBatch, OverlayChange, RemoveChange, ResyncChange, UpsertChange
from broker.wire import decode
from worker.publisher import BatchPublisher, encode_batch


def test_encoded_batch_is_the_models_json_and_its_id_follows_the_content():
    changes = (
        ResyncChange(reason="maxlen", since=datetime(2026, 11, 26, tzinfo=UTC)),
        UpsertChange(
            entity="WorkOrder",
            id=1,
            version=7,
            data={"title": 'quote " and ünïcode', "amount": Decimal("1.50"), "due": None},
        ),
        RemoveChange(entity="WorkOrder", id=2, reason="gone"),
        OverlayChange(entity="WorkOrder", id=1, changes={"status": "Done"}),
    )
    texts = [change.model_dump_json() for change in changes]
    encoded = encode_batch("job-1", "dev-1", texts, position=2, total=3)
    expected = ChangeBatch(
        batch_id=encoded.batch_id,
        job_id="job-1",
        device_id="dev-1",
        position=2,
        total=3,
        changes=changes,
    )
    assert encoded.body == expected.model_dump_json().encode()
    read = decode(ChangeBatch, encoded.body)
    assert (read.batch_id, read.position, read.total) == (encoded.batch_id, 2, 3)

    # The id follows the job and the content, not the place: a job run again with the
    # same content makes batches the device skips as applied.
    assert encode_batch("job-1", "dev-1", texts, position=1, total=1).batch_id == encoded.batch_id
    other = encode_batch("job-1", "dev-1", texts[1:], position=2, total=3)
    assert other.batch_id != encoded.batch_id
    assert encode_batch("job 2", "dev-1", texts, position=2, total=3).batch_id != encoded.batch_id


def test_a_jobs_batches_are_numbered_from_one_to_their_total():
    publisher = BatchPublisher(None, None, batch_size=2, timeout=1, window=1)  # type: ignore[arg-type]
    texts = [
        UpsertChange(entity="Task", id=n, version=1, data={}).model_dump_json()
        for n in (1, 2, 3, 4, 5)
    ]
    batches = [
        decode(ChangeBatch, batch.body) for batch in publisher.encode("job-1", "dev-1", texts)
    ]
    assert [(b.position, b.total, len(b.changes)) for b in batches] == [
        (1, 3, 2),
        (2, 3, 2),
        (3, 3, 1),
    ]
    assert publisher.encode("job-1", "dev-1", []) == []


@pytest.mark.parametrize(("position", "total"), [(0, 1), (4, 3), (1, 0)])
def test_a_batch_placed_outside_its_jobs_batches_is_refused(position: int, total: int):
    body = encode_batch("job-1", "dev-1", [], position=position, total=total).body
    with pytest.raises(ValueError, match="invalid-batch: "):
        decode(ChangeBatch, body)
