"""The batch encoder wraps the changes' JSON texts as they are: the batch must be exactly
the model's JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from broker.models import ChangeBatch, OverlayChange, RemoveChange, ResyncChange, UpsertChange
from broker.wire import decode
from worker.publisher import encode_batch


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
    encoded = encode_batch("job-1", "dev-1", texts)
    expected = ChangeBatch(
        batch_id=encoded.batch_id, job_id="job-1", device_id="dev-1", changes=changes
    )
    assert encoded.body == expected.model_dump_json().encode()
    assert decode(ChangeBatch, encoded.body).batch_id == encoded.batch_id

    assert encode_batch("job-1", "dev-1", texts).batch_id == encoded.batch_id
    assert encode_batch("job-1", "dev-1", texts[1:]).batch_id != encoded.batch_id
    assert encode_batch("job 2", "dev-1", texts).batch_id != encoded.batch_id
