"""Isolation (SPEC §7, §11): a frozen worker, or a device flooding jobs from its own
account, must not hold up the other devices; target: their p99 ≤ 1 s.

    .venv/bin/python -m bench.isolation [--scenarios frozen flood] [--freeze 10]
                                        [--flood 20000] [--recover-max 90]

Set-up: seeds 20,000 work orders (truncating ``work_order``, like the other benches),
registers 20 devices for ``USER`` with ``register_device`` (row, queue and AMQP account)
and runs an in-process ``DeviceAgent`` for each (logging in with the operator URL); their
``on_applied`` hook says when each batch was committed. Each scenario starts its own 2
worker processes (``python -m worker``, default settings, JSON logs in a temp folder) and
warms up with one job per device. A job's latency runs from when it was due to be
published until its result is back and every batch of it is committed on its device;
a job still unanswered (or not applied) when a scenario stops counts with the time it
had waited so far (a lower bound) and is counted as unanswered.

**frozen**: a stream of one-object jobs, 40 jobs/s over 19 devices ("the others",
results awaited), runs throughout. After 4 s, four 5,000-object list jobs go to the 20th
device (the victim). The bench then finds the worker process that holds the victim's
job: the one whose PostgreSQL backend holds a granted advisory lock whose key is
``hashtext(victim)`` (``pg_locks``: ``objid`` is that key's low 32 bits, whether the
lock takes two int4 keys or one bigint), mapped to the process through the backend's
``client_port`` (``pg_stat_activity``), the kernel's socket table (``/proc/net/tcp``)
and the workers' open sockets (``/proc/<pid>/fd``). It sends that worker SIGSTOP and
checks that the lock is still held; if the job finished in between, SIGCONT and look
again. For up to 1.5 s it also waits for a moment when that worker's backends hold other
advisory locks too (jobs of other devices in hand), the worst moment for workers that
wait for each other's locks (the target holds for any moment); the note gives the locks
held. Half-way through the freeze, ``rabbitmqctl list_channels`` gives how many messages
the stopped worker has unacked (its channels are named by the client's address, mapped
to the process as above). Should the worker take no such lock (a rewrite may lock
otherwise), the fallback is the worker whose log names a victim job as done (``"job
done"``, ``job_id``), and the note says which way was used. The worker stays stopped
``--freeze`` s, gets SIGCONT, and the stream runs 10 s more.

The jobs a frozen worker holds are its own to delay (SPEC §7: "delays only the devices
whose jobs it holds"): which worker answered each job is read from the workers' logs. A
job is *held* when it was delivered to the stopped process (in hand, or prefetched and
unacked), so it waits the freeze out: of the jobs the frozen worker answered after
SIGSTOP that were published before SIGCONT, the earliest published, as many as its
unacked count less the victim's jobs among them (the broker delivers in queue order, so
what it took from the backlog after SIGCONT was published later). A job is *behind* a
held one when it is a later job of a device with a held job, published before SIGCONT
and answered after it: it waited for the frozen worker, which per-device order allows (a
later job that went through on the other worker meanwhile is not behind). The figures
for "others" leave both out; "all others" keep them; their counts are reported (a job
stuck because the other worker stalled altogether also counts as behind when its device
had a held job: the "all others" figures show that case whole). Figures: the others'
p50, p99 and max during the freeze (jobs due between SIGSTOP and SIGCONT) and overall;
the same p99 for all others; jobs of others delayed more than 1 s and 5 s; the victim's
jobs (statuses, latency of the last).

**flood**: a stream of one-object jobs, 20 jobs/s over 19 devices, runs throughout.
After 3 s, the 20th device's own account (``device.<id>`` with the secret registration
returned) publishes ``--flood`` one-object jobs over 10 s: built beforehand, paced, at
most 1,000 awaiting the broker's confirm, with direct reply-to so every result comes
back by correlation id. The flooding device runs in a process of its own, as a device is
a machine of its own: in the bench's process its client work (building 20,000 messages
took 1.2 s at once, then publishing and decoding as many results) stalled the event loop
that times the others' jobs and runs their agents by 0.1-1.2 s, which the others'
figures then counted as the system's delay. The note says how long the publishing really
took: on this shared machine the confirms under load stretch it to 20-140 s. The stream
goes on until the others have recovered (every job of theirs due in the last 3 s, up to
1.5 s ago, done within 1 s) or ``--recover-max`` s after the flood's last publish,
whichever is first. Figures: the others' p50, p99 and max for jobs due during the flood
and overall; the time from the flood's last publish until the others recovered (the
first moment after which each of their jobs took ≤ 1 s; ``--recover-max`` if never);
the flood's results by status and reason, with those still unanswered; how many of its
jobs reached the device; the depth of ``sync.jobs.dead`` before and after, and the
reasons of the dead-lettered jobs by publisher (read from the queue, which it empties).

Clean-up, also on failure: SIGCONT before SIGTERM, ``sync.jobs`` purged after each
scenario, the devices unregistered. ``--runs`` of the suite does not apply: one run
each, about 40 s for frozen and up to ``--recover-max`` + 50 s for flood.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from bench.report import Figure, as_table, progress
from bench.rig import (
    ROOT,
    USER,
    AppliedBatches,
    accounts,
    declare_jobs_topology,
    in_process_agents,
    running_workers,
    seed_work_orders,
    service_env,
)
from broker import ObjectList, ObjectRef, Session, SyncClient
from broker.accounts import device_account
from broker.client import DIRECT_REPLY_TO
from broker.connection import connect, open_channel
from broker.models import SyncJob, SyncResult
from broker.publishing import json_message
from broker.topology import DEAD_JOBS_QUEUE, JOBS_EXCHANGE, JOBS_QUEUE
from broker.wire import decode
from syncctl.devices import register_device, unregister_device

__all__ = ["isolation"]

ENTITY = "WorkOrder"
SEEDED = 20_000
DEVICES = 20
WORKERS = 2
TARGET_MS = 1000.0
JOB_TIMEOUT = 300.0  # a waited result; the scenarios stop well before
SETTLE = 30.0  # s for jobs still out when a stream stops
# frozen
FROZEN_RATE = 40.0
BIG_JOBS = 4
BIG_OBJECTS = 5_000
BEFORE_BIG = 4.0
AFTER_FREEZE = 10.0
FIND_FOR = 20.0  # s to find the victim's holder
PREFER_FOR = 1.5  # s to wait for a moment when it holds other devices' locks too
POLL = 0.02
# flood
FLOOD_RATE_OTHERS = 20.0
BEFORE_FLOOD = 3.0
FLOOD_SECONDS = 10.0
FLOOD_WINDOW = 1000  # flood publishes awaiting their confirm at once
RECOVERED_SPAN = 3.0  # s of the others' jobs all within target
RECOVERED_AGE = 1.5  # s those jobs have had to finish
SERVICES = Path(__file__).resolve().parent.parent / "scripts" / "services.sh"
REASON_HEADER = "x-sync-reason"
USER_HEADER = "x-sync-user-id"


@dataclass
class Sent:
    """One job: when it was due, when its result came back, the result."""

    device_id: str
    job_id: str
    due: float
    answered: float | None = None
    result: SyncResult | None = None


@dataclass
class Fleet:
    sessions: list[Session]
    secrets: dict[str, str]
    ids: list[int]
    applied: AppliedBatches
    folder: Path


@dataclass(frozen=True)
class Stats:
    """Latencies of a set of jobs, in ms; unanswered jobs count with what they waited."""

    count: int
    p50: float
    p99: float
    max: float
    over_1s: int
    over_5s: int
    unanswered: int

    def extra(self) -> dict[str, float]:
        return {
            "jobs": self.count,
            "p50_ms": self.p50,
            "p99_ms": self.p99,
            "max_ms": self.max,
            "over_1s": self.over_1s,
            "over_5s": self.over_5s,
            "unanswered": self.unanswered,
        }


def _percentile(values: Sequence[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else 0.0


def _latency(sent: Sent, applied: AppliedBatches, end: float) -> tuple[float, bool]:
    """Seconds from due to result and batches applied; ``False`` when not finished (then
    the seconds waited until ``end``)."""
    if sent.result is None or sent.answered is None:
        return end - sent.due, False
    times = [applied.at.get(batch) for batch in sent.result.batch_ids]
    if any(at is None for at in times):
        return end - sent.due, False
    return max([sent.answered, *(at for at in times if at is not None)]) - sent.due, True


def _stats(jobs: Iterable[Sent], applied: AppliedBatches, end: float) -> Stats:
    latencies = [_latency(sent, applied, end) for sent in jobs]
    ms = sorted(seconds * 1000 for seconds, _ in latencies)
    return Stats(
        count=len(ms),
        p50=_percentile(ms, 0.50),
        p99=_percentile(ms, 0.99),
        max=ms[-1] if ms else 0.0,
        over_1s=sum(1 for value in ms if value > 1000),
        over_5s=sum(1 for value in ms if value > 5000),
        unanswered=sum(1 for _, done in latencies if not done),
    )


# The stream of the others' jobs.


class Stream:
    """One-object jobs at ``rate`` per second over ``sessions``, results awaited."""

    def __init__(
        self, client: SyncClient, sessions: Sequence[Session], ids: Sequence[int], rate: float
    ) -> None:
        self.sent: list[Sent] = []
        self._client = client
        self._sessions = sessions
        self._ids = ids
        self._rate = rate
        self._tasks: set[asyncio.Task[None]] = set()
        self._rng = random.Random(7)

    async def run(self, stop: asyncio.Event, longest: float) -> None:
        """Publish until ``stop`` is set or for ``longest`` s."""
        start = time.perf_counter()
        n = 0
        while not stop.is_set():
            due = start + n / self._rate
            if due - start > longest:
                break
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, due - time.perf_counter()))
                break
            session = self._sessions[n % len(self._sessions)]
            sent = Sent(session.device_id, SyncClient.new_job_id(), due)
            self.sent.append(sent)
            task = asyncio.create_task(self._one(session, sent))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            n += 1

    async def _one(self, session: Session, sent: Sent) -> None:
        with suppress(TimeoutError):
            sent.result = await self._client.synchronize_to_device(
                session,
                objects=[ObjectRef(ENTITY, self._rng.choice(self._ids))],
                job_id=sent.job_id,
                timeout=JOB_TIMEOUT,
            )
            sent.answered = time.perf_counter()

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the jobs still out, then give up on them."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _applied_all(fleet: Fleet, jobs: Iterable[Sent], timeout: float) -> None:
    """Wait (bounded) until the batches of every answered job are applied."""
    batches = [b for sent in jobs if sent.result for b in sent.result.batch_ids]
    with suppress(TimeoutError):
        await fleet.applied.wait(batches, timeout)


# The services.


async def _purge(amqp_url: str, *names: str) -> None:
    connection = await connect(amqp_url, "bench-isolation-purge")
    try:
        channel = await open_channel(connection)
        for name in names:
            await (await channel.get_queue(name)).purge()
    finally:
        await connection.close()


async def _depth(amqp_url: str, name: str) -> int:
    connection = await connect(amqp_url, "bench-isolation-depth")
    try:
        channel = await open_channel(connection)
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


@asynccontextmanager
async def _fleet(env: dict[str, str], ids: list[int], folder: Path) -> AsyncIterator[Fleet]:
    """``DEVICES`` registered devices with their accounts and in-process agents."""
    prefix = f"bench-iso-{uuid.uuid4().hex[:6]}"
    device_ids = [f"{prefix}-{n:02d}" for n in range(DEVICES)]
    conn = await asyncpg.connect(env["SYNC_DATABASE_URL"])
    connection = await connect(env["SYNC_AMQP_URL"], "bench-isolation-fleet")
    channel = await open_channel(connection)
    registered: list[str] = []
    secrets: dict[str, str] = {}
    try:
        for device_id in device_ids:
            secret = await register_device(conn, channel, accounts(env), device_id, USER)
            registered.append(device_id)
            secrets[device_id] = secret or ""
        applied = AppliedBatches()
        paths = {d: folder / f"{d}.sqlite" for d in device_ids}
        async with in_process_agents(env["SYNC_AMQP_URL"], paths, applied):
            sessions = [Session(user_id=USER, device_id=d) for d in device_ids]
            yield Fleet(sessions, secrets, ids, applied, folder)
    finally:
        for device_id in registered:
            await unregister_device(conn, channel, accounts(env), device_id)
        await connection.close()
        await conn.close()


@asynccontextmanager
async def _workers(
    env: dict[str, str], fleet: Fleet, tag: str
) -> AsyncIterator[tuple[list[asyncio.subprocess.Process], SyncClient]]:
    """``WORKERS`` worker processes with JSON logs and a client, warmed up: one job per
    device, applied. After: SIGCONT (a stopped worker cannot take SIGTERM), SIGTERM, and
    ``sync.jobs`` purged."""
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_purge, env["SYNC_AMQP_URL"], JOBS_QUEUE.name)
        processes = await stack.enter_async_context(
            running_workers(env, WORKERS, fleet.folder, tag, log_format="json")
        )
        stack.callback(_continue_all, processes)
        client = await stack.enter_async_context(
            await SyncClient.connect(env["SYNC_AMQP_URL"], name=f"bench-isolation-{tag}")
        )
        warm = await asyncio.gather(
            *(
                client.synchronize_to_device(s, objects=[ObjectRef(ENTITY, n + 1)], timeout=60)
                for n, s in enumerate(fleet.sessions)
            )
        )
        await fleet.applied.wait((b for r in warm for b in r.batch_ids), 60)
        yield processes, client


def _continue_all(processes: Sequence[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            with suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)


def _answered_by(folder: Path, tag: str) -> dict[str, int]:
    """job id -> index of the worker that answered it, from the workers' JSON logs."""
    answered: dict[str, int] = {}
    for n in range(WORKERS):
        log = folder / f"worker-{tag}-{n}.log"
        for line in log.read_text(errors="replace").splitlines():
            if '"job_id"' not in line:
                continue
            with suppress(ValueError):
                record = json.loads(line)
                if record.get("message") in ("job done", "job rejected"):
                    answered[str(record["job_id"])] = n
    return answered


