"""``sync-agent --device ID --db PATH``: apply the device's change batches until SIGTERM."""

from __future__ import annotations

import argparse
import sys

from broker.connection import connect
from broker.errors import ProgramError
from broker.health import operations_endpoint
from broker.logs import configure_logging
from broker.runtime import run_program, until_signal
from broker.settings import load_settings
from device_agent.agent import DeviceAgent, device_queue, open_store
from device_agent.settings import AgentSettings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sync-agent", description=__doc__)
    parser.add_argument("--device", dest="device_id", help="device id (SYNC_DEVICE_ID)")
    parser.add_argument("--db", dest="db_path", help="SQLite file (SYNC_DB_PATH)")
    parser.add_argument("--amqp-url", help="RabbitMQ URL (SYNC_AMQP_URL)")
    parser.add_argument("--prefetch", type=int, help="batches fetched ahead (SYNC_PREFETCH)")
    parser.add_argument(
        "--metrics-port", type=int, help="serve /metrics, /healthz, /readyz (SYNC_METRICS_PORT)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="health check: the database opens, the broker takes the login, the queue is "
        "there; exit 0 or 1",
    )
    return parser


async def check(settings: AgentSettings) -> int:
    """Can this agent open its database and reach its queue?"""
    try:
        store = await open_store(settings.db_path)
        await store.close()
        connection = await connect(settings.amqp_url, f"sync-agent:{settings.device_id}:check")
        async with connection:
            await device_queue(connection, settings)
    except ProgramError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)

    async def program() -> int:
        settings = load_settings(AgentSettings, args, parser)
        configure_logging(log_format=settings.log_format)
        if args.check:
            return await check(settings)
        agent = await DeviceAgent.start(settings)
        async with operations_endpoint(settings, agent.readiness):
            await until_signal(agent.run)
        return 0

    run_program("sync-agent", program)
