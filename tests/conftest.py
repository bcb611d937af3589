"""Real services for the tests: the project's own script starts RabbitMQ and PostgreSQL once.

Each test gets clean application tables, empty job queues, fresh device ids and its own
SQLite files, so tests do not see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest

from broker import ObjectRef, Session, SyncClient, SyncResult
from broker.accounts import device_account
from broker.connection import connect, open_channel
from broker.topology import (
    DEAD_CHANGES_QUEUE,
    DEAD_JOBS_QUEUE,
    DEFAULT_QUEUE_LIMITS,
    JOBS_QUEUE,
    DeviceQueueType,
    QueueLimits,
    declare_topology,
)
from device_agent import AgentSettings, DeviceAgent, OfflineStore
from syncctl.accounts import BrokerAccounts
from syncctl.devices import register_device, unregister_device
from worker import DomainModel, Worker, WorkerSettings, parse_model
from worker.schema import create_worker_role, init_database

ROOT = Path(__file__).resolve().parent.parent
MODEL_PATH = Path(__file__).with_name("model.yaml")
APP_TABLES = (
    "t_task",
    "t_note",
    "t_report",
    "t_file",
    "t_photo",
    "t_project",
    "t_assignment",
    "t_ticket",
    "t_ghost",
)


WORKER_ROLE = "sync_worker"


@dataclass(frozen=True)
class Services:
    amqp_url: str
    database_url: str
    management_url: str

    @property
    def worker_database_url(self) -> str:
        """Workers log in with the read-only role, as in production (SPEC §8)."""
        parts = urlsplit(self.database_url)
        netloc = f"{WORKER_ROLE}:{WORKER_ROLE}@{parts.hostname}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))


def _service_urls() -> Services:
    """Start the services with the project's script (idempotent) and read their URLs."""
    script = ROOT / "scripts" / "services.sh"
    subprocess.run(["bash", str(script), "start"], check=True, stdout=subprocess.DEVNULL)
    env_lines = subprocess.run(
        ["bash", str(script), "env"], check=True, capture_output=True, text=True
    ).stdout
    values = dict(
        line.removeprefix("export ").split("=", 1)
        for line in env_lines.splitlines()
        if line.startswith("export ")
    )
    return Services(
        *(
            values[name].strip("'\"")
            for name in ("SYNC_AMQP_URL", "SYNC_DATABASE_URL", "SYNC_MANAGEMENT_URL")
        )
    )


@pytest.fixture(scope="session")
def services() -> Services:
    return _service_urls()


@pytest.fixture(scope="session")
def model() -> DomainModel:
    return parse_model(MODEL_PATH.read_text(), str(MODEL_PATH))


async def install_model(services: Services, model: DomainModel, tables: Iterable[str]) -> None:
    """Fresh application ``tables`` for ``model``, the sync schema, the worker role."""
    conn = await asyncpg.connect(services.database_url)
    try:
        for table in tables:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await init_database(conn, model, create_tables=True)
        await create_worker_role(conn, model, WORKER_ROLE, WORKER_ROLE)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def schema(services: Services, model: DomainModel) -> None:
    await install_model(services, model, APP_TABLES)


@pytest.fixture(scope="session")
async def amqp(services: Services) -> AsyncIterator[aio_pika.abc.AbstractRobustChannel]:
    connection = await connect(services.amqp_url, "tests")
    channel = await open_channel(connection)
    await declare_topology(channel)
    yield channel
    await connection.close()


@pytest.fixture
async def pg(services: Services, schema: None, amqp: object) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(services.database_url)
    await conn.execute(
        f"TRUNCATE {', '.join(APP_TABLES)}, sync.device, sync.holding, sync.user_role, "
        "sync.job_result "
        "RESTART IDENTITY"
    )
    yield conn
    # A test may have restarted PostgreSQL under this connection.
    conn.terminate()


@pytest.fixture
async def clean_queues(amqp: aio_pika.abc.AbstractRobustChannel) -> None:
    for name in (JOBS_QUEUE.name, DEAD_JOBS_QUEUE.name, DEAD_CHANGES_QUEUE.name):
        await (await amqp.get_queue(name)).purge()


