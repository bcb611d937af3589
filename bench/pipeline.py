"""A first end-to-end figure: one worker and one agent on the local services.

    .venv/bin/python -m bench.pipeline [--objects 10000] [--jobs 500] [--runs 3]

Prints the median of several runs for: a bulk list job (objects/s from publish to rows
committed on the device) and a stream of single-object jobs (jobs/s until the last one
is applied). The full benchmark suite with the raw ceilings is the benchmarks issue's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from broker import ObjectList, ObjectRef, Session, SyncClient
from broker.connection import connect, open_channel
from device_agent import AgentSettings, DeviceAgent, OfflineStore
from syncctl.accounts import BrokerAccounts
from syncctl.devices import register_device
from worker import Worker, WorkerSettings, load_model
from worker.schema import init_database
from worker.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "field_service.yaml"
USER = 900


def accounts(env: dict[str, str]) -> BrokerAccounts:
    """Device accounts on the local broker, managed with the services' operator account."""
    return BrokerAccounts(ServerSettings().management_url, env["SYNC_AMQP_URL"])


def service_env() -> dict[str, str]:
    script = ROOT / "scripts" / "services.sh"
    subprocess.run(["bash", str(script), "start"], check=True, capture_output=True)
    lines = subprocess.run(
        ["bash", str(script), "env"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    return dict(line.removeprefix("export ").split("=", 1) for line in lines)


async def _seed(database_url: str, count: int) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        await init_database(conn, await load_model(MODEL), create_tables=True)
        # The bench owns the local services' work orders while it runs (the demo reseeds).
        await conn.execute("TRUNCATE work_order RESTART IDENTITY")
        await conn.execute("DELETE FROM sync.user_role WHERE user_id = $1", USER)
        await conn.execute("INSERT INTO sync.user_role VALUES ($1, 'Dispatcher')", USER)
        rows = await conn.fetch(
            "INSERT INTO work_order (title, status, amount) "
            "SELECT 'order ' || g, 'Open', g FROM generate_series(1, $1) g RETURNING id",
            count,
        )
    finally:
        await conn.close()
    return [row["id"] for row in rows]


async def _run_once(env: dict[str, str], ids: list[int], jobs: int) -> tuple[float, float]:
    amqp_url, database_url = env["SYNC_AMQP_URL"], env["SYNC_DATABASE_URL"]
    device_id = f"bench-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database_url)
    connection = await connect(amqp_url, "bench")
    await register_device(conn, await open_channel(connection), accounts(env), device_id, USER)
    await conn.close()
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    settings = WorkerSettings(amqp_url=amqp_url, database_url=database_url, model=MODEL)
    worker = await Worker.start(settings)
    stop = asyncio.Event()
    agent = await DeviceAgent.start(
        AgentSettings(amqp_url=amqp_url, device_id=device_id, db_path=folder / "d.sqlite")
    )
    agent_task = asyncio.create_task(agent.run(stop))
    store = await OfflineStore.open(folder / "d.sqlite")
    session = Session(user_id=USER, device_id=device_id)
    async with await SyncClient.connect(amqp_url, name="bench") as client:
        started = time.perf_counter()
        result = await client.synchronize_to_device(
            session, lists=[ObjectList("WorkOrder", ids)], timeout=300
        )
        await store.wait_for_batches(result.batch_ids, timeout=300)
        bulk = len(ids) / (time.perf_counter() - started)

        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                client.synchronize_to_device(
                    session, objects=[ObjectRef("WorkOrder", ids[n % len(ids)])], timeout=120
                )
                for n in range(jobs)
            )
        )
        await store.wait_for_batches([batch for r in results for batch in r.batch_ids], timeout=120)
        small = jobs / (time.perf_counter() - started)
    stop.set()
    await agent_task
    await store.close()
    await worker.stop()
    channel = await open_channel(connection)
    await channel.queue_delete(f"device.{device_id}")
    await connection.close()
    return bulk, small


async def main(objects: int, jobs: int, runs: int) -> None:
    env = service_env()
    ids = await _seed(env["SYNC_DATABASE_URL"], objects)
    figures = [await _run_once(env, ids, jobs) for _ in range(runs)]
    bulk = statistics.median(f[0] for f in figures)
    small = statistics.median(f[1] for f in figures)
    print(f"bulk list job, {objects} objects, 1 worker + 1 agent: {bulk:,.0f} objects/s")
    print(f"single-object jobs, {jobs} in flight, same set-up:   {small:,.0f} jobs/s")
    print(f"(median of {runs} runs; every figure includes broker, database and SQLite fsyncs)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.objects, args.jobs, args.runs))
