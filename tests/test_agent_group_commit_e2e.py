"""Group commit, end to end on the real broker and SQLite: the batches an agent has in
hand are applied in one transaction and acked only after it committed; a poison batch
among them does not stop its neighbours; order holds; a SIGKILL loses nothing."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from prometheus_client import REGISTRY

from broker.models import Change, OverlayChange, RemoveChange, UpsertChange
from broker.publishing import json_message, publish_confirmed
from broker.topology import CHANGES_EXCHANGE, DEAD_CHANGES_QUEUE, device_queue_name
from device_agent import AgentSettings, DeviceAgent
from tests.conftest import ROOT, Device, MakeDevice, Services, wait_for
from worker.publisher import EncodedBatch, encode_batch

pytestmark = pytest.mark.usefixtures("clean_queues")


def _note(n: int, version: int = 1, **data: Any) -> UpsertChange:
    return UpsertChange(entity="Note", id=n, version=version, data=data or {"text": f"n{n}"})


def _encoded(device: Device, *changes: Change) -> EncodedBatch:
    return encode_batch(
        "job-group",
        device.device_id,
        [change.model_dump_json() for change in changes],
        position=1,
        total=1,
    )


async def _publish(amqp: aio_pika.abc.AbstractChannel, device: Device, bodies: list[bytes]):
    exchange = await amqp.get_exchange(CHANGES_EXCHANGE.name)
    await publish_confirmed(
        exchange,
        [json_message(body, message_id=f"m{n}") for n, body in enumerate(bodies)],
        routing_key=device.device_id,
        timeout=10,
        window=64,
    )


@pytest.fixture
async def plain(services: Services) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel that is not robust: a robust one answers a passive declare from its
    cache, with the message count of its first declare."""
    async with await aio_pika.connect(services.amqp_url) as connection:
        yield await connection.channel()


async def _ready(plain: aio_pika.abc.AbstractChannel, device: Device) -> int:
    """Batches waiting in the device queue, not delivered to any agent."""
    queue = await plain.declare_queue(device_queue_name(device.device_id), passive=True)
    return int(queue.declaration_result.message_count or 0)


@contextmanager
def _app_holds_the_write_lock(path: Path) -> Iterator[None]:
    """What an app writing to the file does to the agent: its commits must wait."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            db.execute("ROLLBACK")


async def _in_hand() -> None:
    """The broker sent every batch; give the agent (waiting for SQLite) a moment to read
    them off its socket, so they are in hand when the app lets go of the lock."""
    await asyncio.sleep(1.0)


def _commits() -> tuple[float, float]:
    """(commits, batches settled by them) so far, from the agents' metrics (in process)."""
    count = REGISTRY.get_sample_value("sync_batches_per_commit_count")
    total = REGISTRY.get_sample_value("sync_batches_per_commit_sum")
    return count or 0.0, total or 0.0


async def _started(device: Device, **settings: Any) -> DeviceAgent:
    """An agent connected, its store opened and pruned (a write), not consuming yet."""
    return await DeviceAgent.start(
        AgentSettings(
            amqp_url=device.amqp_url,
            device_id=device.device_id,
            db_path=device.db_path,
            **settings,
        )
    )


def _run(agent: DeviceAgent) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(agent.run(stop))


async def test_delivered_batches_are_acked_only_after_their_group_committed(
    make_device: MakeDevice, amqp, plain
):
    device = await make_device(7, run_agent=False)
    batches = [_encoded(device, _note(n)) for n in range(1, 21)]

    # The app holds the write lock: the agent has every batch in hand and cannot commit.
    stop, task = _run(await _started(device, shutdown_grace=0.1))
    with _app_holds_the_write_lock(device.db_path):
        await _publish(amqp, device, [b.body for b in batches])
        await wait_for(lambda: _no_batch_ready(plain, device))
        await asyncio.sleep(0.3)
        assert await device.store.applied_batch_ids(b.batch_id for b in batches) == set()
        # Stopped before any commit: the broker has every batch back, none was acked.
        stop.set()
        await wait_for(lambda: _all_ready(plain, device, len(batches)))
    await task

    # Back again, with the app's lock held until every batch is delivered: the first
    # batches' commit waits, the rest then go in one more. Every batch once, none lost.
    before = _commits()
    agent = await _started(device)
    with _app_holds_the_write_lock(device.db_path):
        stop, task = _run(agent)
        await wait_for(lambda: _no_batch_ready(plain, device))
        await _in_hand()
    try:
        await device.store.wait_for_batches([b.batch_id for b in batches], timeout=15)
    finally:
        stop.set()
        await task
    commits, settled = (now - then for now, then in zip(_commits(), before, strict=True))
    assert settled == len(batches)
    assert commits <= 2
    assert await device.store.ids("Note") == list(range(1, 21))
    assert await _ready(plain, device) == 0