def worker_settings(services: Services, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "amqp_url": services.amqp_url,
        "database_url": services.worker_database_url,
        "model": MODEL_PATH,
        "name": f"test-worker-{os.getpid()}",
        "batch_size": 50,
        "prefetch": 4,
    }
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def worker(
    services: Services, model: DomainModel, pg: asyncpg.Connection, clean_queues: None
) -> AsyncIterator[Worker]:
    running = await Worker.start(worker_settings(services), model)
    yield running
    await running.stop()


@pytest.fixture
async def client(services: Services) -> AsyncIterator[SyncClient]:
    async with await SyncClient.connect(services.amqp_url, name="test-client") as sync_client:
        yield sync_client


@dataclass
class Device:
    """A registered device with its running agent and a store to look into.

    ``amqp_url`` logs in with the device's own account, as its agent and app do.
    """

    session: Session
    store: OfflineStore
    db_path: Path
    amqp_url: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def device_id(self) -> str:
        return self.session.device_id

    async def settled(self, result: SyncResult, timeout: float = 10.0) -> None:
        """Wait until the device has applied every batch of ``result``."""
        await self.store.wait_for_batches(result.batch_ids, timeout=timeout)


async def sync_settled(
    client: SyncClient, device: Device, objects: Iterable[ObjectRef], **context: Any
) -> SyncResult:
    """Run a job to ``done`` and wait until the device has applied its batches."""
    result: SyncResult = await client.synchronize_to_device(
        device.session, objects=objects, **context
    )
    assert result.status == "done", result
    await device.settled(result)
    return result


async def wait_for(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, every: float = 0.02
) -> None:
    async with asyncio.timeout(timeout):
        # Polls SQLite, which another process writes: there is nothing to be notified by.
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(every)


async def until_committed(
    device: Device,
    entity: str,
    object_id: int,
    expected: dict[str, object] | None,
    timeout: float = 10.0,
) -> None:
    """Wait until the device's committed state of the object is ``expected``."""

    async def reached() -> bool:
        return await device.store.get_committed(entity, object_id) == expected

    await wait_for(reached, timeout=timeout)


MakeDevice = Callable[..., Awaitable[Device]]


@pytest.fixture(scope="session")
def accounts(services: Services) -> BrokerAccounts:
    return BrokerAccounts(services.management_url, services.amqp_url)