# Frozen worker: who holds the victim's job.

_LOCKS = """
SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
"""
_HOLDER = """
SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.objid = (hashtext($1)::bigint & 4294967295)::oid
"""


def _socket_inodes(port: int) -> set[str]:
    """Inodes of the loopback TCP sockets whose local port is ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _process_of(port: int, pids: Sequence[int]) -> int | None:
    """Which of ``pids`` has the socket with local port ``port`` open."""
    wanted = {f"socket:[{inode}]" for inode in _socket_inodes(port)}
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        with suppress(OSError):
            for fd in fds.iterdir():
                with suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return pid
    return None


async def _lock_holder(conn: asyncpg.Connection, victim: str, pids: Sequence[int]) -> int | None:
    for row in await conn.fetch(_HOLDER, victim):
        if row["client_port"] is not None:
            pid = await asyncio.to_thread(_process_of, int(row["client_port"]), pids)
            if pid is not None:
                return pid
    return None


async def _unacked(pid: int) -> int | None:
    """Messages delivered to process ``pid`` and not acked yet, over its AMQP channels
    (``rabbitmqctl list_channels``; a channel's name starts with the client's address)."""
    process = await asyncio.create_subprocess_exec(
        *("bash", str(SERVICES), "rabbitmqctl", "-q", "list_channels"),
        *("name", "messages_unacknowledged"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    listing, _ = await process.communicate()
    total: int | None = None
    for line in listing.decode().splitlines():
        found = re.match(r"\S+:(\d+) -> \S+ \(\d+\)\t(\d+)$", line.strip())
        if found and await asyncio.to_thread(_process_of, int(found[1]), [pid]) == pid:
            total = (total or 0) + int(found[2])
    return total


async def _locks_of(conn: asyncpg.Connection, pid: int) -> int:
    """Advisory locks held by the backends of process ``pid``."""
    ports = [row["client_port"] for row in await conn.fetch(_LOCKS)]
    held = [await asyncio.to_thread(_process_of, int(port), [pid]) for port in ports if port]
    return sum(1 for holder in held if holder == pid)


@dataclass
class Freeze:
    pid: int = 0
    method: str = "none"
    held_at_freeze: bool = False
    locks: int = 0  # advisory locks the stopped worker's backends held
    unacked: int | None = None  # jobs delivered to it and unacked, late in the freeze
    stopped: float = 0.0
    continued: float = 0.0


async def _stop_holder(
    conn: asyncpg.Connection,
    victim: str,
    pids: Sequence[int],
    big: Sequence[asyncio.Task[None]],
) -> Freeze:
    """SIGSTOP the worker holding the victim's lock, checked after the stop. For up to
    ``PREFER_FOR`` s, a moment when its backends hold other advisory locks too (jobs of
    other devices in hand) is preferred: the worst case for workers that wait for locks.
    Without any such lock the freeze's ``stopped`` stays 0."""
    deadline = time.perf_counter() + FIND_FOR
    first_seen: float | None = None
    while time.perf_counter() < deadline and not all(task.done() for task in big):
        pid = await _lock_holder(conn, victim, pids)
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)
            stopped = time.perf_counter()
            first_seen = first_seen or stopped
            if await _lock_holder(conn, victim, pids) == pid:
                locks = await _locks_of(conn, pid)
                last_chance = sum(not task.done() for task in big) <= 1
                if locks > 1 or last_chance or stopped - first_seen > PREFER_FOR:
                    return Freeze(pid, "advisory lock", True, locks, stopped=stopped)
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(POLL)
    return Freeze(pids[0], "none", False)


