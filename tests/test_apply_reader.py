"""The agent's batch reader (``broker.wire.decode_batch``) takes exactly the batches the
strict reader (``decode``) takes, with the same values, and refuses the others with the
same reason; the worker's encoding is read without the strict reader."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from broker import wire
from broker.models import ChangeBatch, OverlayChange, RemoveChange, ResyncChange, UpsertChange
from broker.wire import WireError, as_read_batch, decode, decode_batch
from worker.publisher import encode_batch


def _changes() -> tuple[Any, ...]:
    return (
        UpsertChange(
            entity="WorkOrder",
            id=1,
            version=3,
            data={
                "title": 'ünïcödé "quoted" \\ [x] {y}\n\t\u0001',
                "amount": "480.00",
                "done": True,
                "count": -7,
                "ratio": 0.1,
                "big": 12345678901234567890123,
                "note": None,
            },
        ),
        UpsertChange(entity="System.User", id=2, version=0, data={}),
        RemoveChange(entity="WorkOrder", id=3, reason="deleted", version=9),
        RemoveChange(entity="WorkOrder", id=4, reason="gone"),
        OverlayChange(entity="WorkOrder", id=1, changes={"status": None, "title": "draft"}),
    )


def _batch(*changes: Any) -> ChangeBatch:
    return ChangeBatch(
        batch_id="b-1", job_id="job-1", device_id="dev-1", position=1, total=1, changes=changes
    )


def _plain(batch: wire.ReadBatch) -> list[Any]:
    """The batch's values; a missing remove version (UNSET) reads as ``None``."""
    return [
        batch.batch_id,
        batch.job_id,
        batch.device_id,
        batch.position,
        batch.total,
        [
            {
                "type": type(change).__name__,
                **{
                    field: None if value is msgspec.UNSET else value
                    for field, value in msgspec.structs.asdict(change).items()
                },
            }
            for change in batch.changes
        ],
    ]


def _same(body: bytes) -> None:
    """Both readers agree on ``body``: the same refusal reason, or the same batch."""
    try:
        strict = as_read_batch(decode(ChangeBatch, body))
    except WireError as error:
        with pytest.raises(WireError) as refused:
            decode_batch(body)
        assert refused.value.reason == error.reason
    else:
        assert _plain(decode_batch(body)) == _plain(strict)


def _without_the_strict_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(model: object, body: bytes) -> None:
        raise AssertionError("the strict reader was needed")

    monkeypatch.setattr(wire, "decode", refuse)


def test_the_workers_encoding_is_read_without_the_strict_reader(monkeypatch):
    texts = [change.model_dump_json() for change in _changes()]
    body = encode_batch("job-1", "dev-1", texts, position=2, total=3).body
    expected = as_read_batch(decode(ChangeBatch, body))
    _without_the_strict_reader(monkeypatch)
    assert decode_batch(body) == expected


def test_a_resync_batch_as_the_worker_encodes_it_is_read_without_the_strict_reader(
    monkeypatch,
):
    since = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    body = _batch(ResyncChange(reason="maxlen", since=since)).model_dump_json().encode()
    _without_the_strict_reader(monkeypatch)
    (change,) = decode_batch(body).changes
    assert isinstance(change, wire.ReadResync)
    assert (change.reason, change.since) == ("maxlen", since)


def _canonical() -> bytes:
    return _batch(*_changes()).model_dump_json().encode()


ODD_BUT_VALID = {
    "spaces": lambda body: json.dumps(json.loads(body), indent=2).encode(),
    "escaped": lambda body: body.replace(b'"amount"', b'"\\u0061mount"'),
    "exponent": lambda body: body.replace(b'"ratio":0.1', b'"ratio":1e+20'),
    "nested": lambda body: body.replace(b'"note":null', b'"note":[1,{"a":[2]}]'),
    "version-missing": lambda body: body.replace(b',"version":null', b""),
    "naive-since": lambda body: (
        _batch(ResyncChange(reason="expired", since=datetime(2024, 5, 1, 12)))
        .model_dump_json()
        .encode()
    ),
}


@pytest.mark.parametrize("change", list(ODD_BUT_VALID.values()), ids=list(ODD_BUT_VALID))
def test_other_spellings_of_a_valid_batch_read_the_same(change):
    body = change(_canonical())
    decode(ChangeBatch, body)  # valid
    _same(body)


REFUSED = {
    "duplicate-key-in-data": (b'"done":true', b'"done":true,"done":false'),
    "duplicate-key-in-change": (b'"id":2,', b'"id":2,"id":5,'),
    "duplicate-key-in-envelope": (b'"job_id":"job-1"', b'"job_id":"job-1","job_id":"job-2"'),
    "nan": (b'"ratio":0.1', b'"ratio":NaN'),
    "infinity": (b'"ratio":0.1', b'"ratio":-Infinity'),
    "too-large": (b'"ratio":0.1', b'"ratio":1e999'),
    "not-utf8": (b"draft", b"dr\xffft"),
    "lone-surrogate": (b"draft", b"dr\\ud800ft"),
    "id-string": (b'"id":2,', b'"id":"2",'),
    "id-true": (b'"id":2,', b'"id":true,'),
    "id-float": (b'"id":2,', b'"id":2.0,'),
    "id-zero": (b'"id":2,', b'"id":0,'),
    "id-too-large": (b'"id":2,', b'"id":9223372036854775808,'),
    "version-negative": (b'"version":0', b'"version":-1'),
    "entity-newline": (b'"System.User"', b'"System.User\\n"'),
    "entity-hostile": (b'"System.User"', b'"x\\"; DROP TABLE objects; --"'),
    "device-newline": (b'"dev-1"', b'"dev-1\\n"'),
    "unknown-op": (b'"op":"remove"', b'"op":"erase"'),
    "unknown-field": (b'"reason":"gone"', b'"reason":"gone","why":1'),
    "bad-reason": (b'"reason":"gone"', b'"reason":"lost"'),
    "no-schema-version": (b'"schema_version":1,', b""),
    "schema-version-string": (b'"schema_version":1', b'"schema_version":"1"'),
    "schema-version-2": (b'"schema_version":1', b'"schema_version":2'),
    "changes-null": (b'"changes":[', b'"changes":null,"x":['),
    "position-zero": (b'"position":1', b'"position":0'),
    "position-past-total": (b'"position":1', b'"position":2'),
    "position-string": (b'"position":1', b'"position":"1"'),
    "total-missing": (b'"total":1,', b""),
    "too-deep": (b'"note":null', b'"note":' + b"[" * 250 + b"]" * 250),
    "trailing": (b"}]}", b"}]} x"),
}


@pytest.mark.parametrize(("old", "new"), list(REFUSED.values()), ids=list(REFUSED))
def test_a_batch_the_strict_reader_refuses_is_refused_with_its_reason(old: bytes, new: bytes):
    body = _canonical()
    assert old in body
    bad = body.replace(old, new, 1)
    with pytest.raises(WireError):
        decode(ChangeBatch, bad)
    _same(bad)


def test_an_empty_batch_reads_the_same():
    _same(_batch().model_dump_json().encode())
