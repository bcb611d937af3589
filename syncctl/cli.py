"""``syncctl``: set up the database and topology, manage devices and roles, sync, status."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from pydantic import ValidationError

from broker.accounts import device_account
from broker.client import SyncClient
from broker.connection import connect, open_channel
from broker.errors import ConfigurationError, ProgramError
from broker.logs import configure_logging
from broker.models import (
    DEVICE_ID_PATTERN,
    ENTITY_NAME_PATTERN,
    JOB_ID_PATTERN,
    MAX_CONSTRAINT_LENGTH,
    MAX_ID,
    MEMBER_NAME_PATTERN,
    ObjectRef,
    Query,
    Session,
)
from broker.runtime import run_program
from broker.settings import load_settings
from broker.topology import (
    DEAD_CHANGES_QUEUE,
    DEAD_JOBS_QUEUE,
    JOBS_QUEUE,
    declare_topology,
    device_queue_name,
    existing_queue,
)
from broker.wire import MESSAGES, json_schema
from syncctl.accounts import BrokerAccounts
from syncctl.devices import (
    find_device,
    list_devices,
    register_device,
    unregister_device,
)
from syncctl.progress import ProgressBar
from syncctl.roles import set_user_roles, user_roles
from worker.database import connect as connect_database
from worker.model import EXAMPLE_MODEL, load_model
from worker.schema import create_worker_role, init_database
from worker.settings import ServerSettings

__all__ = ["main"]

Command = Callable[[argparse.Namespace, ServerSettings], Awaitable[int]]
_TOPOLOGY_HINT = "run `syncctl topology declare`"


@asynccontextmanager
async def _database(settings: ServerSettings) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect_database(settings.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def _broker(
    settings: ServerSettings,
) -> AsyncIterator[tuple[AbstractRobustConnection, AbstractRobustChannel]]:
    connection = await connect(settings.amqp_url, "syncctl")
    async with connection:
        yield connection, await open_channel(connection)


def _accounts(settings: ServerSettings) -> BrokerAccounts:
    return BrokerAccounts(settings.management_url, settings.amqp_url)


# Argument types: bad input is a usage error (exit 2) with the expected form.


def _id(text: str) -> int | None:
    """``text`` as an id (1 to a bigint's maximum), or ``None``."""
    if not re.fullmatch(r"[1-9][0-9]{0,18}", text) or int(text) > MAX_ID:
        return None
    return int(text)


def _ref(text: str) -> ObjectRef:
    entity, _, object_id = text.partition(":")
    the_id = _id(object_id)
    if the_id is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected Entity:id with a positive integer id, e.g. WorkOrder:1"
        )
    try:
        return ObjectRef(entity, the_id)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {entity!r} is not an entity name") from None


def _query(text: str) -> Query:
    """``Entity[constraint]``: the entity's name up to the first ``[``, then its constraint."""
    entity, bracket, rest = text.partition("[")
    entity = entity.strip()
    if not bracket or not entity:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected Entity[constraint], e.g. 'WorkOrder[status = \"Open\"]'"
        )
    try:
        return Query(entity, bracket + rest)
    except ValueError:
        if not re.fullmatch(ENTITY_NAME_PATTERN, entity):
            raise argparse.ArgumentTypeError(
                f"{text!r}: {entity!r} is not an entity name"
            ) from None
        # Not echoed whole: it is long.
        raise argparse.ArgumentTypeError(
            f"{text[:60]!r}...: the constraint is longer than {MAX_CONSTRAINT_LENGTH} characters"
        ) from None


def _device_id(text: str) -> str:
    if not re.fullmatch(DEVICE_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid device id (letters, digits and _ . : -, at most 128)"
        )
    return text


def _user_id(text: str) -> int:
    user_id = _id(text)
    if user_id is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a user id (a positive integer)")
    return user_id


def _job_id(text: str) -> str:
    if not re.fullmatch(JOB_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a job id (letters, digits and _ . : -, at most 64)"
        )
    return text


