"""Progress of large syncs (SPEC §13): the caller follows the batches published against
the job's total, the device reads how much of the job it has applied."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pty
import sys
import termios
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
import pytest

from broker import ObjectList, Session, SyncClient, SyncProgress
from broker.client import DIRECT_REPLY_TO, PROGRESS_HEADER, PROGRESS_TYPE, RESULT_TYPE
from broker.connection import amqp_user, connect, open_channel
from broker.publishing import json_message, publish_confirmed
from broker.topology import JOBS_EXCHANGE
from device_agent import JobProgress
from tests.conftest import ROOT, Device, MakeDevice, Services, start_agent
from worker.progress import STEPS

pytestmark = pytest.mark.usefixtures("worker")

# The test worker cuts batches of 50 changes: 400 batches, 7 confirm windows.
BULK = 20_000


async def _tasks(pg: asyncpg.Connection, count: int) -> list[int]:
    rows = await pg.fetch(
        "INSERT INTO t_task (title) SELECT 'task ' || g FROM generate_series(1, $1) g RETURNING id",
        count,
    )
    return [row["id"] for row in rows]


async def _poll_progress(device: Device, job_id: str, seen: list[JobProgress]) -> None:
    """Read the job's progress off the device file until it is complete."""
    while True:
        progress = await device.store.progress(job_id)
        if progress is not None and (not seen or seen[-1] != progress):
            seen.append(progress)
        if progress is not None and progress.applied == progress.total:
            return
        await asyncio.sleep(0.005)


