"""The programs as an operator meets them: bad input, services down or wrong, graceful stops.

Every program runs as a subprocess (``python -m ...``) against the real services. Each test
asserts what the operator sees: the exit status (2 for usage, 1 for a failure), the key
words of the message, and that no traceback reached the terminal.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import asyncpg
import httpx
import pytest

from broker import ObjectRef, SyncClient
from broker.connection import connect
from broker.topology import JOBS_QUEUE, device_queue_name, existing_queue
from tests.conftest import (
    MODEL_PATH,
    ROOT,
    WORKER_ROLE,
    MakeDevice,
    Services,
    account_url,
    insert,
    start_agent,
    wait_for,
)
from worker import DomainModel
from worker.devices import RELEASE_DEVICE
from worker.schema import create_worker_role, init_database
from worker.settings import ServerSettings

# A program that has not ended within this long is taken to hang.
PROGRAM_TIMEOUT = 15.0


def _env(services: Services, **env: str) -> dict[str, str]:
    base = {
        key: value
        for key, value in os.environ.items()
        # A device or a metrics port from the caller's shell must not leak into a run.
        if key not in ("SYNC_DEVICE_ID", "SYNC_DB_PATH", "SYNC_METRICS_PORT", "SYNC_LOG_FORMAT")
    }
    return {
        **base,
        "SYNC_AMQP_URL": services.amqp_url,
        "SYNC_DATABASE_URL": services.database_url,
        "SYNC_MODEL": str(MODEL_PATH),
        **env,
    }


async def _run(services: Services, module: str, *args: str, **env: str) -> tuple[int, str]:
    """Run ``python -m module args``; its exit status and its stdout and stderr together."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        env=_env(services, **env),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), PROGRAM_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"{module} {' '.join(args)} did not end within {PROGRAM_TIMEOUT}s")
    assert process.returncode is not None
    return process.returncode, output.decode()


def _fails(result: tuple[int, str], status: int, *words: str) -> str:
    """Assert the run ended with ``status``, no traceback, and every one of ``words``."""
    code, output = result
    assert code == status, output
    assert "Traceback" not in output, output
    for word in words:
        assert word in output, output
    return output


def _device_id() -> str:
    return f"e2e-{uuid.uuid4().hex[:12]}"