def _fallback(
    freeze: Freeze, folder: Path, tag: str, big: Sequence[Sent], pids: Sequence[int]
) -> None:
    """No lock seen: stop the worker whose log answered a victim job."""
    answered = _answered_by(folder, tag)
    for sent in big:
        if sent.job_id in answered:
            freeze.pid, freeze.method = pids[answered[sent.job_id]], "log (no lock seen)"
            break
    os.kill(freeze.pid, signal.SIGSTOP)
    freeze.stopped = time.perf_counter()


async def _big_job(client: SyncClient, fleet: Fleet, victim: Session, sent: Sent, n: int) -> None:
    ids = fleet.ids[n * BIG_OBJECTS : (n + 1) * BIG_OBJECTS]
    with suppress(TimeoutError):
        sent.result = await client.synchronize_to_device(
            victim, lists=[ObjectList(ENTITY, ids)], job_id=sent.job_id, timeout=JOB_TIMEOUT
        )
        sent.answered = time.perf_counter()


@dataclass(frozen=True)
class Classified:
    """The others' jobs of the frozen scenario, split by what the freeze may delay."""

    held: list[Sent]
    behind: list[Sent]
    clean: list[Sent]


def _classify(
    stream: Sequence[Sent],
    big: Sequence[Sent],
    by_worker: dict[str, int],
    frozen: int,
    freeze: Freeze,
) -> Classified:
    """Held: of the stream jobs the frozen worker answered after SIGSTOP and that were
    published before SIGCONT, the earliest published, as many as it had unacked during
    the freeze less the victim's jobs it held (the broker delivers in order: what it got
    after SIGCONT was published later). Unknown unacked count: all of them."""
    end = time.perf_counter()

    def frozen_had(s: Sent) -> bool:
        return (
            by_worker.get(s.job_id) == frozen
            and s.due < freeze.continued
            and (s.answered or end) > freeze.stopped
        )

    candidates = sorted((s for s in stream if frozen_had(s)), key=lambda s: s.due)
    if freeze.unacked is not None:
        victims = sum(1 for s in big if frozen_had(s))
        candidates = candidates[: max(0, freeze.unacked - victims)]
    held = candidates
    held_ids = {s.job_id for s in held}
    first_held: dict[str, float] = {}
    for s in held:
        first_held[s.device_id] = min(s.due, first_held.get(s.device_id, s.due))
    behind = [
        s
        for s in stream
        if s.job_id not in held_ids
        and first_held.get(s.device_id, end) < s.due < freeze.continued
        and (s.answered or end) > freeze.continued
    ]
    behind_ids = {s.job_id for s in behind}
    clean = [s for s in stream if s.job_id not in held_ids | behind_ids]
    return Classified(held, behind, clean)


