"""``sync-worker``: consume sync jobs until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from broker.connection import connect, open_channel
from broker.runtime import configure_logging, given_flags, run_until_signal
from broker.topology import JOBS_QUEUE
from worker.app import run_worker
from worker.settings import WorkerSettings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sync-worker", description=__doc__)
    parser.add_argument("--amqp-url", help="RabbitMQ URL (SYNC_AMQP_URL)")
    parser.add_argument("--database-url", help="PostgreSQL URL (SYNC_DATABASE_URL)")
    parser.add_argument("--model", help="domain model YAML file (SYNC_MODEL)")
    parser.add_argument("--name", help="connection name shown by the broker")
    parser.add_argument("--prefetch", type=int, help="jobs in hand at once (SYNC_PREFETCH)")
    parser.add_argument("--check", action="store_true", help="health check: exit 0 or 1")
    return parser


def settings_from(args: argparse.Namespace) -> WorkerSettings:
    return WorkerSettings(**given_flags(args))


async def check(settings: WorkerSettings) -> bool:
    """Can this worker reach PostgreSQL and the jobs queue?"""
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=5)
        await conn.close()
        connection = await connect(settings.amqp_url, f"{settings.name}:check")
        async with connection:
            channel = await open_channel(connection)
            await channel.declare_queue(JOBS_QUEUE.name, passive=True)
    except Exception as error:  # any failure means unhealthy; say which
        print(f"unhealthy: {error!r}", file=sys.stderr)
        return False
    print("healthy")
    return True


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure_logging()
    settings = settings_from(args)
    if args.check:
        sys.exit(0 if asyncio.run(check(settings)) else 1)
    run_until_signal(lambda stop: run_worker(settings, stop))
