"""Isolation and idempotent submission (SPEC §7), against the real services.

- A frozen worker (SIGSTOP) delays only the device whose lock it holds; PostgreSQL ends
  its idle transaction after ``lock_idle_timeout``, so even that device goes on.
- A device flooding jobs from its own account is answered ``rejected: rate-limited``
  while another device's job completes at once.
- A job id retried for the same device has one effect; for another device it is a job
  of its own.
- Both dead-letter queues are bounded: past the bound the oldest go.

Each test says why it failed on the worker before per-device scheduling, which waited for
a busy device in ``pg_advisory_xact_lock`` while holding its prefetch slot and a pool
connection, had no rate limit, remembered no answers and left the dead-letter queues
unbounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from broker import ObjectRef, SyncClient, SyncResult
from broker.connection import connect
from broker.publishing import json_message, publish_confirmed
from broker.settle import REASON_HEADER
from broker.topology import (
    DEAD_CHANGES_EXCHANGE,
    DEAD_CHANGES_QUEUE,
    DEAD_JOBS_EXCHANGE,
    DEAD_JOBS_QUEUE,
    DEAD_LETTER_MAX_LENGTH,
    JOBS_QUEUE,
    existing_queue,
)
from tests.conftest import (
    Device,
    MakeDevice,
    Services,
    dead_letters,
    insert,
    spawn_worker,
    wait_for,
    worker_settings,
)
from worker import Worker
from worker.handler import DEVICE_LOCK_CLASS
from worker.model import DomainModel

pytestmark = pytest.mark.usefixtures("clean_queues")

# SPEC §11 (isolation): with a worker frozen, or a device flooding jobs, other devices'
# jobs stay within this (p99, from publish to applied on the device); unhindered, such a
# small job takes milliseconds.
ISOLATION_P99 = 1.0

# --- worker processes and who holds a device ---------------------------------------------


@asynccontextmanager
async def _worker_processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Worker processes the test appends to; whatever state they are in (frozen, say),
    they are woken and stopped at the end."""
    processes: list[asyncio.subprocess.Process] = []
    try:
        yield processes
    finally:
        for process in processes:
            if process.returncode is None:
                # A stopped process keeps SIGTERM pending until it runs again.
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), timeout=15)
            except TimeoutError:
                process.kill()
                await process.wait()


# The backend holding a device's lock, and its client's port. The two-key form
# pg_try_advisory_xact_lock(int4, int4) shows as classid = key 1, objid = key 2 (an oid:
# hashtext's int4 cast to oid wraps the same way), objsubid = 2.
_LOCK_HOLDER = """
SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid = $1 AND l.objid = hashtext($2)::oid
"""


async def _lock_port(pg: asyncpg.Connection, device_id: str) -> int | None:
    port: int | None = await pg.fetchval(_LOCK_HOLDER, DEVICE_LOCK_CLASS, device_id)
    return port


def _socket_inodes(local_port: int) -> set[str]:
    """Inodes of the TCP sockets bound to ``local_port`` on this machine (/proc/net)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(table).read_text().splitlines()[1:] if Path(table).exists() else []
        for line in lines:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if port == local_port and fields[9] != "0":
                inodes.add(fields[9])
    return inodes


def _process_of_port(local_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` owns the socket on ``local_port`` (psutil is not installed: the
    socket's inode in /proc/net/tcp, then the process whose fds link to it)."""
    wanted = {f"socket:[{inode}]" for inode in _socket_inodes(local_port)}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd) in wanted:
                    return pid
            except FileNotFoundError:
                continue  # closed meanwhile
    return None


async def _holder(pg: asyncpg.Connection, device_id: str, pids: list[int]) -> int | None:
    """The process among ``pids`` whose database session holds ``device_id``'s lock."""
    port = await _lock_port(pg, device_id)
    return None if port is None else _process_of_port(port, pids)


