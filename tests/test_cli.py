"""The programs as an operator runs them: health checks and device management."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from tests.conftest import MODEL_PATH, ROOT, Services, account_url


async def _run(services: Services, module: str, *args: str, **env: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        env={
            **os.environ,
            "SYNC_AMQP_URL": services.amqp_url,
            "SYNC_DATABASE_URL": services.database_url,
            "SYNC_MODEL": str(MODEL_PATH),
            **env,
        },
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


@pytest.mark.usefixtures("schema")
async def test_worker_check_is_healthy_with_services(services: Services, amqp):
    assert await _run(services, "worker", "--check") == (0, "healthy\n")


async def test_worker_check_fails_without_database(services: Services):
    code, output = await _run(
        services, "worker", "--check", SYNC_DATABASE_URL="postgresql://sync:sync@127.0.0.1:1/sync"
    )
    assert code == 1 and output.startswith("unhealthy: ")


@pytest.mark.usefixtures("pg")
async def test_device_lifecycle_and_agent_check(services: Services, tmp_path):
    db = str(tmp_path / "cli.sqlite")
    await _run(services, "syncctl", "device", "remove", "cli-dev")  # left by an aborted run
    assert (await _run(services, "device_agent", "--check", "--device", "cli-dev", "--db", db))[
        0
    ] == 1

    code, output = await _run(services, "syncctl", "device", "add", "cli-dev", "--user", "5")
    registered, user, secret = output.splitlines()
    assert (code, registered, user) == (
        0,
        "device cli-dev registered for user 5",
        "amqp user: device.cli-dev",
    )
    own_account = account_url(services, "cli-dev", secret.removeprefix("amqp secret: "))
    assert await _run(services, "syncctl", "device", "list") == (0, "cli-dev\tuser=5\toffline\n")
    check = ("device_agent", "--check", "--device", "cli-dev", "--db", db)
    assert await _run(services, *check, SYNC_AMQP_URL=own_account) == (0, "healthy\n")

    assert (await _run(services, "syncctl", "device", "remove", "cli-dev"))[0] == 0
    assert await _run(services, "syncctl", "device", "list") == (0, "")
    # The account is revoked with the registration.
    assert (await _run(services, *check, SYNC_AMQP_URL=own_account))[0] == 1


async def test_bad_model_file_is_refused_with_its_position(services: Services, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("entities: {A: {table: a, access: [{roles: [R], read: [nope]}]}}")
    code, output = await _run(services, "syncctl", "--model", str(bad), "db", "init")
    assert code == 2
    assert f"{bad}: entities.A.access[0].read: unknown members ['nope']" in output


@pytest.mark.usefixtures("pg")
async def test_device_id_that_jobs_could_not_carry_is_refused(services: Services):
    code, output = await _run(services, "syncctl", "device", "add", "bad id", "--user", "5")
    assert code == 2
    assert "'bad id' is not a valid device id" in output
    assert await _run(services, "syncctl", "device", "list") == (0, "")
