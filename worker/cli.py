"""``sync-worker``: consume sync jobs until SIGTERM."""

from __future__ import annotations

import argparse

from broker.connection import connect
from broker.runtime import run_service
from broker.topology import JOBS_QUEUE, existing_queue
from worker.app import run_worker
from worker.database import connect as connect_database
from worker.model import load_model
from worker.schema_check import check_schema
from worker.settings import WorkerSettings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sync-worker", description=__doc__)
    parser.add_argument("--amqp-url", help="RabbitMQ URL (SYNC_AMQP_URL)")
    parser.add_argument("--database-url", help="PostgreSQL URL (SYNC_DATABASE_URL)")
    parser.add_argument("--model", help="domain model YAML file (SYNC_MODEL)")
    parser.add_argument("--name", help="connection name shown by the broker")
    parser.add_argument("--prefetch", type=int, help="jobs in hand at once (SYNC_PREFETCH)")
    parser.add_argument(
        "--metrics-port", type=int, help="serve /metrics, /healthz, /readyz (SYNC_METRICS_PORT)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="health check: the model loads and matches the database, the broker answers; "
        "exit 0 or 1",
    )
    return parser


async def check(settings: WorkerSettings) -> None:
    """Does the model load and match the database, and is the jobs queue there?"""
    model = await load_model(settings.model_path())
    conn = await connect_database(settings.database_url)
    try:
        await check_schema(conn, model)
    finally:
        await conn.close()
    async with await connect(settings.amqp_url, f"{settings.name}:check") as connection:
        await existing_queue(connection, JOBS_QUEUE.name, hint="run `syncctl topology declare`")


def main(argv: list[str] | None = None) -> None:
    run_service(_parser(), WorkerSettings, check=check, serve=run_worker, argv=argv)