def _roles(text: str) -> list[str]:
    roles = [role.strip() for role in text.split(",") if role.strip()]
    for role in roles:
        if not re.fullmatch(MEMBER_NAME_PATTERN, role):
            raise argparse.ArgumentTypeError(f"{role!r} is not a role name")
    return roles


# Commands.


async def db_init(args: argparse.Namespace, settings: ServerSettings) -> int:
    model = await load_model(settings.model_path())
    password = settings.worker_db_password
    if args.worker_role and not password:
        raise ProgramError("--worker-role needs the role's password in SYNC_WORKER_DB_PASSWORD")
    async with _database(settings) as conn:
        tables, captured = await init_database(
            conn,
            model,
            create_tables=args.create_tables,
            backlog_limit=settings.follow_backlog_limit,
        )
        if args.worker_role and password:
            try:
                await create_worker_role(conn, model, args.worker_role, password)
            except ValueError as error:
                raise ProgramError(str(error)) from None
    print(f"sync schema ready; version trigger on {len(tables)} tables: {', '.join(tables)}")
    if model.followed:
        print(f"follow: {', '.join(model.followed)}; changes captured on {', '.join(captured)}")
    if args.worker_role:
        print(f"worker role {args.worker_role}: reads the app tables, writes no app data")
    return 0


async def topology_declare(args: argparse.Namespace, settings: ServerSettings) -> int:
    async with _broker(settings) as (_, channel):
        await declare_topology(channel)
    print("topology declared: sync.jobs, sync.jobs.dead, sync.changes, sync.changes.dead")
    return 0


async def _write_secret(path: Path, secret: str) -> None:
    def write() -> None:
        # Created private: the secret never exists on disk with wider permissions.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secret + "\n")
        path.chmod(0o600)

    await asyncio.to_thread(write)


async def device_add(args: argparse.Namespace, settings: ServerSettings) -> int:
    async with _database(settings) as conn, _broker(settings) as (_, channel):
        secret = await register_device(
            conn,
            channel,
            _accounts(settings),
            args.device,
            args.user,
            offline=not args.online,
            queue_type=settings.device_queue_type,
            if_missing=args.if_missing,
        )
    if secret is None:
        print(f"device {args.device} is registered already; its secret is kept")
        return 0
    print(f"device {args.device} registered for user {args.user}")
    print(f"amqp user: {device_account(args.device)}")
    if args.secret_file:
        await _write_secret(Path(args.secret_file), secret)
        print(f"amqp secret: written to {args.secret_file}")
    else:
        # Printed once, to stdout only: the device's agent and app log in with it.
        print(f"amqp secret: {secret}")
    return 0


async def device_remove(args: argparse.Namespace, settings: ServerSettings) -> int:
    async with _database(settings) as conn, _broker(settings) as (_, channel):
        found = await unregister_device(conn, channel, _accounts(settings), args.device)
    print(f"device {args.device} {'removed' if found else 'was not registered'}")
    return 0 if found else 1


def _device_line(device: asyncpg.Record) -> str:
    line = f"{device['device_id']}\tuser={device['user_id']}\t"
    line += "offline" if device["offline"] else "online"
    if device["resync_reason"]:
        line += f"\tneeds-resync={device['resync_reason']} since {device['resync_since']}"
    return line


async def device_list(args: argparse.Namespace, settings: ServerSettings) -> int:
    async with _database(settings) as conn:
        for device in await list_devices(conn):
            print(_device_line(device))
    return 0


