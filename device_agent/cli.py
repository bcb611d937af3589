"""``sync-agent --device ID --db PATH``: apply the device's change batches until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import sys

from broker.connection import connect, open_channel
from broker.runtime import configure_logging, given_flags, run_until_signal
from broker.topology import device_queue_name
from device_agent.agent import DeviceAgent
from device_agent.settings import AgentSettings
from device_agent.store import OfflineStore

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sync-agent", description=__doc__)
    parser.add_argument("--device", dest="device_id", help="device id (SYNC_DEVICE_ID)")
    parser.add_argument("--db", dest="db_path", help="SQLite file (SYNC_DB_PATH)")
    parser.add_argument("--amqp-url", help="RabbitMQ URL (SYNC_AMQP_URL)")
    parser.add_argument("--prefetch", type=int, help="batches fetched ahead (SYNC_PREFETCH)")
    parser.add_argument("--check", action="store_true", help="health check: exit 0 or 1")
    return parser


async def check(settings: AgentSettings) -> bool:
    """Can this agent open its database and reach its queue?"""
    try:
        store = await OfflineStore.open(settings.db_path)
        await store.close()
        connection = await connect(settings.amqp_url, f"sync-agent:{settings.device_id}:check")
        async with connection:
            channel = await open_channel(connection)
            await channel.declare_queue(device_queue_name(settings.device_id), passive=True)
    except Exception as error:  # any failure means unhealthy; say which
        print(f"unhealthy: {error!r}", file=sys.stderr)
        return False
    print("healthy")
    return True


async def _run(settings: AgentSettings, stop: asyncio.Event) -> None:
    agent = await DeviceAgent.start(settings)
    await agent.run(stop)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure_logging()
    settings = AgentSettings(**given_flags(args))
    if args.check:
        sys.exit(0 if asyncio.run(check(settings)) else 1)
    run_until_signal(lambda stop: _run(settings, stop))
