"""Fleet: what an idle device queue costs the broker in memory.

    .venv/bin/python -m bench.fleet [--devices 10000]

Declares ``--devices`` device queues with their binding exactly as registration does
(``declare_device_queue``: both changes exchanges, the durable classic v2 queue, its
binding), over several channels at once, and inserts the matching ``sync.device`` rows in
one statement. It does not create the devices' AMQP accounts: registration would add one
user and its permissions per device to the broker's user database, which is not counted.

Memory is the Erlang VM's allocated total (``erlang:memory(total)``, i.e. the sum of
``erlang_vm_memory_bytes_total`` over ``kind="processes"`` and ``kind="system"`` on the
Prometheus endpoint), read after the queues have had a few seconds to go idle and a
garbage collection of every broker process (``rabbitmqctl eval``). The process RSS
(``rabbitmq_process_resident_memory_bytes``) is reported alongside: it lags, because the
VM's allocators keep freed carriers. Every queue and row is removed at the end, even on
failure, and the memory after the clean-up is reported too. Other clients of the same
broker (another benchmark, the tests) move these figures; run it on a quiet broker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

import asyncpg
import httpx
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from bench.report import Figure, as_table, progress
from bench.rig import ROOT, ensure_sync_schema, service_env
from broker.connection import connect, open_channel
from broker.topology import declare_device_queue, delete_device_queue
from worker.devices import delete_devices, save_devices

__all__ = ["MB", "Memory", "broker_memory", "fleet", "main", "prometheus_url"]

PREFIX = "bench-fleet-"
USER_ID = 1
CHANNELS = 16  # declarations in flight at once, one per channel (AMQP RPCs are serial)
SETTLE = 5.0  # s for the queues to go idle (classic queues hibernate after ~1-10 s idle)
GC_ALL = "[erlang:garbage_collect(P) || P <- erlang:processes()], ok."
MB = 1024 * 1024


@dataclass(frozen=True)
class Memory:
    """The broker's memory, in bytes, and what it holds, from one Prometheus scrape."""

    vm: float  # erlang:memory(total): processes + system
    rss: float  # rabbitmq_process_resident_memory_bytes
    queue_processes: float  # rabbitmq_queue_process_memory_bytes (refreshed every ~5 s)
    ets: float
    binary: float  # the binary heap: socket buffers live here
    connections: float
    channels: float
    consumers: float
    open_fds: float

    @classmethod
    def parse(cls, text: str) -> Memory:
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return cls(
            vm=samples['erlang_vm_memory_bytes_total{kind="processes"}']
            + samples['erlang_vm_memory_bytes_total{kind="system"}'],
            rss=samples["rabbitmq_process_resident_memory_bytes"],
            queue_processes=samples["rabbitmq_queue_process_memory_bytes"],
            ets=samples['erlang_vm_memory_system_bytes_total{usage="ets"}'],
            binary=samples['erlang_vm_memory_system_bytes_total{usage="binary"}'],
            connections=samples["rabbitmq_connections"],
            channels=samples["rabbitmq_channels"],
            consumers=samples["rabbitmq_consumers"],
            open_fds=samples["rabbitmq_process_open_fds"],
        )


def prometheus_url(env: Mapping[str, str]) -> str:
    """The broker's Prometheus endpoint: ``SYNC_PROMETHEUS_URL``, else the services' port
    (``SYNC_PROM_PORT``, 15693 unless moved)."""
    port = env.get("SYNC_PROM_PORT", os.environ.get("SYNC_PROM_PORT", "15693"))
    return env.get("SYNC_PROMETHEUS_URL", f"http://127.0.0.1:{port}/metrics")


async def _garbage_collect() -> None:
    """Collect every process of the broker, so garbage from the declarations is not
    counted; optional, the figures are only noisier without it."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(ROOT / "scripts" / "services.sh"),
        *("rabbitmqctl", "-q", "eval", GC_ALL),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        progress(f"broker garbage collection failed (ignored): {stderr.decode().strip()}")


async def broker_memory(client: httpx.AsyncClient, url: str, *, settle: float = SETTLE) -> Memory:
    """The broker's memory after ``settle`` seconds and a garbage collection."""
    await asyncio.sleep(settle)
    await _garbage_collect()
    response = await client.get(url)
    response.raise_for_status()
    memory = Memory.parse(response.text)
    progress(f"broker memory {memory.vm / MB:,.1f} MB (VM), RSS {memory.rss / MB:,.1f} MB")
    return memory


