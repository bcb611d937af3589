"""Strict wire decoding and safe log lines: what a sender that is not Python gets back."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from broker import wire
from broker.logs import TextFormatter, configure_logging
from broker.models import ChangeBatch, SyncJob, SyncProgress, SyncResult
from broker.wire import WireError, decode, json_schema
from tests.conftest import ROOT

JOB_ID = "job-1"


def _job(**overrides: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "schema_version": 1,
        "job_id": JOB_ID,
        "session": {"user_id": 7, "device_id": "dev-1"},
        "origin": "nanoflow",
        "objects": [{"entity": "Task", "id": 1}],
    }
    job.update(overrides)
    return job


def _batch(**data: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "batch_id": "b-1",
        "job_id": JOB_ID,
        "device_id": "dev-1",
        "position": 1,
        "total": 2,
        "changes": [
            {"op": "upsert", "entity": "Task", "id": 1, "version": 3, "data": data or {"x": 1}}
        ],
    }


def _result(**overrides: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "schema_version": 1,
        "job_id": JOB_ID,
        "status": "done",
        "synced": 1,
        "objects": [{"entity": "Task", "id": 1, "outcome": "synced"}],
    }
    result.update(overrides)
    return result


def _body(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def _reason(model: type[Any], body: bytes) -> str:
    with pytest.raises(WireError) as refused:
        decode(model, body)
    assert str(refused.value) == refused.value.reason
    return refused.value.reason


# Jobs.


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        (_job(objects=[{"entity": "Task", "id": "5"}]), "invalid-job: objects.0.id: "),
        (_job(objects=[{"entity": "Task", "id": True}]), "invalid-job: objects.0.id: "),
        (_job(objects=[{"entity": "Task", "id": 1.0}]), "invalid-job: objects.0.id: "),
        (_job(objects=[{"entity": "Task", "id": 2**63}]), "invalid-job: objects.0.id: "),
        (_job(lists=[{"entity": "Task", "ids": [1, "2"]}]), "invalid-job: lists.0.ids.1: "),
        (_job(session={"user_id": "7", "device_id": "dev-1"}), "invalid-job: session.user_id: "),
        (_job(session={"user_id": True, "device_id": "dev-1"}), "invalid-job: session.user_id: "),
    ],
    ids=[
        "id-string",
        "id-true",
        "id-float",
        "id-2**63",
        "list-id-string",
        "user-string",
        "user-true",
    ],
)
def test_ids_must_be_json_integers_in_range(job: dict[str, Any], reason: str):
    assert _reason(SyncJob, _body(job)).startswith(reason)


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        (_job(objects=[{"entity": "Task"}]), "invalid-job: objects.0.id: Field required"),
        (
            _job(objects=[{"entity": "Task", "id": 1, "x": 2}]),
            "invalid-job: objects.0.x: Extra inputs are not permitted",
        ),
        (_job(lists=[{"ids": [1]}]), "invalid-job: lists.0.entity: Field required"),
        (
            _job(deleted=[{"entity": "Task", "id": 1, "version": 2}]),
            "invalid-job: deleted.0.version: Extra inputs are not permitted",
        ),
    ],
)
def test_a_part_missing_a_field_or_with_an_unknown_one_gets_its_reason(
    job: dict[str, Any], reason: str
):
    # Parts built positionally in Python (ObjectRef("Task", 1)) still read any keys.
    assert _reason(SyncJob, _body(job)) == reason


def test_id_out_of_range_says_the_bound():
    body = _body(_job(objects=[{"entity": "Task", "id": 2**63}]))
    assert _reason(SyncJob, body) == (
        "invalid-job: objects.0.id: Input should be less than or equal to 9223372036854775807"
    )


def test_missing_schema_version_is_refused():
    job = _job()
    del job["schema_version"]
    assert _reason(SyncJob, _body(job)) == "unsupported-schema-version: None"


@pytest.mark.parametrize("version", [2, "1", 1.0, True, None])
def test_schema_version_other_than_integer_1_is_refused(version: object):
    assert _reason(SyncJob, _body(_job(schema_version=version))).startswith(
        "unsupported-schema-version: "
    )


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"schema_version": 1, "schema_version": 1}', "schema_version"),
        (
            _body(_job())[:-1] + b', "session": {"user_id": 7, "user_id": 8, "device_id": "d"}}',
            "user_id",
        ),
        (_body(_job()).replace(b'"id": 1}', b'"id": 1, "id": 2}'), "id"),
        # Spelled differently, the same key once decoded.
        (_body(_job())[:-1] + b', "origin": "event"}', "origin"),
        (_body(_job())[:-1] + b', "\\u006fbjects": []}', "objects"),
    ],
    ids=["top-level", "nested", "in-a-list", "repeated-last", "escaped"],
)
def test_duplicate_keys_anywhere_are_refused(body: bytes, key: str):
    assert _reason(SyncJob, body) == f"malformed-json: duplicate key {key}"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(constant: str):
    ref = {"entity": "Task", "id": 1}
    body = _body(_job(uncommitted=[{"ref": ref, "changes": {"amount": 1}}]))
    body = body.replace(b'"amount": 1', f'"amount": {constant}'.encode())
    assert _reason(SyncJob, body).startswith("malformed-json: ")


@pytest.mark.parametrize("number", ["1e999", "-1e999"])
def test_numbers_too_large_for_a_double_are_refused(number: str):
    """``1e999`` is Infinity by another spelling: Python reads it as ``inf``, other
    parsers refuse it; the job must not pass as if it were a finite number."""
    ref = {"entity": "Task", "id": 1}
    body = _body(_job(uncommitted=[{"ref": ref, "changes": {"amount": 1}}]))
    body = body.replace(b'"amount": 1', f'"amount": {number}'.encode())
    assert _reason(SyncJob, body).startswith("malformed-json: ")


@pytest.mark.parametrize(
    "body",
    [b'{"schema_version": 1, "job_id": "\xff"}', b"\xff\xfe\x00", _body(_job()) + b"\x80"],
    ids=["in-a-string", "leading", "trailing"],
)
def test_bytes_that_are_not_utf8_are_refused(body: bytes):
    assert _reason(SyncJob, body).startswith("malformed-json: ")


@pytest.mark.parametrize(
    "job_id", ["evil\n2026-01-01 INFO forged", "with space", "a" * 65, "", "-leading-dash"]
)
def test_job_id_must_be_a_plain_token(job_id: str):
    reason = _reason(SyncJob, _body(_job(job_id=job_id)))
    assert reason.startswith("invalid-job: job_id: "), reason
    assert "\n" not in reason


def test_job_id_of_64_characters_is_accepted():
    assert decode(SyncJob, _body(_job(job_id="a" * 64))).job_id == "a" * 64


def test_unknown_key_is_quoted_and_bounded_in_the_reason():
    key = "evil\n2026-01-01 INFO forged " + "k" * 200
    reason = _reason(SyncJob, _body(_job(**{key: 1})))
    assert reason.startswith("invalid-job: "), reason
    assert reason.endswith(": Extra inputs are not permitted")
    assert "\n" not in reason
    assert len(reason) < 150, reason


def test_reason_for_a_malformed_body_says_where():
    assert _reason(SyncJob, b'{"schema_version": 1,\n "job_id": }') == (
        "malformed-json: Expecting value at line 2 column 12"
    )


@pytest.mark.parametrize("body", [b"[1, 2]", b"1", b'"job"', b"null"])
def test_body_that_is_not_an_object_is_refused(body: bytes):
    assert _reason(SyncJob, body) == "invalid-job: expected a JSON object"


def test_valid_job_decodes():
    job = decode(SyncJob, _body(_job(lists=[{"entity": "Task", "ids": [2, 3]}])))
    assert job.job_id == JOB_ID
    assert (job.session.user_id, job.session.device_id) == (7, "dev-1")
    assert job.targets() == [("Task", 1), ("Task", 2), ("Task", 3)]


def test_job_a_python_client_builds_decodes_to_itself():
    job = SyncJob.model_validate(_job())
    assert decode(SyncJob, job.model_dump_json().encode()) == job


# Batches and results.


def test_batch_with_nan_in_data_is_refused():
    body = _body(_batch(x=1)).replace(b'"x": 1', b'"x": NaN')
    assert _reason(ChangeBatch, body) == "malformed-json: NaN is not a JSON number"


def test_batch_with_number_too_large_for_a_double_is_refused():
    body = _body(_batch(x=1)).replace(b'"x": 1', b'"x": 1e999')
    assert _reason(ChangeBatch, body).startswith("malformed-json: ")


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        (b'"id": 1', b'"id": "1"', "invalid-batch: changes.0.upsert.id: "),
        (b'"version": 3', b'"version": "3"', "invalid-batch: changes.0.upsert.version: "),
        (b'"version": 3', b'"version": true', "invalid-batch: changes.0.upsert.version: "),
        (b'"schema_version": 1', b'"schema_version": "1"', "unsupported-schema-version: "),
        (b'"x": 1', b'"x": 1, "x": 2', "malformed-json: duplicate key x"),
        (b'"position": 1', b'"position": "1"', "invalid-batch: position: "),
        (b'"position": 1', b'"position": 0', "invalid-batch: position: "),
        (b'"position": 1', b'"position": 3', "invalid-batch: position 3 is past the total 2"),
        (b'"total": 2, ', b"", "invalid-batch: total: Field required"),
    ],
    ids=[
        "id-string",
        "version-string",
        "version-true",
        "schema-version-string",
        "duplicate",
        "position-string",
        "position-zero",
        "position-past-total",
        "total-missing",
    ],
)
def test_batch_is_read_strictly(old: bytes, new: bytes, reason: str):
    assert _reason(ChangeBatch, _body(_batch()).replace(old, new)).startswith(reason)


def test_valid_batch_decodes():
    batch = decode(ChangeBatch, _body(_batch(title="a", amount=1.5)))
    assert (batch.batch_id, batch.position, batch.total) == ("b-1", 1, 2)
    assert batch.changes[0].model_dump() == {
        "op": "upsert",
        "entity": "Task",
        "id": 1,
        "version": 3,
        "data": {"title": "a", "amount": 1.5},
    }


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (_result(objects=[{"entity": "Task", "id": "1", "outcome": "synced"}]), "invalid-result: "),
        (_result(synced="1"), "invalid-result: synced: "),
        (_result(synced=True), "invalid-result: synced: "),
        (_result(schema_version=None), "unsupported-schema-version: null"),
    ],
    ids=["object-id-string", "count-string", "count-true", "no-version"],
)
def test_result_is_read_strictly(result: dict[str, Any], reason: str):
    assert _reason(SyncResult, _body(result)).startswith(reason)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        (b'"synced": 1', b'"synced": NaN', "malformed-json: NaN is not a JSON number"),
        (b'"synced": 1', b'"synced": 1, "synced": 2', "malformed-json: duplicate key synced"),
    ],
    ids=["nan", "duplicate"],
)
def test_result_refuses_what_parsers_disagree_on(old: bytes, new: bytes, reason: str):
    assert _reason(SyncResult, _body(_result()).replace(old, new)) == reason


def _progress(**overrides: Any) -> dict[str, Any]:
    progress: dict[str, Any] = {"schema_version": 1, "job_id": JOB_ID, "published": 2, "total": 5}
    progress.update(overrides)
    return progress


def test_valid_progress_decodes():
    progress = decode(SyncProgress, _body(_progress()))
    assert (progress.job_id, progress.published, progress.total) == (JOB_ID, 2, 5)


@pytest.mark.parametrize(
    ("progress", "reason"),
    [
        (_progress(published="2"), "invalid-progress: published: "),
        (_progress(published=0), "invalid-progress: published: "),
        (_progress(published=6), "invalid-progress: published 6 is past the total 5"),
        (_progress(extra=1), "invalid-progress: extra: Extra inputs are not permitted"),
        (_progress(schema_version=2), "unsupported-schema-version: 2"),
    ],
    ids=["published-string", "published-zero", "past-total", "extra", "version"],
)
def test_progress_is_read_strictly(progress: dict[str, Any], reason: str):
    assert _reason(SyncProgress, _body(progress)).startswith(reason)


def test_valid_result_decodes():
    result = decode(SyncResult, _body(_result()))
    assert (result.status, result.synced, result.objects[0].outcome) == ("done", 1, "synced")


# JSON Schema.


def test_job_schema_requires_the_version_and_types_ids_as_integers():
    schema = json_schema("job")
    assert "schema_version" in schema["required"]
    assert {"job_id", "session", "origin"} <= set(schema["required"])
    assert schema["$defs"]["ObjectRef"]["properties"]["id"]["type"] == "integer"
    assert schema["$defs"]["ObjectList"]["properties"]["ids"]["items"]["type"] == "integer"
    assert schema["$defs"]["Session"]["properties"]["user_id"]["type"] == "integer"


@pytest.mark.parametrize("name", ["job", "result", "progress", "batch"])
def test_every_message_schema_requires_the_version(name: str):
    assert json_schema(name)["required"][0] == "schema_version"


def test_syncctl_schema_job_prints_the_schema():
    printed = subprocess.run(
        [sys.executable, "-m", "syncctl", "schema", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == json_schema("job")


# Log lines.

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def _format(formatter: logging.Formatter, **fields: object) -> str:
    record = logging.LogRecord(
        "worker.consumer", logging.INFO, __file__, 1, "job rejected", (), None
    )
    record.__dict__.update(fields)
    return formatter.format(record)


def test_text_line_with_a_forged_value_stays_one_line():
    line = _format(TextFormatter(FORMAT), job_id="a\nforged line", reason="x\r\n2026 INFO y")
    assert "\n" not in line and "\r" not in line
    assert line.endswith(' job_id="a\\nforged line" reason="x\\r\\n2026 INFO y"'), line


def test_text_line_shows_plain_tokens_and_numbers_as_they_are():
    line = _format(TextFormatter(FORMAT), job_id="job-1", synced=3, ms=12.34, device_id=None)
    assert line.endswith(
        " INFO worker.consumer job rejected job_id=job-1 synced=3 ms=12.3 device_id=None"
    ), line


@pytest.mark.parametrize("value", ["x" * 100_000, "\n" * 100_000, "\x00" * 100_000])
def test_text_line_with_a_long_value_is_bounded(value: str):
    line = _format(TextFormatter(FORMAT), job_id=value)
    assert "\n" not in line
    assert len(line) < 4_000, len(line)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("aio_pika", "aiormq")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)


@pytest.mark.usefixtures("restore_logging")
def test_json_format_is_one_object_per_record_with_the_fields_as_keys(
    capsys: pytest.CaptureFixture[str],
):
    configure_logging(log_format="json")
    log = logging.getLogger("worker.consumer")
    log.info("job rejected", extra={"job_id": "a\nforged line", "reason": "invalid-job: x"})
    log.info("job done", extra={"job_id": "job-2", "synced": 3})
    lines = capsys.readouterr().err.splitlines()

    records = [json.loads(line) for line in lines]
    assert len(records) == 2, lines
    assert {key: records[0][key] for key in ("level", "logger", "message", "job_id", "reason")} == {
        "level": "INFO",
        "logger": "worker.consumer",
        "message": "job rejected",
        "job_id": "a\nforged line",
        "reason": "invalid-job: x",
    }
    assert (records[1]["message"], records[1]["job_id"], records[1]["synced"]) == (
        "job done",
        "job-2",
        3,
    )
    assert "time" in records[0]


@pytest.mark.usefixtures("restore_logging")
def test_text_format_from_configure_logging_is_one_line_per_record(
    capsys: pytest.CaptureFixture[str],
):
    configure_logging(log_format="text")
    logging.getLogger("worker.consumer").info("job rejected", extra={"job_id": "a\nforged"})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith('job rejected job_id="a\\nforged"'), lines


def test_formatter_writes_through_a_handler_unchanged():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("tests.wire.handler")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("batch dropped", extra={"message_id": "m\n1", "reason": "malformed-json: x"})
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert stream.getvalue() == (
        'WARNING batch dropped message_id="m\\n1" reason="malformed-json: x"\n'
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1,"a":2}',
        b'{"a":NaN}',
        b'{"a":1e999}',
        b'\xef\xbb\xbf{"a":1}',
        b'{"a":"\xff"}',
        b'{"a":123456789012345678901234567890}',
        b'{ "a" : 1 }',
        b'{"a":1.50}',
    ],
)
def test_the_fast_reading_of_compact_json_agrees_with_the_careful_one(body: bytes):
    """What msgspec reads and writes back to the same bytes is taken without the stdlib
    parser; anything else gets that parser's answer or refusal."""
    try:
        careful: object = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=wire._unique_keys,
            parse_constant=wire._no_constants,
            parse_float=wire._finite,
        )
    except (ValueError, wire.WireError):
        with pytest.raises(wire.WireError):
            wire._strict_json(body)
    else:
        assert wire._strict_json(body) == careful
