"""Jobs a lax reader would accept are rejected by the real worker, with a reason a caller
and an operator can read; a forged job id never forges a log line."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pytest

from broker import Session, SyncClient
from broker.logs import TextFormatter
from tests.conftest import MakeDevice, dead_letters, insert, wait_for

pytestmark = pytest.mark.usefixtures("worker")

EVIL = "evil\n2026-01-01 INFO forged"


def _job(session: Session, job_id: str, note: int = 1, **overrides: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "schema_version": 1,
        "job_id": job_id,
        "session": session.model_dump(),
        "origin": "nanoflow",
        "objects": [{"entity": "Note", "id": note}],
    }
    job.update(overrides)
    return job


def _bad_body(case: str, session: Session, job_id: str, note: int) -> bytes:
    if case == "id-string":
        return json.dumps(
            _job(session, job_id, objects=[{"entity": "Note", "id": str(note)}])
        ).encode()
    if case == "id-true":
        return json.dumps(_job(session, job_id, objects=[{"entity": "Note", "id": True}])).encode()
    if case == "no-schema-version":
        job = _job(session, job_id, note)
        del job["schema_version"]
        return json.dumps(job).encode()
    if case == "duplicate-key":
        return json.dumps(_job(session, job_id, note)).encode()[:-1] + b', "origin": "event"}'
    # A non-finite value in an uncommitted change, as JavaScript's Infinity would print
    # as a literal, or as a number too large for a double.
    literal = {"nan": "NaN", "1e999": "1e999"}[case]
    changes = [{"ref": {"entity": "Note", "id": note}, "changes": {"text": 1}}]
    body = json.dumps(_job(session, job_id, note, uncommitted=changes)).encode()
    return body.replace(b'"text": 1', f'"text": {literal}'.encode())


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("id-string", "invalid-job: objects.0.id: Input should be a valid integer"),
        ("id-true", "invalid-job: objects.0.id: Input should be a valid integer"),
        ("no-schema-version", "unsupported-schema-version: None"),
        ("duplicate-key", "malformed-json: duplicate key origin"),
        ("nan", "malformed-json: NaN is not a JSON number"),
        ("1e999", "malformed-json: "),
    ],
)
async def test_job_a_lax_reader_would_accept_is_rejected_with_its_reason(
    client: SyncClient, make_device: MakeDevice, pg, amqp, case: str, reason: str
):
    device = await make_device(7, ["Admin"])
    note = await insert(pg, "t_note", text="kept")
    job_id = uuid.uuid4().hex

    result = await client.publish_raw(
        _bad_body(case, device.session, job_id, note), job_id=job_id, timeout=10
    )

    assert (result.job_id, result.status) == (job_id, "rejected"), result
    assert result.reason is not None and result.reason.startswith(reason), result.reason
    assert (await dead_letters(amqp)).get(job_id) == result.reason
    # Nothing reached the device: no half-read job changed what the app sees.
    assert await device.store.get("Note", note) is None


def _lines(records: list[logging.LogRecord]) -> list[str]:
    formatter = TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    return [formatter.format(record) for record in records]


async def _logged(caplog: pytest.LogCaptureFixture, message: str) -> list[str]:
    """The log lines so far, once the worker has logged ``message`` (it logs after it
    answered, so the result can come first)."""

    async def seen() -> bool:
        return any(record.getMessage() == message for record in caplog.records)

    await wait_for(seen, timeout=5)
    return _lines(caplog.records)


def _assert_single_lines(lines: list[str]) -> None:
    for line in lines:
        assert "\n" not in line and "\r" not in line, line
        assert "forged" not in line or "\\n2026-01-01 INFO forged" in line, line


async def test_forged_job_id_is_rejected_and_forges_no_log_line(
    client: SyncClient, amqp, caplog: pytest.LogCaptureFixture
):
    session = Session(user_id=7, device_id="never-registered")
    body = json.dumps(_job(session, EVIL)).encode()
    caplog.clear()

    result = await client.publish_raw(body, job_id=EVIL, timeout=10)

    assert result.status == "rejected", result
    assert result.reason is not None and result.reason.startswith("invalid-job: job_id: ")
    assert "\n" not in result.reason
    # Neither the result nor the dead letter repeats the forged id.
    assert result.job_id == "invalid-job-id"
    assert (await dead_letters(amqp)).get("invalid-job-id") == result.reason
    lines = await _logged(caplog, "job rejected")
    assert any("invalid-job-id" in line for line in lines), lines
    _assert_single_lines(lines)


async def test_forged_message_id_on_a_valid_body_forges_no_log_line(
    client: SyncClient, amqp, caplog: pytest.LogCaptureFixture
):
    job_id = uuid.uuid4().hex
    body = json.dumps(_job(Session(user_id=7, device_id="never-registered"), job_id)).encode()
    caplog.clear()

    result = await client.publish_raw(body, job_id=EVIL, timeout=10)

    # The body is readable: the job is answered under its own id.
    assert (result.job_id, result.status, result.reason) == (job_id, "rejected", "unknown-device")
    lines = await _logged(caplog, "job rejected")
    assert any(job_id in line for line in lines), lines
    _assert_single_lines(lines)