def _rising(values: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


async def test_a_large_job_reports_rising_progress_to_the_caller_and_on_the_device(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    # The agent starts once the batches wait in the queue, so the device is read while
    # it works through them.
    device = await make_device(7, ["Admin"], run_agent=False)
    ids = await _tasks(pg, BULK)
    reports: list[SyncProgress] = []
    job_id = client.new_job_id()
    result = await client.synchronize_to_device(
        device.session,
        lists=[ObjectList("Task", ids)],
        timeout=60,
        job_id=job_id,
        on_progress=reports.append,
    )
    assert result.status == "done" and result.synced == BULK
    total = len(result.batch_ids)
    assert total == BULK // 50

    published = [report.published for report in reports]
    assert _rising(published), published
    assert published[-1] == total
    assert {report.total for report in reports} == {total}
    assert {report.job_id for report in reports} == {job_id}
    # Bounded: a report every 1/STEPS of the batches, not one per batch.
    assert 2 <= len(reports) <= STEPS, published

    seen: list[JobProgress] = []
    await start_agent(device)
    await asyncio.wait_for(_poll_progress(device, job_id, seen), timeout=60)
    assert _rising([progress.applied for progress in seen]), seen
    assert {progress.total for progress in seen} == {total}
    assert seen[-1] == JobProgress(applied=total, total=total)
    assert len(seen) >= 2, "the device was never read while it applied the job"
    assert len(await device.store.ids("Task")) == BULK


@dataclass(frozen=True)
class Reply:
    type: str | None
    body: dict[str, Any]


@asynccontextmanager
async def _caller(services: Services) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await connect(services.amqp_url, "test-progress-caller")
    try:
        yield await open_channel(connection)
    finally:
        await connection.close()


async def _replies(
    services: Services, session: Session, ids: list[int], *, ask: bool
) -> list[Reply]:
    """Every reply a job gets, as a caller that reads raw AMQP sees them, up to its result."""
    job_id = uuid.uuid4().hex
    body = {
        "schema_version": 1,
        "job_id": job_id,
        "session": session.model_dump(),
        "origin": "nanoflow",
        "lists": [{"entity": "Task", "ids": ids}],
    }
    replies: list[Reply] = []
    done = asyncio.get_running_loop().create_future()

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert message.correlation_id == job_id
        replies.append(Reply(message.type, json.loads(message.body)))
        if message.type == RESULT_TYPE and not done.done():
            done.set_result(None)

    async with _caller(services) as channel:
        queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await queue.consume(on_reply, no_ack=True)
        message = json_message(
            json.dumps(body).encode(),
            message_id=job_id,
            correlation_id=job_id,
            reply_to=DIRECT_REPLY_TO,
            user_id=amqp_user(services.amqp_url),
            headers={PROGRESS_HEADER: True} if ask else None,
        )
        jobs = await channel.get_exchange(JOBS_EXCHANGE.name)
        await publish_confirmed(jobs, [message], routing_key="", timeout=10, window=1)
        await asyncio.wait_for(done, timeout=30)
        # Anything sent after the result would come in behind it.
        await asyncio.sleep(0.2)
    return replies


async def test_progress_comes_before_the_result_and_only_when_asked(
    services: Services, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(7, ["Admin"])
    ids = await _tasks(pg, 2_000)

    asked = await _replies(services, device.session, ids, ask=True)
    assert [reply.type for reply in asked[:-1]] == [PROGRESS_TYPE] * (len(asked) - 1)
    result = asked[-1]
    assert result.type == RESULT_TYPE and result.body["status"] == "done"
    assert len(asked) >= 2
    assert asked[-2].body["published"] == asked[-2].body["total"] == len(result.body["batch_ids"])

    not_asked = await _replies(services, device.session, ids, ask=False)
    assert [reply.type for reply in not_asked] == [RESULT_TYPE]


async def test_a_rejected_job_sends_no_progress(
    services: Services, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(7, ["Admin"])
    ids = await _tasks(pg, 500)
    # The session's user does not own the device: rejected once the device is read.
    stranger = Session(user_id=8, device_id=device.device_id)
    replies = await _replies(services, stranger, ids, ask=True)
    assert [reply.type for reply in replies] == [RESULT_TYPE]
    assert replies[0].body["status"] == "rejected"
    assert replies[0].body["reason"] == "device-not-owned"


async def test_a_job_with_nothing_to_send_reports_no_progress(
    client: SyncClient, make_device: MakeDevice
):
    device = await make_device(7, ["Admin"])
    reports: list[SyncProgress] = []
    result = await client.synchronize_to_device(
        device.session, lists=[ObjectList("Task", [])], on_progress=reports.append
    )
    assert result.status == "done" and result.batch_ids == ()
    assert reports == []


async def test_progress_needs_a_caller_that_waits(client: SyncClient, make_device: MakeDevice):
    device = await make_device(7, ["Admin"], run_agent=False)
    with pytest.raises(ValueError, match="on_progress needs wait=True"):
        await client.synchronize_to_device(  # type: ignore[call-overload]
            device.session, lists=[], wait=False, on_progress=print
        )


async def _syncctl(services: Services, *args: str, stderr: int) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncctl",
        *args,
        env={**os.environ, "SYNC_AMQP_URL": services.amqp_url},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode()


def _drained(terminal: int) -> str:
    """What was written to a terminal whose other side is closed."""
    chunks = []
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # EIO: nothing more to read
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


async def test_syncctl_sync_draws_a_bar_on_a_terminal_and_prints_the_result_alone(
    services: Services, make_device: MakeDevice, pg: asyncpg.Connection
):
    device = await make_device(7, ["Admin"])
    ids = await _tasks(pg, 120)
    args = ["sync", "--user", "7", "--device", device.device_id, *(f"Task:{i}" for i in ids)]
    terminal, its_side = pty.openpty()
    # A new terminal is 0 columns wide, which tqdm fits the bar into.
    termios.tcsetwinsize(its_side, (24, 100))
    try:
        code, printed = await _syncctl(services, *args, stderr=its_side)
        os.close(its_side)
        drawn = _drained(terminal)
    finally:
        os.close(terminal)
    assert code == 0
    assert len(json.loads(printed)["batch_ids"]) == 3
    assert "sync: 100%" in drawn and "3/3" in drawn, drawn

    code, printed = await _syncctl(services, *args, stderr=asyncio.subprocess.PIPE)
    assert code == 0 and json.loads(printed)["status"] == "done"