def _frozen_figures(
    stream: Sequence[Sent],
    big: Sequence[Sent],
    parts: Classified,
    freeze: Freeze,
    fleet: Fleet,
) -> list[Figure]:
    end = time.perf_counter()
    during = [s for s in parts.clean if freeze.stopped <= s.due <= freeze.continued]
    all_during = [s for s in stream if freeze.stopped <= s.due <= freeze.continued]
    clean, overall = _stats(during, fleet.applied, end), _stats(parts.clean, fleet.applied, end)
    everyone = _stats(all_during, fleet.applied, end)
    everyone_overall = _stats(stream, fleet.applied, end)
    seconds = freeze.continued - freeze.stopped
    setup = (
        f"{WORKERS} workers, {DEVICES - 1} other devices at {FROZEN_RATE:g} jobs/s; the worker "
        f"holding the victim's job (found by {freeze.method}; lock still held when stopped: "
        f"{'yes' if freeze.held_at_freeze else 'no'}; advisory locks it held: "
        f"{freeze.locks}; unacked by it: {freeze.unacked}) stopped {seconds:.1f} s; "
        f"{len(parts.held)} stream jobs held by it and "
        f"{len(parts.behind)} behind those on their devices (answered after SIGCONT)"
    )
    others = f"others (held and behind-held jobs left out); target p99 <= {TARGET_MS:g} ms"
    name = "isolation, frozen worker"
    figures = [
        _ms(f"{name}: others p50 during the freeze", clean.p50, clean, f"{others}; {setup}"),
        _ms(f"{name}: others p99 during the freeze", clean.p99, clean, f"{others}; {setup}"),
        _ms(f"{name}: others max during the freeze", clean.max, clean, f"{others}; {setup}"),
        _ms(f"{name}: others p99 overall", overall.p99, overall, f"{others}; {setup}"),
        _ms(f"{name}: all others p99 during the freeze", everyone.p99, everyone, setup),
        _ms(f"{name}: all others p99 overall", everyone_overall.p99, everyone_overall, setup),
        Figure(
            f"{name}: others' jobs delayed > 1 s",
            "jobs",
            (float(overall.over_1s),),
            kind="info",
            higher_is_better=False,
            note=f"over 5 s: {overall.over_5s}; all others (held included): "
            f"{everyone_overall.over_1s} > 1 s, {everyone_overall.over_5s} > 5 s; {setup}",
            extra={
                "over_5s": overall.over_5s,
                "all_over_1s": everyone_overall.over_1s,
                "all_over_5s": everyone_overall.over_5s,
                "held": len(parts.held),
                "behind_held": len(parts.behind),
                "locks_held_by_stopped_worker": freeze.locks,
            },
        ),
        _victim_figure(big, fleet, end, setup),
    ]
    return figures