async def device_show(args: argparse.Namespace, settings: ServerSettings) -> int:
    async with _database(settings) as conn:
        device = await find_device(conn, args.device)
    if device is None:
        print(f"device {args.device} is not registered", file=sys.stderr)
        return 1
    print(f"device: {device['device_id']}")
    print(f"user: {device['user_id']}")
    print(f"app: {'offline' if device['offline'] else 'online'}")
    print(f"registered: {device['registered_at'].isoformat()}")
    resync = device["resync_reason"]
    since = device["resync_since"]
    print(f"needs resync: {f'{resync} since {since.isoformat()}' if resync else 'no'}")
    print(f"objects held (followed entities): {device['holdings']}")
    print(f"amqp user: {device_account(args.device)}")
    if device["offline"]:
        async with _broker(settings) as (connection, _):
            queue = await existing_queue(
                connection,
                device_queue_name(args.device),
                hint=f"register the device again: syncctl device add {args.device} --user N",
            )
        print(f"queue: {device_queue_name(args.device)}")
        print(f"queue depth: {queue.message_count} batches")
        print(f"agents connected: {queue.consumer_count}")
    return 0


async def roles(args: argparse.Namespace, settings: ServerSettings) -> int:
    async with _database(settings) as conn:
        if args.set is not None:
            await set_user_roles(conn, args.user_id, args.set)
        found = await user_roles(conn, args.user_id)
    print(f"user {args.user_id}: {', '.join(found) if found else '(no roles)'}")
    return 0


async def model_example(args: argparse.Namespace, settings: ServerSettings) -> int:
    print(await asyncio.to_thread(EXAMPLE_MODEL.read_text, encoding="utf-8"), end="")
    return 0


async def schema(args: argparse.Namespace, settings: ServerSettings) -> int:
    print(json.dumps(json_schema(args.message), indent=2))
    return 0


async def _no_result(settings: ServerSettings, job_id: str, timeout: float) -> ProgramError:
    """Why a result may not have come, from what the jobs queue shows."""
    async with _broker(settings) as (connection, _):
        jobs = await existing_queue(connection, JOBS_QUEUE.name, hint=_TOPOLOGY_HINT)
    advice = (
        "no worker is consuming it: start sync-worker"
        if jobs.consumer_count == 0
        else "the workers may be busy or unable to reach PostgreSQL: see their logs"
    )
    return ProgramError(
        f"no result for job {job_id} within {timeout:g}s; it was sent and may still run. "
        f"{JOBS_QUEUE.name} holds {jobs.message_count} jobs for {jobs.consumer_count} "
        f"consumers: {advice}. Retrying with --job-id {job_id} is safe: the job is run once."
    )


async def sync(args: argparse.Namespace, settings: ServerSettings) -> int:
    job_id = args.job_id or SyncClient.new_job_id()
    # On a terminal, a bar follows the job; in a pipe or a file, only the result is shown.
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    async with await SyncClient.connect(settings.amqp_url, name="syncctl") as client:
        try:
            result = await client.synchronize_to_device(
                Session(user_id=args.user, device_id=args.device),
                objects=args.objects,
                queries=args.query,
                deleted=args.deleted,
                new=args.new,
                origin=args.origin,
                timeout=args.timeout,
                job_id=job_id,
                on_progress=bar.show if bar is not None else None,
            )
        except TimeoutError:
            raise await _no_result(settings, job_id, args.timeout) from None
        except ValidationError as error:
            # Each argument was checked; the job as a whole may still be out of bounds.
            message = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigurationError(f"not a valid job: {message}") from None
        finally:
            if bar is not None:
                bar.close()
    print(result.model_dump_json(indent=2))
    return 0 if result.status != "rejected" else 1


async def status(args: argparse.Namespace, settings: ServerSettings) -> int:
    async with _broker(settings) as (connection, _):
        for name in (JOBS_QUEUE.name, DEAD_JOBS_QUEUE.name, DEAD_CHANGES_QUEUE.name):
            queue = await existing_queue(connection, name, hint=_TOPOLOGY_HINT)
            print(f"{name}\tmessages={queue.message_count}\tconsumers={queue.consumer_count}")
    return 0