def account_url(services: Services, device_id: str, secret: str) -> str:
    """The AMQP URL a device logs in with."""
    parts = urlsplit(services.amqp_url)
    user = quote(device_account(device_id), safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{secret}@{parts.hostname}:{parts.port}"))


@pytest.fixture
async def make_device(
    services: Services,
    pg: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractRobustChannel,
    accounts: BrokerAccounts,
    tmp_path: Path,
) -> AsyncIterator[MakeDevice]:
    devices: list[Device] = []

    async def make(
        user_id: int,
        roles: Iterable[str] = (),
        *,
        offline: bool = True,
        run_agent: bool = True,
        limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
        queue_type: DeviceQueueType = "classic",
    ) -> Device:
        device_id = f"test-{uuid.uuid4().hex[:12]}"
        await pg.executemany(
            "INSERT INTO sync.user_role (user_id, role) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(user_id, role) for role in roles],
        )
        secret = await register_device(
            pg,
            amqp,
            accounts,
            device_id,
            user_id,
            offline=offline,
            limits=limits,
            queue_type=queue_type,
        )
        assert secret is not None
        db_path = tmp_path / f"{device_id}.sqlite"
        device = Device(
            Session(user_id=user_id, device_id=device_id),
            await OfflineStore.open(db_path),
            db_path,
            account_url(services, device_id, secret),
        )
        if run_agent and offline:
            await start_agent(device)
        devices.append(device)
        return device

    yield make
    # A connection of its own: a test may have restarted PostgreSQL under the fixture's.
    conn = await asyncpg.connect(services.database_url)
    try:
        for device in devices:
            await stop_agent(device)
            await device.store.close()
            await unregister_device(conn, amqp, accounts, device.device_id)
    finally:
        await conn.close()


async def start_agent(device: Device) -> None:
    settings = AgentSettings(
        amqp_url=device.amqp_url, device_id=device.device_id, db_path=device.db_path
    )
    agent = await DeviceAgent.start(settings)
    device.stop = asyncio.Event()
    device.task = asyncio.create_task(agent.run(device.stop))


async def stop_agent(device: Device) -> None:
    if device.task is not None:
        device.stop.set()
        await device.task
        device.task = None


async def insert(pg: asyncpg.Connection, table: str, **values: object) -> int:
    """Insert one application row and return its id."""
    columns = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    object_id: int = await pg.fetchval(
        f"INSERT INTO {table} ({columns}) VALUES ({params}) RETURNING id", *values.values()
    )
    return object_id


# The follow tests' domain (tests/follow_model.yaml): orders, customers, regions, watches.
FOLLOW_MODEL = Path(__file__).with_name("follow_model.yaml")
FOLLOW_TABLES = ("f_order", "f_customer", "f_region", "f_watch", "f_memo")


@pytest.fixture(scope="session")
def follow_model() -> DomainModel:
    return parse_model(FOLLOW_MODEL.read_text(), str(FOLLOW_MODEL))


@pytest.fixture(scope="session")
async def follow_schema(services: Services, schema: None, follow_model: DomainModel) -> None:
    await install_model(services, follow_model, FOLLOW_TABLES)


@pytest.fixture
async def fpg(pg: asyncpg.Connection, follow_schema: None) -> asyncpg.Connection:
    """``pg``, with the follow domain's tables, outbox and model stamps empty."""
    await pg.execute(
        f"TRUNCATE {', '.join(FOLLOW_TABLES)}, sync.change, sync.entity_rules RESTART IDENTITY"
    )
    await pg.execute("UPDATE sync.follow_state SET consumed = 0, overflowed_at = NULL")
    return pg


async def follow_world(pg: asyncpg.Connection) -> dict[str, int]:
    """An open region with a customer and two orders; a closed region."""
    open_region = await insert(pg, "f_region", name="north", open=True)
    closed_region = await insert(pg, "f_region", name="south", open=False)
    customer = await insert(pg, "f_customer", name="acme", region_id=open_region)
    order = await insert(
        pg, "f_order", title="pump", status="open", secret="s1", customer_id=customer
    )
    other = await insert(
        pg, "f_order", title="valve", status="open", secret="s2", customer_id=customer
    )
    return {
        "open": open_region,
        "closed": closed_region,
        "customer": customer,
        "order": order,
        "other": other,
    }


async def dead_letters(amqp: aio_pika.abc.AbstractRobustChannel) -> dict[str, str]:
    """The dead-letter queue's jobs: message id -> reason."""
    queue = await amqp.get_queue(DEAD_JOBS_QUEUE.name)
    found: dict[str, str] = {}
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        found[message.message_id or ""] = str((message.headers or {}).get("x-sync-reason"))
    return found


@dataclass(frozen=True)
class Finished:
    """A program that ran to its end: its exit status and what it printed."""

    code: int
    stdout: str
    stderr: str


async def run_process(
    *argv: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30.0
) -> Finished:
    """Run a program to its end without blocking the loop (a test's worker may run in
    this process); killed and ``TimeoutError`` after ``timeout`` seconds."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


async def spawn_worker(
    services: Services, name: str, **settings: object
) -> asyncio.subprocess.Process:
    """``python -m worker`` with the worker role's URL and the test model; ``settings``
    as ``SYNC_*`` variables (``prefetch=4`` is ``SYNC_PREFETCH=4``)."""
    env = {
        **os.environ,
        "SYNC_AMQP_URL": services.amqp_url,
        "SYNC_DATABASE_URL": services.worker_database_url,
        "SYNC_MODEL": str(MODEL_PATH),
        **{f"SYNC_{key.upper()}": str(value) for key, value in settings.items()},
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "--name",
        name,
        env=env,
        cwd=ROOT,
        stderr=asyncio.subprocess.DEVNULL,
    )