def _ms(name: str, value: float, stats: Stats, note: str) -> Figure:
    return Figure(
        name,
        "ms",
        (value,),
        kind="pipeline",
        higher_is_better=False,
        note=f"{stats.count} jobs, {stats.unanswered} unanswered; {note}",
        extra={**stats.extra(), "target_p99_ms": TARGET_MS},
    )


def _victim_figure(big: Sequence[Sent], fleet: Fleet, end: float, setup: str) -> Figure:
    statuses = Counter(s.result.status if s.result else "unanswered" for s in big)
    last = max(_latency(s, fleet.applied, end)[0] for s in big)
    shown = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items()))
    return Figure(
        "isolation, frozen worker: victim's last 5,000-object job",
        "s",
        (last,),
        kind="info",
        higher_is_better=False,
        note=f"{BIG_JOBS} jobs of {BIG_OBJECTS:,} objects: {shown}; {setup}",
        extra={f"jobs_{status}": float(count) for status, count in statuses.items()},
    )


async def frozen(env: dict[str, str], fleet: Fleet, *, freeze_seconds: float) -> list[Figure]:
    victim, others = fleet.sessions[-1], fleet.sessions[:-1]
    tag = "frozen"
    conn = await asyncpg.connect(env["SYNC_DATABASE_URL"])
    try:
        async with _workers(env, fleet, tag) as (processes, client):
            pids = [p.pid for p in processes]
            stream = Stream(client, others, fleet.ids, FROZEN_RATE)
            stop = asyncio.Event()
            running = asyncio.create_task(stream.run(stop, longest=120.0))
            await asyncio.sleep(BEFORE_BIG)
            progress(f"isolation, frozen: {BIG_JOBS} x {BIG_OBJECTS:,} objects for the victim")
            big = [
                Sent(victim.device_id, SyncClient.new_job_id(), time.perf_counter())
                for _ in range(BIG_JOBS)
            ]
            tasks = [
                asyncio.create_task(_big_job(client, fleet, victim, sent, n))
                for n, sent in enumerate(big)
            ]
            freeze = await _stop_holder(conn, victim.device_id, pids, tasks)
            if not freeze.stopped:
                _fallback(freeze, fleet.folder, tag, big, pids)
            progress(f"isolation, frozen: worker {freeze.pid} stopped ({freeze.method})")
            try:
                # Half-way: the broker has filled its prefetch by then, and rabbitmqctl
                # takes a second or two.
                await asyncio.sleep(freeze_seconds / 2)
                freeze.unacked = await _unacked(freeze.pid)
                await asyncio.sleep(max(0.0, freeze.stopped + freeze_seconds - time.perf_counter()))
            finally:
                os.kill(freeze.pid, signal.SIGCONT)
                freeze.continued = time.perf_counter()
            await asyncio.sleep(AFTER_FREEZE)
            stop.set()
            await running
            await stream.settle(SETTLE)
            await asyncio.wait(tasks, timeout=SETTLE)
            for task in tasks:
                task.cancel()
            await _applied_all(fleet, [*stream.sent, *big], SETTLE)
            by_worker = _answered_by(fleet.folder, tag)
    finally:
        await conn.close()
    parts = _classify(stream.sent, big, by_worker, pids.index(freeze.pid), freeze)
    return _frozen_figures(stream.sent, big, parts, freeze, fleet)