async def demo(args: argparse.Namespace, settings: ServerSettings) -> int:
    from syncctl.demo import run_demo  # the demo pulls in worker and agent code

    await run_demo(settings, workdir=args.workdir)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncctl", description=__doc__)
    parser.add_argument("--amqp-url", help="RabbitMQ URL (SYNC_AMQP_URL)")
    parser.add_argument("--database-url", help="PostgreSQL URL (SYNC_DATABASE_URL)")
    parser.add_argument("--management-url", help="RabbitMQ management API (SYNC_MANAGEMENT_URL)")
    parser.add_argument("--model", help="domain model YAML file (SYNC_MODEL)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        run: Command,
        help: str,
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    db = commands.add_parser("db", help="the database").add_subparsers(dest="action", required=True)
    init = command(db, "init", db_init, "create the sync schema and version triggers")
    init.add_argument("--create-tables", action="store_true", help="create missing app tables")
    init.add_argument(
        "--worker-role",
        metavar="NAME",
        help="create the workers' read-only role; password from SYNC_WORKER_DB_PASSWORD",
    )

    topology = commands.add_parser("topology", help="exchanges and queues")
    actions = topology.add_subparsers(dest="action", required=True)
    command(actions, "declare", topology_declare, "declare exchanges and queues")

    device = commands.add_parser("device", help="devices").add_subparsers(
        dest="action", required=True
    )
    add = command(device, "add", device_add, "register a device: its row, queue and account")
    add.add_argument("device", type=_device_id)
    add.add_argument("--user", type=_user_id, required=True)
    add.add_argument("--online", action="store_true", help="an online (not offline) app")
    add.add_argument("--secret-file", metavar="PATH", help="write the secret here (mode 0600)")
    add.add_argument(
        "--if-missing",
        action="store_true",
        help="leave a device that is registered already as it is (its secret is kept)",
    )
    remove = command(device, "remove", device_remove, "unregister a device, its queue, account")
    remove.add_argument("device", type=_device_id)
    command(device, "list", device_list, "list registered devices")
    show = command(device, "show", device_show, "a device's registration, queue and resync mark")
    show.add_argument("device", type=_device_id)

    user = commands.add_parser("user", help="users").add_subparsers(dest="action", required=True)
    user_roles_cmd = command(user, "roles", roles, "show (or --set) a user's roles")
    user_roles_cmd.add_argument("user_id", type=_user_id, metavar="ID")
    user_roles_cmd.add_argument(
        "--set", type=_roles, metavar="R1,R2", help="replace the roles ('' for none)"
    )

    model = commands.add_parser("model", help="model files").add_subparsers(
        dest="action", required=True
    )
    command(model, "example", model_example, "print the example model to start from")

    messages = command(commands, "schema", schema, "print the JSON Schema of a message")
    messages.add_argument("message", choices=sorted(MESSAGES))

    call = command(commands, "sync", sync, "synchronize objects to a device, print the result")
    call.add_argument("--user", type=_user_id, required=True)
    call.add_argument("--device", type=_device_id, required=True)
    call.add_argument("objects", nargs="*", type=_ref, metavar="Entity:id")
    call.add_argument(
        "--query",
        action="append",
        type=_query,
        default=[],
        metavar="'Entity[constraint]'",
        help="the objects matching an XPath constraint that the user may read (repeatable)",
    )
    call.add_argument("--deleted", nargs="*", type=_ref, default=[], metavar="Entity:id")
    call.add_argument("--new", nargs="*", type=_ref, default=[], metavar="Entity:id")
    call.add_argument("--origin", choices=["nanoflow", "event"], default="nanoflow")
    call.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the result")
    call.add_argument("--job-id", type=_job_id, help="the job's id (default: a new one)")

    command(commands, "status", status, "depths of the jobs and dead-letter queues")
    run_demo = command(commands, "demo", demo, "run the whole pipeline on the local services")
    run_demo.add_argument("--workdir", default=".services/demo", help="where device DBs go")
    return parser


async def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings = load_settings(ServerSettings, args, parser)
    try:
        status: int = await args.run(args, settings)
    except asyncpg.UndefinedTableError as error:
        raise ProgramError(f"PostgreSQL: {error}: has `syncctl db init` run?") from None
    except asyncpg.PostgresError as error:
        raise ProgramError(f"PostgreSQL: {error}") from None
    return status


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    run_program("syncctl", lambda: _run(args, parser))
