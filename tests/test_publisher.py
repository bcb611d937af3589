"""The batch encoder writes a change batch's JSON once: it must be exactly the model's."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from broker.models import ChangeBatch, OverlayChange, RemoveChange, ResyncChange, UpsertChange
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
    encoded = encode_batch("job-1", "dev-1", changes)
    expected = ChangeBatch(
        batch_id=encoded.batch_id, job_id="job-1", device_id="dev-1", changes=changes
    )
    assert encoded.body == expected.model_dump_json().encode()
    assert ChangeBatch.model_validate_json(encoded.body).batch_id == encoded.batch_id

    assert encode_batch("job-1", "dev-1", changes).batch_id == encoded.batch_id
    assert encode_batch("job-1", "dev-1", changes[1:]).batch_id != encoded.batch_id
    assert encode_batch("job 2", "dev-1", changes).batch_id != encoded.batch_id