# Flood: a device publishing from its own account.


class Flood:
    """Jobs published from a device's own account, each confirmed, results by correlation
    id over direct reply-to."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, session: Session, user: str):
        self.sent: dict[str, Sent] = {}
        self.last_confirmed = 0.0
        self._channel = channel
        self._session = session
        self._user = user
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def start(self) -> None:
        self._exchange = await self._channel.get_exchange(JOBS_EXCHANGE.name, ensure=False)
        replies = await self._channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await replies.consume(self._on_result, no_ack=True)

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        sent = self.sent.get(message.correlation_id or "")
        if sent is not None and sent.result is None:
            sent.result = decode(SyncResult, message.body)
            sent.answered = time.perf_counter()

    def _message(self, object_id: int) -> aio_pika.Message:
        job = SyncJob(
            job_id=SyncClient.new_job_id(),
            session=self._session,
            origin="nanoflow",
            objects=(ObjectRef(ENTITY, object_id),),
        )
        return json_message(
            job.model_dump_json().encode(),
            message_id=job.job_id,
            correlation_id=job.job_id,
            reply_to=DIRECT_REPLY_TO,
            user_id=self._user,
        )

    async def _publish(self, message: aio_pika.Message, due: float) -> None:
        assert self._exchange is not None and message.message_id is not None
        self.sent[message.message_id] = Sent(self._session.device_id, message.message_id, due)
        await self._exchange.publish(message, self._session.device_id, timeout=60)
        self.last_confirmed = max(self.last_confirmed, time.perf_counter())

    def build(self, count: int, ids: Sequence[int]) -> list[aio_pika.Message]:
        rng = random.Random(11)
        return [self._message(rng.choice(ids)) for _ in range(count)]

    async def run(
        self, messages: Sequence[aio_pika.Message], seconds: float
    ) -> tuple[float, float]:
        """``messages`` paced over ``seconds``, at most ``FLOOD_WINDOW`` unconfirmed;
        (first due, last confirm)."""
        gate = asyncio.Semaphore(FLOOD_WINDOW)

        async def one(message: aio_pika.Message, due: float) -> None:
            try:
                await self._publish(message, due)
            finally:
                gate.release()

        start = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for n, message in enumerate(messages):
                due = start + n * seconds / len(messages)
                delay = due - time.perf_counter()
                if delay > 0.002:  # finer sleeps cost more than they pace
                    await asyncio.sleep(delay)
                await gate.acquire()
                group.create_task(one(message, due))
        return start, self.last_confirmed


async def _flood_child(spec: dict[str, Any]) -> list[list[Any]]:
    """The flooding device, run as ``--flood-child SPEC``: a device is a machine of its
    own, so its client's work (20,000 publishes and results) stays out of the event loop
    that times the others' jobs and runs their agents. Talks over stdin/stdout: prints
    ``ready`` once connected with its messages built, floods on ``go`` and prints
    ``published FIRST_DUE LAST_CONFIRM``, and on ``stop`` returns what it sent and got
    (``main`` writes it to ``SPEC.out``). ``time.perf_counter`` is the system's monotonic
    clock, the same in every process."""
    session = Session(user_id=spec["user_id"], device_id=spec["device_id"])
    lines = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lines), sys.stdin)
    async with await connect(spec["url"], "bench-flood") as own:
        flood = Flood(await open_channel(own), session, device_account(session.device_id))
        await flood.start()
        messages = flood.build(spec["count"], spec["ids"])
        print("ready", flush=True)
        await lines.readline()
        started, ended = await flood.run(messages, spec["seconds"])
        print(f"published {started!r} {ended!r}", flush=True)
        await lines.readline()
    return [
        [s.job_id, s.due, s.answered, s.result.model_dump_json() if s.result else None]
        for s in flood.sent.values()
    ]


@asynccontextmanager
async def _flooder(
    env: dict[str, str], fleet: Fleet, session: Session, count: int
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    """The flood's own process, connected and ready; stopped after."""
    url = _account_url(env["SYNC_AMQP_URL"], session.device_id, fleet.secrets[session.device_id])
    spec = fleet.folder / "flood.json"
    spec.write_text(
        json.dumps(
            {
                "url": url,
                "user_id": session.user_id,
                "device_id": session.device_id,
                "count": count,
                "seconds": FLOOD_SECONDS,
                "ids": fleet.ids,
            }
        )
    )
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.isolation", "--flood-child", str(spec)),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        if (await asyncio.wait_for(process.stdout.readline(), 60)).strip() != b"ready":
            raise RuntimeError("the flood process did not start")
        yield process, spec
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _flood(process: asyncio.subprocess.Process) -> tuple[float, float]:
    """Let the flood go; (first due, last confirm) once it is published."""
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"go\n")
    await process.stdin.drain()
    _, started, ended = (await process.stdout.readline()).split()
    return float(started), float(ended)