async def _no_batch_ready(plain: aio_pika.abc.AbstractChannel, device: Device) -> bool:
    return await _ready(plain, device) == 0


async def _all_ready(plain: aio_pika.abc.AbstractChannel, device: Device, count: int) -> bool:
    return await _ready(plain, device) == count


async def test_a_poison_batch_in_a_group_is_dead_lettered_and_its_neighbours_apply_in_order(
    make_device: MakeDevice, amqp, plain, caplog
):
    device = await make_device(7, run_agent=False)
    poison = _encoded(device, _note(9, text=1))
    good = [
        _encoded(device, _note(1, text="first")),
        _encoded(device, OverlayChange(entity="Note", id=1, changes={"text": "draft"})),
        _encoded(device, RemoveChange(entity="Note", id=1, reason="no-access", version=1)),
        _encoded(device, _note(1, text="again"), _note(2)),
    ]
    bodies = [
        good[0].body,
        poison.body.replace(b'"text":1', b'"text":NaN'),
        *(b.body for b in good[1:]),
    ]

    caplog.set_level(logging.ERROR, logger="device_agent.agent")
    before = _commits()
    stop, task = _run(await _started(device))
    with _app_holds_the_write_lock(device.db_path):
        await _publish(amqp, device, bodies)
        await wait_for(lambda: _no_batch_ready(plain, device))
        await _in_hand()
    try:
        await device.store.wait_for_batches([b.batch_id for b in good], timeout=15)
    finally:
        stop.set()
        await task

    # In delivery order: the removal dropped the overlay, then the object came back.
    assert await device.store.get("Note", 1) == {"text": "again"}
    assert await device.store.get("Note", 2) == {"text": "n2"}
    assert await device.store.get("Note", 9) is None
    assert await device.store.applied_batch_ids([poison.batch_id]) == set()
    commits, settled = (now - then for now, then in zip(_commits(), before, strict=True))
    assert (settled, commits <= 2) == (len(good), True)
    # The poison went to the dead letters, with its reason in the agent's log.
    dead = await amqp.get_queue(DEAD_CHANGES_QUEUE.name)
    message = await dead.get(timeout=5, fail=False)
    assert message is not None and message.message_id == "m1"
    await message.ack()
    dropped = [r for r in caplog.records if r.getMessage() == "batch dropped"]
    assert [getattr(r, "reason", None) for r in dropped] == [
        "malformed-json: NaN is not a JSON number"
    ]


async def _agent_process(device: Device, log: Path) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "SYNC_AMQP_URL": device.amqp_url,
        "SYNC_DEVICE_ID": device.device_id,
        "SYNC_DB_PATH": str(device.db_path),
    }
    with log.open("ab") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "device_agent", env=env, cwd=ROOT, stderr=stderr
        )


async def test_an_agent_killed_mid_backlog_loses_nothing_and_applies_each_batch_once(
    make_device: MakeDevice, amqp, plain, tmp_path
):
    device = await make_device(7, run_agent=False)
    batches = [_encoded(device, _note(n, version=n)) for n in range(1, 401)]
    await _publish(amqp, device, [b.body for b in batches])
    ids = [b.batch_id for b in batches]
    log = tmp_path / "agent.log"

    agent = await _agent_process(device, log)
    try:
        await wait_for(lambda: _some_applied(device, ids), timeout=30, every=0.005)
    finally:
        agent.send_signal(signal.SIGKILL)
        await agent.wait()
    assert len(await device.store.applied_batch_ids(ids)) < len(ids), "killed too late"

    agent = await _agent_process(device, log)
    try:
        await device.store.wait_for_batches(ids, timeout=60)
    finally:
        agent.send_signal(signal.SIGTERM)
        await agent.wait()
    assert await device.store.ids("Note") == list(range(1, 401))
    assert [await device.store.version("Note", n) for n in (1, 200, 400)] == [1, 200, 400]
    assert await _ready(plain, device) == 0
    # Each batch applied once: a batch committed but not acked came back as a no-op.
    applied = [
        line.split("batch_id=")[1].split()[0]
        for line in log.read_text().splitlines()
        if " batch applied " in line
    ]
    assert len(applied) == len(set(applied))


async def _some_applied(device: Device, ids: list[str]) -> bool:
    return len(await device.store.applied_batch_ids(ids)) >= 20
