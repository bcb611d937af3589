"""``sync-worker``: consume sync jobs until SIGTERM."""

from __future__ import annotations

import argparse
import sys

from broker.connection import connect, open_channel
from broker.errors import ProgramError
from broker.logs import configure_logging
from broker.runtime import run_program, until_signal
from broker.settings import load_settings
from broker.topology import JOBS_QUEUE
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


async def check(settings: WorkerSettings) -> int:
    """Does the model load and match the database, and is the jobs queue there?"""
    try:
        model = await load_model(settings.model_path())
        conn = await connect_database(settings.database_url)
        try:
            await check_schema(conn, model)
        finally:
            await conn.close()
        connection = await connect(settings.amqp_url, f"{settings.name}:check")
        async with connection:
            channel = await open_channel(connection)
            await channel.declare_queue(JOBS_QUEUE.name, passive=True)
    except ProgramError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)

    async def program() -> int:
        settings = load_settings(WorkerSettings, args, parser)
        configure_logging(log_format=settings.log_format)
        if args.check:
            return await check(settings)
        await until_signal(lambda stop: run_worker(settings, stop))
        return 0

    run_program("sync-worker", program)