def _url_with(url: str, *, password: str | None = None, port: int | None = None) -> str:
    parts = urlsplit(url)
    netloc = (
        f"{parts.username}:{password if password is not None else parts.password}"
        f"@{parts.hostname}:{port if port is not None else parts.port}"
    )
    return urlunsplit(parts._replace(netloc=netloc))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def _management(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    """The broker's management API with the operator's account."""
    parts = urlsplit(services.amqp_url)
    async with httpx.AsyncClient(
        base_url=ServerSettings().management_url,
        auth=(parts.username or "", parts.password or ""),
        trust_env=False,
        timeout=5,
    ) as client:
        yield client


async def _queue_state(services: Services, name: str) -> tuple[int, int]:
    """(ready messages, consumers) of queue ``name``, by a passive declare of its own."""
    connection = await connect(services.amqp_url, "test-programs-probe")
    async with connection:
        declared = await existing_queue(connection, name, hint="")
    assert declared.message_count is not None and declared.consumer_count is not None
    return declared.message_count, declared.consumer_count


def _model_variant(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of tests/model.yaml with ``old`` replaced by ``new`` (exactly once)."""
    text = MODEL_PATH.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / "model.yaml"
    path.write_text(text.replace(old, new))
    return path


_TASK_ATTRIBUTES = (
    "attributes: {title: string, status: string, secret: string, amount: decimal, due: datetime}"
)


def _model_with_missing_column(tmp_path: Path) -> Path:
    """Task gains an attribute ``nocolumn`` that t_task has no column for."""
    return _model_variant(
        tmp_path,
        _TASK_ATTRIBUTES,
        _TASK_ATTRIBUTES.replace("due: datetime}", "due: datetime, nocolumn: string}"),
    )


# 1. Usage errors: exit 2 before anything connects.

_REF_FORM = "expected Entity:id with a positive integer id, e.g. WorkOrder:1"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["sync", "--user", "5", "--device", "d1", "WorkOrder"], ["'WorkOrder': " + _REF_FORM]),
        (
            ["sync", "--user", "5", "--device", "d1", "WorkOrder:abc"],
            ["'WorkOrder:abc': " + _REF_FORM],
        ),
        (["sync", "--user", "5", "--device", "d1", "WorkOrder:0"], ["'WorkOrder:0': " + _REF_FORM]),
        (
            ["sync", "--user", "5", "--device", "bad id!", "Task:1"],
            ["'bad id!' is not a valid device id"],
        ),
        (["device", "add", "X", "--user", "0"], ["'0' is not a user id"]),
        (
            ["sync", "--user", "5", "--device", "d1", "--job-id", "a b", "Task:1"],
            ["'a b' is not a job id"],
        ),
        (["schema", "nope"], ["invalid choice: 'nope'"]),
        (
            ["sync", "--user", "5", "--device", "d1", "--query", "Task"],
            ["argument --query: 'Task': expected Entity[constraint]"],
        ),
        (
            ["sync", "--user", "5", "--device", "d1", "--query", "[status = 'x']"],
            ["expected Entity[constraint]"],
        ),
        (
            ["sync", "--user", "5", "--device", "d1", "--query", "Bad name[a = 1]"],
            ["'Bad name' is not an entity name"],
        ),
        (
            ["sync", "--user", "5", "--device", "d1", "--query", "Task[" + "a" * 4000 + "]"],
            ["the constraint is longer than 4000 characters"],
        ),
    ],
)
async def test_syncctl_usage_error_exits_2_with_the_expected_form(
    services: Services, args: list[str], words: list[str]
):
    _fails(await _run(services, "syncctl", *args), 2, "usage: syncctl", "error:", *words)


# 2. Services down or wrong.


async def test_syncctl_sync_with_queries_too_long_together_is_a_usage_error(
    services: Services,
):
    half = "Task[" + "a" * 2500 + "]"
    _fails(
        await _run(
            services,
            "syncctl",
            "sync",
            "--user",
            "5",
            "--device",
            "d1",
            "--query",
            half,
            "--query",
            half,
        ),
        2,
        "syncctl: not a valid job: the queries' constraints have 5004 characters; "
        "at most 4000 per job",
    )


async def test_syncctl_with_a_malformed_database_url_is_a_usage_error(services: Services):
    _fails(
        await _run(services, "syncctl", "--database-url", "garbage", "device", "list"),
        2,
        "syncctl: not a PostgreSQL URL",
    )


async def test_syncctl_with_postgresql_out_of_reach_says_so(services: Services):
    closed = _url_with(services.database_url, port=1)
    _fails(
        await _run(services, "syncctl", "--database-url", closed, "device", "list"),
        1,
        "cannot reach PostgreSQL at 127.0.0.1:1",
    )


async def test_syncctl_with_a_wrong_database_password_says_the_login_was_refused(
    services: Services,
):
    wrong = _url_with(services.database_url, password="not-the-password")
    output = _fails(
        await _run(services, "syncctl", "--database-url", wrong, "device", "list"),
        1,
        "PostgreSQL",
        "refused the login",
    )
    assert "not-the-password" not in output


async def test_syncctl_status_with_rabbitmq_out_of_reach_says_so(services: Services):
    output = _fails(
        await _run(services, "syncctl", "--amqp-url", "amqp://sync:sync@127.0.0.1:1/", "status"),
        1,
        "cannot reach RabbitMQ at 127.0.0.1:1: connection refused",
    )
    # One line: the driver's own log of the failed attempt is not repeated.
    assert len(output.strip().splitlines()) == 1, output


async def test_syncctl_status_with_a_wrong_amqp_password_says_the_login_was_refused(
    services: Services,
):
    wrong = _url_with(services.amqp_url, password="not-the-password")
    output = _fails(
        await _run(services, "syncctl", "--amqp-url", wrong, "status"),
        1,
        "RabbitMQ",
        "refused the login of 'sync'",
    )
    assert "not-the-password" not in output


async def test_syncctl_with_a_malformed_amqp_url_is_a_usage_error(services: Services):
    _fails(
        await _run(services, "syncctl", "--amqp-url", "garbage", "status"),
        2,
        "syncctl: not a RabbitMQ URL",
    )


# 3. A registration that cannot complete leaves nothing behind.


async def test_device_add_with_the_management_api_down_leaves_nothing_behind(
    services: Services, pg: asyncpg.Connection
):
    device = _device_id()
    _fails(
        await _run(
            services,
            "syncctl",
            "--management-url",
            "http://127.0.0.1:1",
            "device",
            "add",
            device,
            "--user",
            "5",
        ),
        1,
        "management API",
        "http://127.0.0.1:1",
    )
    assert await pg.fetchval("SELECT count(*) FROM sync.device WHERE device_id = $1", device) == 0
    async with _management(services) as api:
        queue = await api.get(f"/api/queues/%2F/{quote(device_queue_name(device), safe='')}")
        user = await api.get(f"/api/users/{quote(f'device.{device}', safe='')}")
    assert (queue.status_code, user.status_code) == (404, 404)


# 4. Registration with a secret file, --if-missing, show, remove.


@pytest.mark.usefixtures("pg")
async def test_device_add_writes_a_private_secret_file_and_if_missing_keeps_it(
    services: Services, tmp_path: Path
):
    device = _device_id()
    secret_file = tmp_path / "secret"
    db = str(tmp_path / "agent.sqlite")
    try:
        output = _fails(
            await _run(
                services,
                "syncctl",
                "device",
                "add",
                device,
                "--user",
                "5",
                "--secret-file",
                str(secret_file),
            ),
            0,
            f"device {device} registered for user 5",
            f"amqp secret: written to {secret_file}",
        )
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        assert secret and secret not in output
        written = secret_file.stat().st_mtime_ns
        check = ("device_agent", "--check", "--device", device, "--db", db)
        own_account = account_url(services, device, secret)
        assert await _run(services, *check, SYNC_AMQP_URL=own_account) == (0, "healthy\n")
        async with _management(services) as api:
            queue = await api.get(f"/api/queues/%2F/{quote(device_queue_name(device), safe='')}")
        assert queue.status_code == 200

        _fails(
            await _run(
                services,
                "syncctl",
                "device",
                "add",
                device,
                "--user",
                "5",
                "--if-missing",
                "--secret-file",
                str(secret_file),
            ),
            0,
            "registered already",
            "secret is kept",
        )
        assert secret_file.read_text().strip() == secret
        assert secret_file.stat().st_mtime_ns == written
        assert await _run(services, *check, SYNC_AMQP_URL=own_account) == (0, "healthy\n")

        _fails(
            await _run(services, "syncctl", "device", "show", device),
            0,
            f"device: {device}\n",
            "user: 5\n",
            "needs resync: no\n",
            "queue depth: 0 batches\n",
            "agents connected: 0\n",
        )
    finally:
        removed = await _run(services, "syncctl", "device", "remove", device)
    _fails(removed, 0, f"device {device} removed")
    assert (await _run(services, *check, SYNC_AMQP_URL=own_account))[0] == 1


# 5. Roles.


@pytest.mark.usefixtures("pg")
async def test_user_roles_are_set_shown_and_cleared(services: Services):
    _fails(
        await _run(services, "syncctl", "user", "roles", "42", "--set", "Admin,Worker"),
        0,
        "user 42: Admin, Worker",
    )
    _fails(await _run(services, "syncctl", "user", "roles", "42"), 0, "user 42: Admin, Worker")
    _fails(
        await _run(services, "syncctl", "user", "roles", "42", "--set", ""),
        0,
        "user 42: (no roles)",
    )
    _fails(await _run(services, "syncctl", "user", "roles", "42"), 0, "user 42: (no roles)")
    _fails(
        await _run(services, "syncctl", "user", "roles", "42", "--set", "bad role"),
        2,
        "'bad role' is not a role name",
    )


# 6. A sync whose result does not come.


@pytest.mark.usefixtures("clean_queues")
async def test_sync_without_a_worker_times_out_and_says_why(
    services: Services,
    make_device: MakeDevice,
    amqp: aio_pika.abc.AbstractRobustChannel,
):
    device = await make_device(5, run_agent=False)
    assert (await _queue_state(services, JOBS_QUEUE.name))[1] == 0, "a worker is consuming"
    job_id = f"e2e-job-{uuid.uuid4().hex[:8]}"
    try:
        _fails(
            await _run(
                services,
                "syncctl",
                "sync",
                "--user",
                "5",
                "--device",
                device.device_id,
                "--timeout",
                "1",
                "--job-id",
                job_id,
                "Task:1",
            ),
            1,
            f"no result for job {job_id} within 1s",
            JOBS_QUEUE.name,
            "holds 1 jobs for 0 consumers",
            "no worker is consuming",
        )
    finally:
        # The job must not run in a later test.
        await (await amqp.get_queue(JOBS_QUEUE.name)).purge()


# 7. sync-worker refuses a model it cannot work with.


@pytest.mark.usefixtures("pg")
async def test_worker_check_with_a_missing_model_file_is_unhealthy(services: Services):
    _fails(
        await _run(services, "worker", "--check", "--model", "/nope.yaml"),
        1,
        "unhealthy",
        "/nope.yaml",
        "cannot read",
    )


@pytest.mark.usefixtures("pg")
async def test_worker_check_names_the_rule_whose_constraint_does_not_parse(
    services: Services, tmp_path: Path
):
    model = _model_variant(
        tmp_path,
        "        read: [title, status]\n",
        '        read: [title, status]\n        constraint: "[title = ]"\n',
    )
    _fails(
        await _run(services, "worker", "--check", "--model", str(model)),
        1,
        "unhealthy",
        f"{model}: entities.Task.access[0].constraint",
    )


@pytest.mark.usefixtures("pg")
async def test_worker_with_an_attribute_that_has_no_column_does_not_start(
    services: Services, tmp_path: Path
):
    model = _model_with_missing_column(tmp_path)
    database = services.worker_database_url
    _fails(
        await _run(
            services, "worker", "--check", "--model", str(model), SYNC_DATABASE_URL=database
        ),
        1,
        "unhealthy",
        "t_task.nocolumn",
    )
    started = time.monotonic()
    _fails(
        await _run(services, "worker", "--model", str(model), SYNC_DATABASE_URL=database),
        1,
        "sync-worker: the model does not match the database",
        "column t_task.nocolumn for Task.nocolumn (string): missing",
    )
    assert time.monotonic() - started < PROGRAM_TIMEOUT


async def test_worker_on_a_sync_schema_of_an_older_version_says_to_run_db_init(
    services: Services, pg: asyncpg.Connection, model: DomainModel
):
    await pg.execute(f"DROP PROCEDURE {RELEASE_DEVICE}")
    try:
        _fails(
            await _run(services, "worker", SYNC_DATABASE_URL=services.worker_database_url),
            1,
            "sync-worker: the model does not match the database",
            f"routine {RELEASE_DEVICE}: missing or not executable (run `syncctl db init`)",
        )
    finally:
        await init_database(pg, model)
        await create_worker_role(pg, model, WORKER_ROLE, WORKER_ROLE)


# 8. sync-agent ends at once, saying why, when it cannot work.


async def test_agent_without_arguments_is_a_usage_error(services: Services):
    _fails(await _run(services, "device_agent"), 2, "sync-agent: setting device_id", "--device")


@pytest.mark.usefixtures("pg")
async def test_agent_for_an_unknown_device_says_it_does_not_exist(
    services: Services, tmp_path: Path
):
    device = _device_id()
    _fails(
        await _run(services, "device_agent", "--device", device, "--db", str(tmp_path / "a.db")),
        1,
        f"queue {device_queue_name(device)} does not exist",
    )


async def test_agent_with_a_wrong_secret_says_the_login_was_refused(
    services: Services, make_device: MakeDevice, tmp_path: Path
):
    device = await make_device(5, run_agent=False)
    wrong = account_url(services, device.device_id, "not-the-secret")
    args = ("--device", device.device_id, "--db", str(tmp_path / "a.db"))
    output = _fails(
        await _run(services, "device_agent", *args, SYNC_AMQP_URL=wrong),
        1,
        f"refused the login of 'device.{device.device_id}'",
    )
    assert "not-the-secret" not in output


@pytest.mark.usefixtures("pg")
async def test_agent_with_a_database_it_cannot_create_says_so(services: Services, tmp_path: Path):
    # Tests run as root, whom a read-only directory does not stop: a file as the parent does.
    (tmp_path / "file").write_text("not a directory")
    db = tmp_path / "file" / "x.sqlite"
    device = _device_id()
    # Whether a traceback follows the message depends on timing at exit, more likely on a
    # busy machine: a few runs at once (the agent and its --check) show it reliably.
    runs = await asyncio.gather(
        *(
            _run(services, "device_agent", *check, "--device", device, "--db", str(db))
            for check in ([], ["--check"], [], ["--check"])
        )
    )
    for run in runs:
        _fails(run, 1, f"cannot open the device database {db}")


# 9. SIGTERM while SQLite keeps failing: the agent stops, the batch is not lost.


async def _start_program(
    services: Services, module: str, *args: str, **env: str
) -> tuple[asyncio.subprocess.Process, list[str], asyncio.Task[None]]:
    """A long-running program; its stderr lines are collected as they come."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        env=_env(services, **env),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []

    async def collect() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            lines.append(line.decode())

    return process, lines, asyncio.create_task(collect())


async def _stop_program(process: asyncio.subprocess.Process, reader: asyncio.Task[None]) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()
    await reader


async def test_agent_honours_sigterm_while_sqlite_is_locked_and_loses_nothing(
    services: Services,
    make_device: MakeDevice,
    worker: object,
    client: SyncClient,
    pg: asyncpg.Connection,
):
    device = await make_device(5, ["Admin"], run_agent=False)
    queue = device_queue_name(device.device_id)
    process, lines, reader = await _start_program(
        services,
        "device_agent",
        "--device",
        device.device_id,
        "--db",
        str(device.db_path),
        SYNC_AMQP_URL=device.amqp_url,
    )
    lock: sqlite3.Connection | None = None
    try:

        async def consuming() -> bool:
            assert process.returncode is None, "".join(lines)
            return (await _queue_state(services, queue))[1] == 1

        await wait_for(consuming, timeout=10, every=0.05)
        # The app holds the write lock: every apply waits out busy_timeout and fails.
        lock = sqlite3.connect(device.db_path, isolation_level=None, timeout=0)
        lock.execute("BEGIN EXCLUSIVE")

        task = await insert(pg, "t_task", title="kept")
        result = await client.synchronize_to_device(
            device.session, objects=[ObjectRef("Task", task)], wait=True
        )
        assert result.status == "done" and result.batch_ids, result

        async def held() -> bool:
            return (await _queue_state(services, queue)) == (0, 1)

        await wait_for(held, timeout=5, every=0.05)
        assert await device.store.applied_batch_ids(result.batch_ids) == set()

        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        status = await asyncio.wait_for(process.wait(), 10)
        took = time.monotonic() - stopped
        await reader
        output = "".join(lines)
        assert status == 0, output
        assert "Traceback" not in output, output
        assert took < 8.5, f"sync-agent took {took:.1f}s to stop after SIGTERM"
        assert await device.store.applied_batch_ids(result.batch_ids) == set()
    finally:
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
        await _stop_program(process, reader)

    # Back with the lock gone, the agent gets the batch again and applies it.
    assert await _queue_state(services, queue) == (1, 0)
    await start_agent(device)
    await device.settled(result)
    committed = await device.store.get_committed("Task", task)
    assert committed is not None and committed["title"] == "kept"


# 10. sync-worker as a process: operations endpoint, metrics and JSON logs.


async def test_worker_process_serves_metrics_and_logs_json_lines(
    services: Services,
    make_device: MakeDevice,
    client: SyncClient,
    pg: asyncpg.Connection,
    clean_queues: None,
):
    assert (await _queue_state(services, JOBS_QUEUE.name))[1] == 0, "a worker is consuming"
    port = _free_port()
    process, lines, reader = await _start_program(
        services,
        "worker",
        "--name",
        "test-programs-worker",
        SYNC_DATABASE_URL=services.worker_database_url,
        SYNC_LOG_FORMAT="json",
        SYNC_METRICS_PORT=str(port),
    )
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=5
        ) as http:

            async def ready() -> bool:
                assert process.returncode is None, "".join(lines)
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, timeout=15, every=0.1)

            device = await make_device(5, ["Admin"])
            task = await insert(pg, "t_task", title="through the process")
            result = await client.synchronize_to_device(
                device.session, objects=[ObjectRef("Task", task)]
            )
            assert result.status == "done", result
            await device.settled(result)

            metrics = (await http.get("/metrics")).text
            done = re.search(r'^sync_jobs_total\{status="done"\} ([0-9.e+]+)$', metrics, re.M)
            assert done is not None and float(done.group(1)) >= 1, metrics
            assert (await http.get("/healthz")).status_code == 200

        process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(process.wait(), 10)
        await reader
    finally:
        await _stop_program(process, reader)

    assert status == 0, "".join(lines)
    records = []
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        records.append(record)
    job_done = [r for r in records if r["message"] == "job done"]
    assert [(r["job_id"], r["device_id"]) for r in job_done] == [(result.job_id, device.device_id)]


# 11. The services script tells the programs where the management API is.


async def test_services_env_prints_the_management_url_for_its_port():
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(ROOT / "scripts" / "services.sh"),
        "env",
        env={**os.environ, "SYNC_MGMT_PORT": "15999"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), PROGRAM_TIMEOUT)
    assert process.returncode == 0
    printed = stdout.decode()
    lines = [line for line in printed.splitlines() if "SYNC_MANAGEMENT_URL=" in line]
    assert len(lines) == 1, printed
    assert lines[0].startswith("export SYNC_MANAGEMENT_URL="), printed
    assert "15999" in lines[0], printed