async def _wait_for_holder(
    pg: asyncpg.Connection, device_id: str, pids: list[int], timeout: float = 20.0
) -> int:
    async with asyncio.timeout(timeout):
        # The lock lives in PostgreSQL; there is nothing to be notified by.
        while (pid := await _holder(pg, device_id, pids)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    return pid


async def _wait_for_consumers(services: Services, count: int) -> None:
    """Until ``sync.jobs`` has ``count`` consumers (a started worker consumes last)."""
    connection = await connect(services.amqp_url, "test-isolation-probe")
    try:

        async def enough() -> bool:
            declared = await existing_queue(connection, JOBS_QUEUE.name, hint="declared")
            return (declared.consumer_count or 0) >= count

        await wait_for(enough, timeout=20, every=0.05)
    finally:
        await connection.close()


async def _tasks(pg: asyncpg.Connection, count: int, title: str = "task") -> list[int]:
    return [
        record["id"]
        for record in await pg.fetch(
            "INSERT INTO t_task (title) SELECT $1 || ' ' || g FROM generate_series(1, $2) g "
            "RETURNING id",
            title,
            count,
        )
    ]


def _refs(ids: list[int]) -> list[ObjectRef]:
    return [ObjectRef("Task", i) for i in ids]


async def _timed_sync(
    client: SyncClient, device: Device, ids: list[int], timeout: float = 10.0
) -> float:
    """Sync ``ids`` to ``device`` and wait until applied; the seconds it took."""
    started = time.perf_counter()
    result = await client.synchronize_to_device(device.session, objects=_refs(ids), timeout=timeout)
    assert result.status == "done", result
    await device.settled(result)
    return time.perf_counter() - started


async def _freeze_holder(
    pg: asyncpg.Connection, victim: Device, frozen: asyncio.subprocess.Process
) -> None:
    """SIGSTOP ``frozen`` while it holds ``victim``'s lock (checked again once frozen: the
    job must not have finished between seeing the lock and the signal)."""
    assert await _wait_for_holder(pg, victim.device_id, [frozen.pid]) == frozen.pid
    frozen.send_signal(signal.SIGSTOP)
    assert await _holder(pg, victim.device_id, [frozen.pid]) == frozen.pid, (
        "the big job finished before the worker was frozen: make it bigger"
    )


# --- 1. a frozen worker ------------------------------------------------------------------


async def test_frozen_worker_delays_only_the_device_it_holds(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection, services: Services
):
    """Worker A (prefetch 1) is frozen holding victim V's lock and its one big job, so
    its window is full and every later job goes to worker B. B gets jobs of V, which it
    cannot serve while A is frozen, and jobs of another device O, which must complete
    promptly all the same.

    On the old worker B's jobs of V blocked in ``pg_advisory_xact_lock``, each holding a
    prefetch slot: the four of V filled B's window (prefetch 4), so O's jobs were never
    delivered and timed out. Now V's jobs wait parked, at most ``device_in_hand`` (2) of
    them; the rest are answered ``rate-limited`` at once, so B's window stays open.
    """
    victim = await make_device(7, ["Admin"])
    other = await make_device(8, ["Admin"])
    # 500 batches of 10: A is still publishing them when it is frozen.
    big_ids = await _tasks(pg, 5000, "big")
    victim_ids = await _tasks(pg, 4 * 3, "victim")
    other_ids = await _tasks(pg, 5, "other")

    async with _worker_processes() as workers:
        frozen = await spawn_worker(services, "iso-frozen", prefetch=1, batch_size=10)
        workers.append(frozen)
        await _wait_for_consumers(services, 1)
        big = asyncio.create_task(
            client.synchronize_to_device(victim.session, objects=_refs(big_ids), timeout=60)
        )
        await _freeze_holder(pg, victim, frozen)
        live = await spawn_worker(services, "iso-live", prefetch=4, concurrency=4, device_in_hand=2)
        workers.append(live)
        await _wait_for_consumers(services, 2)

        # V's jobs during the freeze: B parks two and refuses the others at once.
        victim_jobs = {
            client.new_job_id(): victim_ids[start : start + 3] for start in range(0, 12, 3)
        }
        during = {
            job_id: asyncio.create_task(
                client.synchronize_to_device(
                    victim.session, objects=_refs(ids), job_id=job_id, timeout=60
                )
            )
            for job_id, ids in victim_jobs.items()
        }
        await wait_for(_count_done(list(during.values()), 2), timeout=ISOLATION_P99, every=0.01)

        for object_id in other_ids:
            seconds = await _timed_sync(client, other, [object_id])
            assert seconds < ISOLATION_P99, f"O's job took {seconds:.2f} s, A frozen"
        assert await other.store.ids("Task") == other_ids
        assert await _holder(pg, victim.device_id, [frozen.pid, live.pid]) == frozen.pid
        assert not big.done()

        frozen.send_signal(signal.SIGCONT)
        big_result = await big
        answers = {job_id: await task for job_id, task in during.items()}
        refused = sorted(job_id for job_id, result in answers.items() if result.status != "done")
        assert [(answers[job_id].status, answers[job_id].reason) for job_id in refused] == [
            ("rejected", "rate-limited")
        ] * 2, answers
        # The caller retries its refused jobs with the same ids once V is free: a refusal
        # is not an answer to remember, so they run now.
        for job_id in refused:
            answers[job_id] = await client.synchronize_to_device(
                victim.session, objects=_refs(victim_jobs[job_id]), job_id=job_id, timeout=20
            )

    assert big_result.status == "done", big_result
    assert all(result.status == "done" for result in answers.values()), answers
    await victim.settled(big_result, timeout=30)
    for result in answers.values():
        await victim.settled(result)
    assert await victim.store.ids("Task") == sorted(big_ids + victim_ids)


def _count_done(tasks: list[asyncio.Task[SyncResult]], count: int):
    async def enough() -> bool:
        return sum(task.done() for task in tasks) >= count

    return enough


async def test_frozen_workers_lock_ends_after_lock_idle_timeout(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection, services: Services
):
    """Even the device a frozen worker holds goes on: PostgreSQL ends the frozen worker's
    transaction after ``lock_idle_timeout`` (here 2 s), which frees the lock, and the
    live worker serves the device's next job while the other is still frozen. Once woken,
    the frozen worker's job is tried again and ends ``done``; the device holds it all.

    On the old worker the lock was held until the frozen worker ran again, so the job
    waited out the freeze (the timeout below).
    """
    victim = await make_device(7, ["Admin"])
    big_ids = await _tasks(pg, 5000, "big")
    later_ids = await _tasks(pg, 3, "later")

    async with _worker_processes() as workers:
        frozen = await spawn_worker(
            services, "iso-frozen", prefetch=1, batch_size=10, lock_idle_timeout=2
        )
        workers.append(frozen)
        await _wait_for_consumers(services, 1)
        big = asyncio.create_task(
            client.synchronize_to_device(victim.session, objects=_refs(big_ids), timeout=60)
        )
        await _freeze_holder(pg, victim, frozen)
        frozen_at = time.perf_counter()
        live = await spawn_worker(services, "iso-live", prefetch=4)
        workers.append(live)
        await _wait_for_consumers(services, 2)

        later = await client.synchronize_to_device(
            victim.session, objects=_refs(later_ids), timeout=10
        )
        assert later.status == "done", later
        await victim.settled(later)
        assert time.perf_counter() - frozen_at < 2 + 2 * ISOLATION_P99
        assert not big.done()

        frozen.send_signal(signal.SIGCONT)
        big_result = await big

    assert big_result.status == "done", big_result
    await victim.settled(big_result, timeout=30)
    assert await victim.store.ids("Task") == sorted(big_ids + later_ids)


# --- 2. a flooding device ----------------------------------------------------------------

FLOOD = 2000


@dataclass
class Flood:
    flooder: Device
    other: Device
    results: list[SyncResult]
    latencies: list[float]
    other_ids: list[int]


async def _flood(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection, services: Services
) -> Flood:
    """Device F publishes 2,000 one-object jobs at once from its own account (about
    1,000-1,500 a second here); device O sends one job after another while the flood
    lasts, each waited for and applied; O's latencies are measured."""
    flooder = await make_device(9, ["Admin"])
    other = await make_device(10, ["Admin"])
    flood_ids = await _tasks(pg, 100, "flood")
    other_ids = await _tasks(pg, 20, "other")
    latencies: list[float] = []
    async with (
        _worker_processes() as workers,
        await SyncClient.connect(flooder.amqp_url, name="test-flooder") as own,
    ):
        workers.append(
            await spawn_worker(
                services,
                "iso-flood",
                prefetch=16,
                concurrency=4,
                device_rate=20,
                device_burst=20,
                device_in_hand=4,
            )
        )
        await _wait_for_consumers(services, 1)
        flood = [
            asyncio.create_task(
                own.synchronize_to_device(
                    flooder.session, objects=_refs([flood_ids[n % 100]]), timeout=60
                )
            )
            for n in range(FLOOD)
        ]
        await wait_for(_count_done(flood, 50), timeout=20, every=0.01)
        for object_id in other_ids:
            if all(task.done() for task in flood):
                break
            latencies.append(await _timed_sync(client, other, [object_id], timeout=30))
        results = await asyncio.gather(*flood)
    return Flood(flooder, other, list(results), latencies, other_ids)


async def test_flooding_device_is_rate_limited_while_another_completes(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection, services: Services
):
    """F's jobs past its rate are answered ``rejected: rate-limited`` and dead-lettered
    with that reason; those admitted end ``done`` and F's device holds their objects; O's
    jobs complete while the flood lasts.

    On the old worker there was no rate limit: no job was rejected, and O's jobs waited
    behind every one of F's jobs, each run in full, one at a time under F's lock.
    """
    flood = await _flood(client, make_device, pg, services)
    done = [result for result in flood.results if result.status == "done"]
    refused = [result for result in flood.results if result.status != "done"]
    assert {(result.status, result.reason) for result in refused} == {("rejected", "rate-limited")}
    # Refused: most of them. Admitted: at least the burst.
    assert len(refused) > FLOOD / 2
    assert len(done) >= 20
    await flood.flooder.store.wait_for_batches(
        {batch_id for result in done for batch_id in result.batch_ids}, timeout=20
    )
    admitted = sorted({ref.id for result in done for ref in _synced(result)})
    assert await flood.flooder.store.ids("Task") == admitted
    assert await _dead_letters_hold(services, {result.job_id for result in refused})
    assert flood.latencies, "O got no job through while the flood lasted"
    assert await flood.other.store.ids("Task") == flood.other_ids[: len(flood.latencies)]


@pytest.mark.xfail(
    reason="SPEC §11 isolation target not met yet: a flood's jobs sit ahead of the others "
    "in the one sync.jobs queue, and a refusal holds its delivery for two broker confirms "
    "(the dead letter's, then the result's: 150-450 ms on a loaded machine), so two "
    "workers refuse 100-250 jobs/s; the bench measured a p99 of 3.9-41 s (docs/performance.md)",
    strict=False,
)
async def test_flood_keeps_other_devices_within_the_isolation_target(
    client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection, services: Services
):
    flood = await _flood(client, make_device, pg, services)
    assert max(flood.latencies) < ISOLATION_P99, (
        f"O's jobs during F's flood took {', '.join(f'{s:.2f}' for s in flood.latencies)} s"
    )


async def test_device_account_over_its_limit_is_refused_before_its_body_is_read(
    services: Services,
    model: DomainModel,
    make_device: MakeDevice,
    pg: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractRobustChannel,
):
    """A device account's limit is checked on its ``user_id`` before the body is read:
    with a burst of 2 (and a rate too slow to refill during the test), F's first two
    jobs are judged on their merits (malformed JSON, then done) and use up the burst;
    after that a malformed body and a good job alike are answered ``rate-limited``,
    under their message ids, and dead-lettered with that reason. The app server's jobs
    (a trusted account: its device is read from the body) are decoded first, as before.

    When the limit was checked only after the strict decode, the third job was answered
    ``malformed-json`` instead.
    """
    flooder = await make_device(9, ["Admin"])
    other = await make_device(10, ["Admin"])
    ids = await _tasks(pg, 3, "limited")
    settings = worker_settings(services, device_rate=0.0001, device_burst=2, device_in_hand=4)
    running = await Worker.start(settings, model)
    try:
        async with await SyncClient.connect(flooder.amqp_url, name="test-limited") as own:

            async def raw(body: bytes) -> SyncResult:
                return await own.publish_raw(body, job_id=SyncClient.new_job_id(), timeout=10)

            first = await raw(b'{"schema_version": 1, "job_id": ')
            second = await own.synchronize_to_device(
                flooder.session, objects=_refs(ids[:1]), timeout=10
            )
            third = await raw(b"not json at all")
            fourth = await own.synchronize_to_device(
                flooder.session, objects=_refs(ids[1:2]), timeout=10
            )
        bad_from_server = await SyncClient.connect(services.amqp_url, name="test-limited-app")
        async with bad_from_server as app:
            fifth = await app.publish_raw(b"[]", job_id=SyncClient.new_job_id(), timeout=10)
            sixth = await app.synchronize_to_device(other.session, objects=_refs(ids[2:]))
    finally:
        await running.stop()

    assert (first.status, (first.reason or "").split(":")[0]) == ("rejected", "malformed-json")
    assert second.status == "done", second
    assert [(r.status, r.reason) for r in (third, fourth)] == [("rejected", "rate-limited")] * 2
    assert (fifth.status, fifth.reason) == ("rejected", "invalid-job: expected a JSON object")
    assert sixth.status == "done", sixth
    await flooder.settled(second)
    assert await flooder.store.ids("Task") == ids[:1]
    assert await dead_letters(amqp) == {
        first.job_id: first.reason,
        third.job_id: "rate-limited",
        fourth.job_id: "rate-limited",
        fifth.job_id: fifth.reason,
    }


async def _dead_letters_hold(services: Services, job_ids: set[str]) -> bool:
    """``sync.jobs.dead`` holds exactly ``job_ids``, each with the reason ``rate-limited``
    (read by a consumer: one basic.get per message would take seconds)."""
    connection = await connect(services.amqp_url, "test-dead-letters")
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(DEAD_JOBS_QUEUE.name)
        found: dict[str, object] = {}
        complete = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            found[message.message_id or ""] = (message.headers or {}).get(REASON_HEADER)
            if len(found) >= len(job_ids):
                complete.set()

        await queue.consume(on_message, no_ack=True)
        await asyncio.wait_for(complete.wait(), timeout=20)
        depth = await existing_queue(connection, DEAD_JOBS_QUEUE.name, hint="declared")
    finally:
        await connection.close()
    return depth.message_count == 0 and found == dict.fromkeys(job_ids, "rate-limited")


def _synced(result: SyncResult) -> list[ObjectRef]:
    return [ObjectRef(outcome.entity, outcome.id) for outcome in result.objects]


# --- 3. idempotent submission ------------------------------------------------------------


async def test_retried_job_id_has_one_effect(
    worker: Worker, client: SyncClient, make_device: MakeDevice, pg: asyncpg.Connection
):
    """The same job id twice for one device: between the two, the row changes in
    PostgreSQL and the app commits an offline change on the device. The retry gets the
    first answer (the same batch ids) and the device keeps its offline change, dirty.
    The same job id from another device's own account is a job of its own.

    The old worker remembered no answers: the retry ran again, read the new row and sent
    a new batch (other batch ids), whose newer version replaced the device's offline
    change.
    """
    device = await make_device(7, ["Admin"])
    task = await insert(pg, "t_task", title="first")
    marker = await insert(pg, "t_task", title="marker")
    first = await client.synchronize_to_device(
        device.session, objects=_refs([task]), job_id="fixed-id-1"
    )
    assert first.status == "done" and first.synced == 1, first
    await device.settled(first)

    await pg.execute("UPDATE t_task SET title = 'changed on the server' WHERE id = $1", task)
    await device.store.change("Task", task, title="changed offline")
    await device.store.commit("Task", task)
    again = await client.synchronize_to_device(
        device.session, objects=_refs([task]), job_id="fixed-id-1"
    )
    assert again == first
    # A later job's batches come after anything the retry might have sent.
    await device.settled(
        await client.synchronize_to_device(device.session, objects=_refs([marker]))
    )
    assert (await device.store.get_committed("Task", task) or {})["title"] == "changed offline"
    assert await device.store.is_dirty("Task", task)

    elsewhere = await make_device(8, ["Admin"])
    async with await SyncClient.connect(elsewhere.amqp_url, name="test-elsewhere") as own:
        theirs = await own.synchronize_to_device(
            elsewhere.session, objects=_refs([task]), job_id="fixed-id-1"
        )
    assert theirs.status == "done" and theirs.synced == 1, theirs
    assert theirs.batch_ids and set(theirs.batch_ids).isdisjoint(first.batch_ids)
    await elsewhere.settled(theirs)
    stored = await elsewhere.store.get_committed("Task", task)
    assert (stored or {})["title"] == "changed on the server"


# --- 4. bounded dead-letter queues -------------------------------------------------------


async def test_dead_letter_queues_are_bounded(
    amqp: aio_pika.abc.AbstractRobustChannel, services: Services
):
    """``DEAD_LETTER_MAX_LENGTH + 50`` dead letters into each dead-letter queue: each
    holds the bound, and the oldest 50 went (the first left is number 50). No worker
    runs here: every worker consumes ``sync.changes.dead``, so its depth could not be
    read.

    The old dead-letter queues had no bound: they held all of them, and a flood of bad
    jobs could fill the broker.
    """
    connection = await connect(services.amqp_url, "test-dead-letter-bounds")
    try:
        await _fill_and_check(amqp, connection, DEAD_JOBS_EXCHANGE.name, DEAD_JOBS_QUEUE.name)
        await _fill_and_check(amqp, connection, DEAD_CHANGES_EXCHANGE.name, DEAD_CHANGES_QUEUE.name)
    finally:
        for name in (DEAD_JOBS_QUEUE.name, DEAD_CHANGES_QUEUE.name):
            await (await amqp.get_queue(name)).purge()
        await connection.close()


async def _fill_and_check(
    amqp: aio_pika.abc.AbstractRobustChannel,
    connection: aio_pika.abc.AbstractRobustConnection,
    exchange: str,
    queue: str,
) -> None:
    extra = 50
    messages = [
        json_message(json.dumps({"n": n}).encode(), message_id=f"dead-{n}")
        for n in range(DEAD_LETTER_MAX_LENGTH + extra)
    ]
    target = await amqp.get_exchange(exchange)
    # One window: confirms come back in bulk; in windows of 500 this takes twice as long.
    await publish_confirmed(target, messages, routing_key="", timeout=30, window=len(messages))
    declared = await existing_queue(connection, queue, hint="run declare_topology")
    assert declared.message_count == DEAD_LETTER_MAX_LENGTH, queue
    oldest = await (await amqp.get_queue(queue)).get(no_ack=True, fail=False)
    assert oldest is not None, queue
    assert json.loads(oldest.body) == {"n": extra}, queue
