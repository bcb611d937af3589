"""How a run's confirmed batches become each job's progress reports, and how those go
out: bounded in number, rising, the last at the total."""

from __future__ import annotations

import asyncio
import json
import random
import uuid

import aio_pika
import pytest

from broker.client import PROGRESS_TYPE
from worker.progress import STEPS, ProgressReply, stream_progress


def test_no_callback_when_no_job_of_the_stream_asked():
    assert stream_progress([(None, 3), (None, 1)]) is None


def test_each_job_counts_its_own_batches_a_bounded_number_of_times():
    big: list[tuple[int, int]] = []
    small: list[tuple[int, int]] = []
    confirmed = stream_progress(
        [
            (lambda done, total: big.append((done, total)), 400),
            (None, 3),
            (lambda done, total: small.append((done, total)), 2),
        ]
    )
    assert confirmed is not None
    # Confirms of one window come in any order.
    order = list(range(405))
    for start in range(0, len(order), 64):
        window = order[start : start + 64]
        random.shuffle(window)
        for index in window:
            confirmed(index)
    assert big == [(n, 400) for n in range(20, 401, 20)]
    assert len(big) == STEPS
    assert small == [(1, 2), (2, 2)]


@pytest.fixture
async def reply_queue(amqp: aio_pika.abc.AbstractRobustChannel):
    queue = await amqp.declare_queue(f"test-progress-{uuid.uuid4().hex[:8]}", exclusive=True)
    yield queue
    await queue.delete(if_unused=False, if_empty=False)


async def _received(
    queue: aio_pika.abc.AbstractQueue,
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    messages = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        messages.append(message)
    return messages


async def test_reports_go_out_rising_and_the_last_before_finish_returns(
    amqp: aio_pika.abc.AbstractRobustChannel, reply_queue: aio_pika.abc.AbstractQueue
):
    reply = ProgressReply(
        amqp.default_exchange, job_id="job-1", reply_to=reply_queue.name, correlation_id="c-1"
    )
    reply.report(5, 10)
    await asyncio.sleep(0.1)
    # The job ran again (say, after a broker outage) and counts from its first batch.
    reply.report(3, 10)
    await asyncio.sleep(0.1)
    reply.report(8, 10)
    reply.report(10, 10)
    await reply.finish()
    # What the worker sends next (the result) comes after the last report.
    await amqp.default_exchange.publish(aio_pika.Message(b"result"), reply_queue.name)
    *messages, last = await _received(reply_queue)
    assert last.body == b"result"
    published = [json.loads(message.body)["published"] for message in messages]
    assert published[0] == 5 and published[-1] == 10, published
    assert published == sorted(set(published)) and 3 not in published
    first = messages[0]
    assert (first.type, first.correlation_id) == (PROGRESS_TYPE, "c-1")
    assert first.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    assert json.loads(first.body) == {
        "schema_version": 1,
        "job_id": "job-1",
        "published": 5,
        "total": 10,
    }
