"""The install a user makes: build the wheel, install it into a fresh virtualenv outside
the repository, and run the installed programs from outside it too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.wire import json_schema
from tests.conftest import MODEL_PATH, ROOT, Finished, MakeDevice, Services, insert, run_process
from worker.model import EXAMPLE_MODEL, parse_model

# What a checkout holds that is not the source: left out of the copy the wheel is built
# from (an in-tree build would leave build/ behind in the repository, and a stale
# build/lib would end up in the next wheel).
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".services",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "node_modules",
    "*.sqlite*",
)


@dataclass(frozen=True)
class Installed:
    bin: Path
    cwd: Path
    wheel: Path

    def env(self, **sync: str) -> dict[str, str]:
        """The user's environment: nothing of this repository's, the venv's scripts first."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("SYNC_") and key not in ("PYTHONPATH", "VIRTUAL_ENV")
        }
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env.update({f"SYNC_{key.upper()}": value for key, value in sync.items()})
        return env


def _run(*command: str | Path, cwd: Path, timeout: float = 600) -> None:
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("install")
    assert not base.resolve().is_relative_to(ROOT)
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    wheels = base / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, source, cwd=base)
    (wheel,) = wheels.glob("sync_to_device-*.whl")
    venv = base / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=base)
    _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=base)
    cwd = base / "elsewhere"
    cwd.mkdir()
    return Installed(venv / "bin", cwd, wheel)


async def _installed(
    installed: Installed, program: str, *args: str, timeout: float = 60, **sync: str
) -> Finished:
    """Run an installed program from outside the repository."""
    return await run_process(
        str(installed.bin / program),
        *args,
        cwd=installed.cwd,
        env=installed.env(**sync),
        timeout=timeout,
    )


def test_wheel_holds_the_packages_and_the_example_model(installed: Installed):
    import zipfile

    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert {
        "broker/wire.py",
        "broker/py.typed",
        "worker/rules/parser.py",
        "worker/examples/field_service.yaml",
        "device_agent/views.py",
        "syncctl/roles.py",
    } <= names
    assert not any(name.startswith(("tests/", "bench/", "examples/")) for name in names)


@pytest.mark.parametrize("program", ["syncctl", "sync-worker", "sync-agent"])
async def test_installed_programs_answer_help(installed: Installed, program: str):
    ran = await _installed(installed, program, "--help")
    assert ran.code == 0, ran.stderr
    assert f"usage: {program}" in ran.stdout


async def test_installed_packages_import_from_the_venv(installed: Installed):
    code = (
        "import worker.rules, broker.wire, device_agent.views, syncctl.roles, worker, sys; "
        "print(worker.__file__); print(sys.prefix)"
    )
    ran = await _installed(installed, "python", "-c", code)
    assert ran.code == 0, ran.stderr
    module, prefix = ran.stdout.splitlines()
    assert Path(prefix) == installed.bin.parent
    assert Path(module).is_relative_to(installed.bin.parent)
    assert not Path(module).is_relative_to(ROOT)


async def test_installed_syncctl_prints_the_example_model(installed: Installed):
    ran = await _installed(installed, "syncctl", "model", "example")
    assert ran.code == 0, ran.stderr
    model = parse_model(ran.stdout, "syncctl model example")
    assert "WorkOrder" in model.entities
    assert ran.stdout == EXAMPLE_MODEL.read_text(encoding="utf-8")


async def test_installed_syncctl_prints_the_job_schema(installed: Installed):
    ran = await _installed(installed, "syncctl", "schema", "job")
    assert ran.code == 0, ran.stderr
    assert json.loads(ran.stdout) == json_schema("job")


@pytest.mark.usefixtures("schema")
async def test_installed_worker_check_is_healthy(installed: Installed, services: Services):
    ran = await _installed(
        installed,
        "sync-worker",
        "--check",
        model=str(MODEL_PATH.resolve()),
        amqp_url=services.amqp_url,
        database_url=services.database_url,
    )
    assert (ran.code, ran.stdout.strip()) == (0, "healthy"), ran.stderr


@pytest.mark.usefixtures("schema")
async def test_installed_worker_check_fails_on_a_missing_model(
    installed: Installed, services: Services
):
    ran = await _installed(
        installed,
        "sync-worker",
        "--check",
        model=str(installed.cwd / "no-such-model.yaml"),
        amqp_url=services.amqp_url,
        database_url=services.database_url,
    )
    assert ran.code == 1, (ran.stdout, ran.stderr)
    assert "healthy" not in ran.stdout
    assert "no-such-model.yaml" in ran.stderr


@pytest.mark.usefixtures("worker")
async def test_installed_syncctl_syncs_an_object_to_a_device(
    installed: Installed, services: Services, make_device: MakeDevice, pg
):
    device = await make_device(7, ["Admin"])
    note = await insert(pg, "t_note", text="x")

    ran = await _installed(
        installed,
        "syncctl",
        "sync",
        "--user",
        "7",
        "--device",
        device.device_id,
        f"Note:{note}",
        amqp_url=services.amqp_url,
        database_url=services.database_url,
    )

    assert ran.code == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["status"] == "done", result
    assert (result["synced"], result["objects"]) == (
        1,
        [{"entity": "Note", "id": note, "outcome": "synced", "reason": None}],
    )
    await device.store.wait_for_batches(result["batch_ids"], timeout=10)
    assert await device.store.get("Note", note) == {"text": "x"}