async def _each(
    connection: AbstractRobustConnection,
    device_ids: list[str],
    action: Callable[[AbstractChannel, str], Awaitable[object]],
) -> float:
    """Seconds to run ``action`` for every device id, over ``CHANNELS`` channels at once."""
    channels = [await open_channel(connection) for _ in range(min(CHANNELS, len(device_ids)))]
    pending: Iterator[str] = iter(device_ids)

    async def drain(channel: AbstractChannel) -> None:
        for device_id in pending:  # shared: each id is taken by exactly one channel
            await action(channel, device_id)

    try:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:  # one failing cancels the others
            for channel in channels:
                group.create_task(drain(channel))
        return time.perf_counter() - started
    finally:
        for channel in channels:
            if not channel.is_closed:
                await channel.close()


async def _insert_devices(conn: asyncpg.Connection, device_ids: list[str]) -> None:
    await ensure_sync_schema(conn)
    await save_devices(conn, device_ids, USER_ID)


@dataclass(frozen=True)
class _Measured:
    before: Memory
    after: Memory
    cleaned: Memory
    declare_s: float
    delete_s: float


async def _measure(env: dict[str, str], device_ids: list[str]) -> _Measured:
    url = prometheus_url(env)
    async with httpx.AsyncClient(timeout=30) as client:
        before = await broker_memory(client, url, settle=0)
        conn = await asyncpg.connect(env["SYNC_DATABASE_URL"])
        connection = await connect(env["SYNC_AMQP_URL"], "bench-fleet")
        delete_s = float("nan")
        try:
            await _insert_devices(conn, device_ids)
            progress(f"declaring {len(device_ids):,} device queues over {CHANNELS} channels")
            declare_s = await _each(connection, device_ids, declare_device_queue)
            progress(f"declared in {declare_s:.1f} s; letting them go idle")
            after = await broker_memory(client, url)
        finally:
            progress("cleaning up: deleting the queues and the sync.device rows")
            try:
                delete_s = await _each(connection, device_ids, delete_device_queue)
            finally:
                await delete_devices(conn, device_ids)
                await connection.close()
                await conn.close()
        cleaned = await broker_memory(client, url)
    return _Measured(before, after, cleaned, declare_s, delete_s)


async def fleet(env: dict[str, str], *, devices: int = 10_000) -> list[Figure]:
    """Broker memory per idle device queue and the time to declare them (kind "info")."""
    device_ids = [f"{PREFIX}{n:05d}" for n in range(1, devices + 1)]
    m = await _measure(env, device_ids)
    vm_delta = m.after.vm - m.before.vm
    rss_delta = m.after.rss - m.before.rss
    scope = (
        f"{devices:,} device queues + bindings as registration declares them; "
        "no AMQP accounts created"
    )
    memory = (
        "erlang:memory(total) (Prometheus erlang_vm_memory_bytes_total, processes + system) "
        f"after {SETTLE:.0f} s idle and a GC of every broker process"
    )
    extra = {
        "devices": float(devices),
        "vm_before_mb": m.before.vm / MB,
        "vm_after_mb": m.after.vm / MB,
        "vm_after_cleanup_mb": m.cleaned.vm / MB,
        "rss_before_mb": m.before.rss / MB,
        "rss_after_mb": m.after.rss / MB,
        "rss_after_cleanup_mb": m.cleaned.rss / MB,
        "rss_kb_per_queue": rss_delta / 1024 / devices,
        "queue_process_delta_mb": (m.after.queue_processes - m.before.queue_processes) / MB,
        "ets_delta_mb": (m.after.ets - m.before.ets) / MB,
    }
    cleanup = (
        f"after clean-up {m.cleaned.vm / MB:,.1f} MB VM (before {m.before.vm / MB:,.1f}), "
        f"RSS {m.cleaned.rss / MB:,.1f} MB (before {m.before.rss / MB:,.1f})"
    )
    return [
        Figure(
            f"fleet: broker memory, {devices:,} idle device queues",
            "MB",
            (vm_delta / MB,),
            kind="info",
            higher_is_better=False,
            note=f"{scope}; {memory}; {cleanup}",
            extra=extra,
        ),
        Figure(
            "fleet: broker memory per idle device queue",
            "KB",
            (vm_delta / 1024 / devices,),
            kind="info",
            higher_is_better=False,
            note=f"{scope}; {memory}; RSS: {rss_delta / 1024 / devices:,.1f} KB per queue",
            extra=extra,
        ),
        Figure(
            f"fleet: declare {devices:,} device queues",
            "s",
            (m.declare_s,),
            kind="info",
            higher_is_better=False,
            note=f"declare_device_queue over {CHANNELS} channels at once (4 AMQP RPCs each); "
            f"deleting them took {m.delete_s:.1f} s",
            extra={"queues_per_s": devices / m.declare_s, "delete_s": m.delete_s},
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    args = parser.parse_args()
    env = service_env()
    started = time.perf_counter()
    figures = asyncio.run(fleet(env, devices=args.devices))
    progress(f"fleet done in {time.perf_counter() - started:.1f} s")
    print(as_table(figures))
    for figure in figures:
        print(f"{figure.name}: {figure.note}")


if __name__ == "__main__":
    main()
