"""``sync-agent --device ID --db PATH``: apply the device's change batches until SIGTERM."""

from __future__ import annotations

import argparse

from broker.connection import connect
from broker.runtime import run_service
from device_agent.agent import device_queue, open_store, run_agent
from device_agent.settings import AgentSettings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sync-agent", description=__doc__)
    parser.add_argument("--device", dest="device_id", help="device id (SYNC_DEVICE_ID)")
    parser.add_argument("--db", dest="db_path", help="SQLite file (SYNC_DB_PATH)")
    parser.add_argument("--amqp-url", help="RabbitMQ URL (SYNC_AMQP_URL)")
    parser.add_argument("--prefetch", type=int, help="batches fetched ahead (SYNC_PREFETCH)")
    parser.add_argument(
        "--group-batches",
        type=int,
        help="batches applied in one SQLite transaction, at most (SYNC_GROUP_BATCHES)",
    )
    parser.add_argument(
        "--group-changes",
        type=int,
        help="changes a group stops growing at (SYNC_GROUP_CHANGES)",
    )
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


async def check(settings: AgentSettings) -> None:
    """Can this agent open its database and reach its queue?"""
    store = await open_store(settings.db_path)
    await store.close()
    name = f"sync-agent:{settings.device_id}:check"
    async with await connect(settings.amqp_url, name) as connection:
        await device_queue(connection, settings)


def main(argv: list[str] | None = None) -> None:
    run_service(_parser(), AgentSettings, check=check, serve=run_agent, argv=argv)