async def _flood_results(
    process: asyncio.subprocess.Process, spec: Path, device_id: str
) -> list[Sent]:
    """Stop the flood process and read what it sent and got."""
    assert process.stdin is not None
    process.stdin.write(b"stop\n")
    await process.stdin.drain()
    await asyncio.wait_for(process.wait(), 60)
    return [
        Sent(
            device_id,
            job_id,
            due,
            answered,
            decode(SyncResult, result.encode()) if result else None,
        )
        for job_id, due, answered, result in json.loads(spec.with_suffix(".out").read_text())
    ]


def _account_url(amqp_url: str, device_id: str, secret: str) -> str:
    parts = urlsplit(amqp_url)
    user = quote(device_account(device_id), safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{secret}@{parts.hostname}:{parts.port}"))


def _recovered(stream: Sequence[Sent], fleet: Fleet, since: float) -> bool:
    """The others' jobs due in the last ``RECOVERED_SPAN`` s (up to ``RECOVERED_AGE`` s
    ago), after ``since``, all done within the target."""
    now = time.perf_counter()
    window = [
        s
        for s in stream
        if since <= s.due and now - RECOVERED_SPAN - RECOVERED_AGE <= s.due <= now - RECOVERED_AGE
    ]
    if len(window) < RECOVERED_SPAN * FLOOD_RATE_OTHERS / 2:
        return False
    return all(
        done and seconds * 1000 <= TARGET_MS
        for seconds, done in (_latency(s, fleet.applied, now) for s in window)
    )


def _recovery(stream: Sequence[Sent], fleet: Fleet, flood_end: float, end: float) -> float | None:
    """Seconds from ``flood_end`` to the first due time after which every job of the
    others took at most the target; ``None`` if the last one did not."""
    ordered = sorted((s for s in stream if s.due >= flood_end), key=lambda s: s.due)
    recovered: float | None = None
    for sent in ordered:
        seconds, done = _latency(sent, fleet.applied, end)
        if not done or seconds * 1000 > TARGET_MS:
            recovered = None
        elif recovered is None:
            recovered = sent.due
    return None if recovered is None else max(0.0, recovered - flood_end)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "?" if value is None else str(value)


async def _dead_letters(amqp_url: str, limit: float) -> Counter[str]:
    """Reasons of the dead-lettered jobs as 'publisher: reason', emptying the queue
    (bounded by ``limit`` s)."""
    reasons: Counter[str] = Counter()
    connection = await connect(amqp_url, "bench-isolation-dead")
    try:
        channel = await open_channel(connection, prefetch=1000)
        queue = await channel.get_queue(DEAD_JOBS_QUEUE.name)
        with suppress(TimeoutError):
            async with asyncio.timeout(limit), queue.iterator(timeout=2) as messages:
                async for message in messages:
                    headers = message.headers or {}
                    user, reason = (
                        _text(headers.get(USER_HEADER)),
                        _text(headers.get(REASON_HEADER)),
                    )
                    reasons[f"{user}: {reason}"] += 1
                    await message.ack()
    finally:
        await connection.close()
    return reasons


@dataclass
class FloodRun:
    stream: list[Sent] = field(default_factory=list)
    flood: list[Sent] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    stopped: float = 0.0
    dead_before: int = 0
    dead_after: int = 0
    dead: Counter[str] = field(default_factory=Counter)


async def _flood_run(env: dict[str, str], fleet: Fleet, count: int, recover_max: float) -> FloodRun:
    flooder, others = fleet.sessions[-1], fleet.sessions[:-1]
    run = FloodRun(dead_before=await _depth(env["SYNC_AMQP_URL"], DEAD_JOBS_QUEUE.name))
    async with (
        _workers(env, fleet, "flood") as (_, client),
        _flooder(env, fleet, flooder, count) as (process, spec),
    ):
        stream = Stream(client, others, fleet.ids, FLOOD_RATE_OTHERS)
        stop = asyncio.Event()
        running = asyncio.create_task(stream.run(stop, longest=FLOOD_SECONDS + recover_max + 30))
        await asyncio.sleep(BEFORE_FLOOD)
        progress(
            f"isolation, flood: {count:,} jobs in {FLOOD_SECONDS:g} s from the device's account"
        )
        run.started, run.ended = await _flood(process)
        progress(f"isolation, flood: published in {run.ended - run.started:.1f} s; recovering")
        deadline = run.ended + recover_max
        # A condition over the results so far: nothing to be notified by.
        while time.perf_counter() < deadline and not _recovered(stream.sent, fleet, run.ended):  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        stop.set()
        await running
        run.stopped = time.perf_counter()
        await stream.settle(min(SETTLE, 5.0))
        flood = await _flood_results(process, spec, flooder.device_id)
        await _applied_all(fleet, [*stream.sent, *flood], 5.0)
        run.stream, run.flood = stream.sent, flood
    run.dead_after = await _depth(env["SYNC_AMQP_URL"], DEAD_JOBS_QUEUE.name)
    run.dead = await _dead_letters(env["SYNC_AMQP_URL"], 30.0)
    return run


def _flood_figures(run: FloodRun, fleet: Fleet, count: int) -> list[Figure]:
    end = run.stopped
    during = [s for s in run.stream if run.started <= s.due <= run.ended]
    flood_stats, overall = (
        _stats(during, fleet.applied, end),
        _stats(run.stream, fleet.applied, end),
    )
    recovery = _recovery(run.stream, fleet, run.ended, end)
    outcomes = Counter(
        f"{s.result.status}: {s.result.reason}"
        if s.result and s.result.reason
        else (s.result.status if s.result else "unanswered")
        for s in run.flood
    )
    applied = sum(
        1
        for s in run.flood
        if _latency(s, fleet.applied, end)[1] and s.result and s.result.batch_ids
    )
    setup = (
        f"{WORKERS} workers; {DEVICES - 1} other devices at {FLOOD_RATE_OTHERS:g} jobs/s; one "
        f"device published {count:,} one-object jobs from its own account in "
        f"{run.ended - run.started:.1f} s"
    )
    others = f"others' jobs due during the flood; target p99 <= {TARGET_MS:g} ms"
    name = "isolation, flood"
    shown = ", ".join(f"{n} {what}" for what, n in outcomes.most_common())
    dead = ", ".join(f"{n} {what}" for what, n in run.dead.most_common(5)) or "none"
    return [
        _ms(
            f"{name}: others p50 during the flood",
            flood_stats.p50,
            flood_stats,
            f"{others}; {setup}",
        ),
        _ms(
            f"{name}: others p99 during the flood",
            flood_stats.p99,
            flood_stats,
            f"{others}; {setup}",
        ),
        _ms(
            f"{name}: others max during the flood",
            flood_stats.max,
            flood_stats,
            f"{others}; {setup}",
        ),
        _ms(f"{name}: others p99 overall", overall.p99, overall, f"all the others' jobs; {setup}"),
        Figure(
            f"{name}: others recovered after the flood",
            "s",
            (recovery if recovery is not None else end - run.ended,),
            kind="info",
            higher_is_better=False,
            note=("" if recovery is not None else "NOT recovered: the time waited; ")
            + f"from the flood's last publish until every job of the others took <= 1 s; {setup}",
            extra={"recovered": float(recovery is not None)},
        ),
        Figure(
            f"{name}: flood jobs answered",
            "jobs",
            (float(count - sum(1 for s in run.flood if s.result is None)),),
            kind="info",
            note=f"results: {shown}; {applied} jobs' batches applied on the device; "
            f"sync.jobs.dead {run.dead_before} before, {run.dead_after} after; dead-lettered "
            f"(publisher: reason): {dead}; {setup}",
            extra={
                **{f"result {what}": float(n) for what, n in outcomes.items()},
                "applied_on_device": float(applied),
                "dead_jobs_before": float(run.dead_before),
                "dead_jobs_after": float(run.dead_after),
            },
        ),
        Figure(
            f"{name}: sync.jobs.dead depth after",
            "messages",
            (float(run.dead_after),),
            kind="info",
            higher_is_better=False,
            note=f"before: {run.dead_before}; dead-lettered (publisher: reason): {dead}",
            extra={f"dead {what}": float(n) for what, n in run.dead.items()},
        ),
    ]


async def flood(
    env: dict[str, str], fleet: Fleet, *, count: int, recover_max: float
) -> list[Figure]:
    run = await _flood_run(env, fleet, count, recover_max)
    return _flood_figures(run, fleet, count)


async def isolation(
    env: dict[str, str],
    *,
    scenarios: Sequence[str] = ("frozen", "flood"),
    freeze_seconds: float = 10.0,
    flood_jobs: int = 20_000,
    recover_max: float = 90.0,
) -> list[Figure]:
    """The frozen-worker and flood scenarios' figures."""
    await declare_jobs_topology(env["SYNC_AMQP_URL"])
    progress(f"isolation: seeding {SEEDED:,} work orders, {DEVICES} devices with agents")
    ids = await seed_work_orders(env["SYNC_DATABASE_URL"], SEEDED)
    folder = Path(tempfile.mkdtemp(prefix="bench-isolation-"))
    figures: list[Figure] = []
    try:
        async with _fleet(env, ids, folder) as fleet:
            if "frozen" in scenarios:
                started = time.perf_counter()
                figures += await frozen(env, fleet, freeze_seconds=freeze_seconds)
                progress(f"isolation, frozen: {time.perf_counter() - started:.0f} s")
            if "flood" in scenarios:
                started = time.perf_counter()
                figures += await flood(env, fleet, count=flood_jobs, recover_max=recover_max)
                progress(f"isolation, flood: {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenarios", nargs="+", choices=["frozen", "flood"], default=["frozen", "flood"]
    )
    parser.add_argument("--freeze", type=float, default=10.0, help="s the worker stays stopped")
    parser.add_argument("--flood", type=int, default=20_000, help="jobs the device floods")
    parser.add_argument("--recover-max", type=float, default=90.0)
    parser.add_argument("--flood-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_child:
        spec = json.loads(args.flood_child.read_text())
        sent = asyncio.run(_flood_child(spec))
        args.flood_child.with_suffix(".out").write_text(json.dumps(sent))
        return
    started = time.perf_counter()
    figures = asyncio.run(
        isolation(
            service_env(),
            scenarios=args.scenarios,
            freeze_seconds=args.freeze,
            flood_jobs=args.flood,
            recover_max=args.recover_max,
        )
    )
    print(as_table(figures))
    for figure in figures:
        print(f"{figure.name}: {figure.note}")
    print(f"(ran {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
