"""``syncctl``: set up the database and topology, manage devices, sync, status, demo."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from aio_pika.abc import AbstractChannel

from broker.accounts import device_account
from broker.client import SyncClient
from broker.connection import connect, open_channel
from broker.models import ObjectRef, Session
from broker.runtime import configure_logging, given_flags
from broker.topology import DEAD_JOBS_QUEUE, JOBS_QUEUE, declare_topology
from syncctl.accounts import BrokerAccounts
from syncctl.devices import list_devices, register_device, unregister_device
from worker.model import ModelError, load_model
from worker.schema import create_worker_role, init_database
from worker.settings import ServerSettings

__all__ = ["main"]


@asynccontextmanager
async def _channel(settings: ServerSettings) -> AsyncIterator[AbstractChannel]:
    connection = await connect(settings.amqp_url, "syncctl")
    async with connection:
        yield await open_channel(connection)


def _accounts(settings: ServerSettings) -> BrokerAccounts:
    return BrokerAccounts(settings.management_url, settings.amqp_url)


async def db_init(args: argparse.Namespace, settings: ServerSettings) -> int:
    model = await load_model(settings.model)
    conn = await asyncpg.connect(settings.database_url)
    try:
        tables = await init_database(conn, model, create_tables=args.create_tables)
        if args.worker_role:
            password = settings.worker_db_password
            if not password:
                print("--worker-role needs SYNC_WORKER_DB_PASSWORD", file=sys.stderr)
                return 2
            await create_worker_role(conn, model, args.worker_role, password)
    finally:
        await conn.close()
    print(f"sync schema ready; version trigger on {len(tables)} tables: {', '.join(tables)}")
    if args.worker_role:
        print(f"worker role {args.worker_role}: reads the app tables, writes no app data")
    return 0


async def topology_declare(args: argparse.Namespace, settings: ServerSettings) -> int:
    async with _channel(settings) as channel:
        await declare_topology(channel)
    print("topology declared: sync.jobs, sync.jobs.dead, sync.changes")
    return 0


async def device_add(args: argparse.Namespace, settings: ServerSettings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with _channel(settings) as channel:
            secret = await register_device(
                conn, channel, _accounts(settings), args.device, args.user, offline=not args.online
            )
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    finally:
        await conn.close()
    print(f"device {args.device} registered for user {args.user}")
    # Printed once, to stdout only: the device's agent and app log in with it.
    print(f"amqp user: {device_account(args.device)}\namqp secret: {secret}")
    return 0


async def device_remove(args: argparse.Namespace, settings: ServerSettings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with _channel(settings) as channel:
            found = await unregister_device(conn, channel, _accounts(settings), args.device)
    finally:
        await conn.close()
    print(f"device {args.device} {'removed' if found else 'was not registered'}")
    return 0 if found else 1


async def device_list(args: argparse.Namespace, settings: ServerSettings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        for device in await list_devices(conn):
            line = f"{device['device_id']}\tuser={device['user_id']}\t"
            line += "offline" if device["offline"] else "online"
            if device["resync_reason"]:
                line += f"\tneeds-resync={device['resync_reason']} since {device['resync_since']}"
            print(line)
    finally:
        await conn.close()
    return 0


def _ref(text: str) -> ObjectRef:
    entity, _, object_id = text.partition(":")
    return ObjectRef(entity, int(object_id))


async def sync(args: argparse.Namespace, settings: ServerSettings) -> int:
    async with await SyncClient.connect(settings.amqp_url, name="syncctl") as client:
        result = await client.synchronize_to_device(
            Session(user_id=args.user, device_id=args.device),
            objects=[_ref(text) for text in args.objects],
            deleted=[_ref(text) for text in args.deleted],
            new=[_ref(text) for text in args.new],
            origin=args.origin,
            timeout=args.timeout,
        )
    print(result.model_dump_json(indent=2))
    return 0 if result.status != "rejected" else 1


async def status(args: argparse.Namespace, settings: ServerSettings) -> int:
    async with _channel(settings) as channel:
        for name in (JOBS_QUEUE.name, DEAD_JOBS_QUEUE.name):
            queue = await channel.declare_queue(name, passive=True)
            print(
                f"{name}\tmessages={queue.declaration_result.message_count}"
                f"\tconsumers={queue.declaration_result.consumer_count}"
            )
    return 0


async def demo(args: argparse.Namespace, settings: ServerSettings) -> int:
    from syncctl.demo import run_demo  # the demo pulls in worker and agent code

    await run_demo(settings, workdir=args.workdir)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncctl", description=__doc__)
    parser.add_argument("--amqp-url", help="RabbitMQ URL (SYNC_AMQP_URL)")
    parser.add_argument("--database-url", help="PostgreSQL URL (SYNC_DATABASE_URL)")
    parser.add_argument("--model", help="domain model YAML file (SYNC_MODEL)")
    commands = parser.add_subparsers(dest="command", required=True)

    db = commands.add_parser("db").add_subparsers(dest="action", required=True)
    init = db.add_parser("init", help="create the sync schema and version triggers")
    init.add_argument("--create-tables", action="store_true", help="create missing app tables")
    init.add_argument(
        "--worker-role",
        metavar="NAME",
        help="create the workers' read-only role; password from SYNC_WORKER_DB_PASSWORD",
    )
    init.set_defaults(run=db_init)

    topology = commands.add_parser("topology").add_subparsers(dest="action", required=True)
    topology.add_parser("declare", help="declare exchanges and queues").set_defaults(
        run=topology_declare
    )

    device = commands.add_parser("device").add_subparsers(dest="action", required=True)
    add = device.add_parser("add", help="register a device and create its queue")
    add.add_argument("device")
    add.add_argument("--user", type=int, required=True)
    add.add_argument("--online", action="store_true", help="an online (not offline) app")
    add.set_defaults(run=device_add)
    remove = device.add_parser("remove", help="unregister a device and delete its queue")
    remove.add_argument("device")
    remove.set_defaults(run=device_remove)
    device.add_parser("list", help="list registered devices").set_defaults(run=device_list)

    call = commands.add_parser("sync", help="synchronize objects to a device and print the result")
    call.add_argument("--user", type=int, required=True)
    call.add_argument("--device", required=True)
    call.add_argument("objects", nargs="*", metavar="Entity:id")
    call.add_argument("--deleted", nargs="*", default=[], metavar="Entity:id")
    call.add_argument("--new", nargs="*", default=[], metavar="Entity:id")
    call.add_argument("--origin", choices=["nanoflow", "event"], default="nanoflow")
    call.add_argument("--timeout", type=float, default=10.0)
    call.set_defaults(run=sync)

    commands.add_parser("status", help="queue depths").set_defaults(run=status)

    run_demo = commands.add_parser("demo", help="run the whole pipeline on the local services")
    run_demo.add_argument("--workdir", default=".services/demo", help="where device DBs go")
    run_demo.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure_logging("WARNING")
    flags = given_flags(args, commands=("command", "action", "run"))
    settings = ServerSettings(
        **{k: v for k, v in flags.items() if k in ServerSettings.model_fields}
    )
    try:
        sys.exit(asyncio.run(args.run(args, settings)))
    except ModelError as error:
        print(f"syncctl: bad model file: {error}", file=sys.stderr)
        sys.exit(2)
    except (OSError, asyncpg.PostgresError) as error:
        print(f"syncctl: {error}", file=sys.stderr)
        sys.exit(1)
