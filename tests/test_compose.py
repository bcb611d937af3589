"""docker-compose.yml cannot run here (no Docker engine); check what can be checked.

Pure file checks: the YAML, the Dockerfile and the seed, held to the settings classes,
the console scripts and their argument parsers, and the example model.
"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from itertools import takewhile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from device_agent.settings import AgentSettings
from worker import model as worker_model
from worker.settings import ServerSettings, WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
EXAMPLE_MODEL = worker_model.EXAMPLE_MODEL
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# Services running the project's image, and those of them with the operator's rights.
APP_SERVICES = ("init", "worker", "agent", "sync")
SERVER_SERVICES = ("init", "worker", "sync")
DEVICE = "demo-device"

_PROGRAM = re.compile(r"sync[a-z-]*")
# Words after which a shell word is a program; the shell words that end a command.
_PROGRAM_POSITION = {"exec", "retry", "then", "else", "do", "&&", "||", ";", "|"}
_CONTROL = {"&&", "||", ";", "|"}


def _shell(argv: list[str]) -> tuple[str, list[str]] | None:
    """``(script, "$@")`` of ``sh -c SCRIPT [NAME ARGS...]``, with compose's ``$$`` escape
    undone; ``None`` for any other command."""
    if argv[0] not in ("sh", "bash"):
        return None
    assert "c" in argv[1], argv
    return argv[2].replace("$$", "$"), argv[4:]


def _calls(argv: list[str]) -> list[list[str]]:
    """Every call of a ``sync*`` program in a command, as the argv it runs with."""
    if argv[0] in ("CMD", "CMD-SHELL"):
        argv = ["sh", "-c", argv[1]] if argv[0] == "CMD-SHELL" else argv[1:]
    shell = _shell(argv)
    if shell is None:
        return [argv]
    script, args = shell
    calls = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if _PROGRAM.fullmatch(word) and (i == 0 or words[i - 1] in _PROGRAM_POSITION):
                call = takewhile(lambda w: w not in _CONTROL and not w.endswith(";"), words[i:])
                calls.append([part for w in call for part in (args if w == "$@" else [w])])
    return calls


def _service_calls(name: str) -> list[list[str]]:
    service = SERVICES[name]
    calls = _calls(service["command"])
    if "healthcheck" in service:
        calls += _calls(service["healthcheck"]["test"])
    return calls


def _calls_of(name: str, *prefix: str) -> list[list[str]]:
    return [call for call in _service_calls(name) if call[: len(prefix)] == list(prefix)]


def _option(call: list[str], option: str) -> str:
    return call[call.index(option) + 1]


def _script(name: str) -> str:
    shell = _shell(SERVICES[name]["command"])
    assert shell is not None, name
    return shell[0]


def _accepted(call: list[str]) -> None:
    """The program's own argument parser takes ``call`` (argparse exits on an error)."""
    module = importlib.import_module(SCRIPTS[call[0]].partition(":")[0])
    try:
        module._parser().parse_args(call[1:])
    except SystemExit:
        pytest.fail(f"{shlex.join(call)}: refused by {call[0]} (its message is on stderr)")


def _mounts(name: str) -> dict[str, str]:
    """Container path -> volume spec (``source:target[:mode]``) of a service."""
    return {spec.split(":")[1]: spec for spec in SERVICES[name].get("volumes", [])}


def _example_model() -> dict[str, Any]:
    entities: dict[str, Any] = yaml.safe_load(EXAMPLE_MODEL.read_text())["entities"]
    return entities


def test_names_the_services_with_two_workers():
    assert set(SERVICES) == {"rabbitmq", "postgres", "init", "seed", "worker", "agent", "sync"}
    assert SERVICES["worker"]["deploy"]["replicas"] == 2


def test_app_settings_are_ones_the_code_reads():
    known = {
        f"SYNC_{name.upper()}"
        for settings in (WorkerSettings, AgentSettings, ServerSettings)
        for name in settings.model_fields
    }
    for name in APP_SERVICES:
        assert set(SERVICES[name]["environment"]) <= known, name
    for name in SERVER_SERVICES:
        environment = SERVICES[name]["environment"]
        assert {"SYNC_AMQP_URL", "SYNC_DATABASE_URL", "SYNC_MODEL"} <= set(environment), name


def test_model_path_is_the_one_the_image_writes():
    written = re.findall(r"^\s*&& (syncctl model example) > (\S+)\s*$", DOCKERFILE, re.MULTILINE)
    assert len(written) == 1, "the Dockerfile writes the example model once"
    command, path = written[0]
    _accepted(shlex.split(command))
    assert re.search(rf"^\s*SYNC_MODEL={re.escape(path)}\s*$", DOCKERFILE, re.MULTILINE)
    for name in SERVER_SERVICES:
        assert SERVICES[name]["environment"]["SYNC_MODEL"] == path, name


def test_image_installs_a_built_wheel_as_a_user():
    assert re.search(r"pip wheel .*--wheel-dir /wheels \.$", DOCKERFILE, re.MULTILINE)
    assert "pip install -e" not in DOCKERFILE and "--editable" not in DOCKERFILE
    final_stage = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    # Only the wheels reach the final image, never the source tree.
    copies = re.findall(r"^COPY (.*)$", final_stage, re.MULTILINE)
    assert copies == ["--from=build /wheels /tmp/wheels"]
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")


def test_credentials_match_between_services_and_urls():
    rabbit = SERVICES["rabbitmq"]["environment"]
    postgres = SERVICES["postgres"]["environment"]
    worker = SERVICES["worker"]["environment"]
    user, password = rabbit["RABBITMQ_DEFAULT_USER"], rabbit["RABBITMQ_DEFAULT_PASS"]
    database = (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    for name in SERVER_SERVICES:
        amqp_url = SERVICES[name]["environment"]["SYNC_AMQP_URL"]
        assert amqp_url.startswith(f"amqp://{user}:{password}@rabbitmq:5672/"), name
    for name in ("init", "sync"):
        assert SERVICES[name]["environment"]["SYNC_DATABASE_URL"] == database, name
    assert SERVICES["seed"]["command"][:2] == ["psql", database]
    assert SERVICES["seed"]["image"] == SERVICES["postgres"]["image"]
    # Workers log in with the read-only role init creates, with the password init sets.
    [db_init] = _calls_of("init", "syncctl", "db", "init")
    role = _option(db_init, "--worker-role")
    assert worker["SYNC_DATABASE_URL"] == (
        f"postgresql://{role}:{SERVICES['init']['environment']['SYNC_WORKER_DB_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )


def test_commands_are_the_projects_programs_with_options_they_take():
    for name in APP_SERVICES:
        calls = _service_calls(name)
        assert calls, name
        for call in calls:
            assert call[0] in SCRIPTS, (name, call)
            _accepted(call)


def test_rabbitmq_is_healthy_only_when_amqp_answers():
    test = SERVICES["rabbitmq"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    probes = [shlex.split(part) for part in test[1].split("&&")]
    # `ping` answers before the broker has booted; these need it booted and listening.
    assert ["rabbitmq-diagnostics", "-q", "check_running"] in probes
    assert ["rabbitmq-diagnostics", "-q", "check_port_connectivity"] in probes
    postgres = SERVICES["postgres"]["healthcheck"]["test"]
    assert postgres[:2] == ["CMD", "pg_isready"] and _option(postgres, "-h") == "127.0.0.1"
    for needed in ("rabbitmq", "postgres"):
        assert SERVICES["init"]["depends_on"][needed] == {"condition": "service_healthy"}


def test_init_is_idempotent_and_keeps_the_device_secret():
    script = _script("init")
    adds = _calls_of("init", "syncctl", "device", "add", DEVICE)
    assert adds, "init registers the sample device"
    secret_file = _option(adds[0], "--secret-file")
    assert all(_option(add, "--secret-file") == secret_file for add in adds)
    # With its secret file present, the device is only added if it is missing; without
    # one (first `up`), a plain add writes the file.
    assert any("--if-missing" in add for add in adds)
    guard = f"if [ -s {secret_file} ]; then"
    assert guard in script
    after_guard = script.split(guard, 1)[1].split("else", 1)[0]
    assert "--if-missing" in after_guard
    # Every step is retried while the services settle, a bounded number of times.
    lines = [line.strip() for line in script.splitlines()]
    steps = [line for line in lines if "syncctl" in line and not line.startswith("#")]
    assert steps and all(step.startswith("retry syncctl ") for step in steps)
    assert re.search(r'\[ "\$n" -ge \d+ \]; then\n\s*echo .*\n\s*return "\$status"', script)
    assert "sleep" in script


def test_sample_agent_logs_in_as_its_device_not_the_operator():
    environment = SERVICES["agent"]["environment"]
    assert environment["SYNC_DEVICE_ID"] == DEVICE
    # No operator credentials reach the agent's container.
    assert not {"SYNC_AMQP_URL", "SYNC_DATABASE_URL", "SYNC_MANAGEMENT_URL"} & set(environment)
    rabbit = SERVICES["rabbitmq"]["environment"]
    secret_file = _option(_calls_of("init", "syncctl", "device", "add", DEVICE)[0], "--secret-file")
    login = f'SYNC_AMQP_URL="amqp://device.{DEVICE}:$(cat {secret_file})@rabbitmq:5672/"'
    for command in (SERVICES["agent"]["command"], SERVICES["agent"]["healthcheck"]["test"]):
        argv = command[1:] if command[0] == "CMD" else command
        shell = _shell(argv)
        assert shell is not None and shell[0].startswith(f"{login} exec sync-agent "), command
        assert f"{rabbit['RABBITMQ_DEFAULT_USER']}:" not in shell[0]


def test_secret_volume_is_shared_by_init_and_agent():
    secret_file = PurePosixPath(
        _option(_calls_of("init", "syncctl", "device", "add", DEVICE)[0], "--secret-file")
    )
    folder = str(secret_file.parent)
    init, agent = _mounts("init").get(folder), _mounts("agent").get(folder)
    assert init and agent, f"init and agent both mount {folder}"
    volume = init.split(":")[0]
    assert volume in COMPOSE["volumes"], "a named volume, not a host folder"
    assert agent == f"{volume}:{folder}:ro", "the agent only reads the secret"


def test_workers_and_agent_serve_metrics_and_health():
    for name, program in (("worker", "sync-worker"), ("agent", "sync-agent")):
        assert int(SERVICES[name]["environment"]["SYNC_METRICS_PORT"]) > 0, name
        [check] = _calls(SERVICES[name]["healthcheck"]["test"])
        assert check == [program, "--check"], name
    # The sync call waits for healthy workers and agent, so its result shows a real sync.
    for needed in ("worker", "agent"):
        assert SERVICES["sync"]["depends_on"][needed] == {"condition": "service_healthy"}


def test_sample_sync_fits_the_example_model():
    """The seed rows, the sample user's roles and the sync call name what the example
    model has, so `docker compose up` ends in a sync rather than a rejection."""
    model = _example_model()
    columns = {
        entity["table"]: {
            "id",
            "version",
            "autocommitted",
            *entity.get("attributes", {}),
            *(a["column"] for a in entity.get("associations", {}).values()),
        }
        for entity in model.values()
        if "table" in entity
    }
    source, target = SERVICES["seed"]["volumes"][0].split(":")[:2]
    assert SERVICES["seed"]["command"][-1] == target
    inserts = re.findall(r"INSERT INTO (\w+)\s*\(([^)]*)\)", (ROOT / source).read_text())
    assert inserts
    for table, names in inserts:
        assert {name.strip() for name in names.split(",")} <= columns[table], table

    [roles] = _calls_of("init", "syncctl", "user", "roles")
    [add, *_] = _calls_of("init", "syncctl", "device", "add", DEVICE)
    [sync] = _calls_of("sync", "syncctl", "sync")
    user = _option(sync, "--user")
    assert roles[3] == _option(add, "--user") == user
    assert _option(sync, "--device") == DEVICE
    model_roles = {
        role for e in model.values() for rule in e.get("access", []) for role in rule["roles"]
    }
    assert set(_option(roles, "--set").split(",")) <= model_roles
    refs = [word for word in sync[2:] if re.fullmatch(r"[A-Za-z.]+:\d+", word)]
    assert refs
    for ref in refs:
        entity = model[ref.split(":")[0]]
        # Anything else would reject the whole job (SPEC §4).
        assert entity.get("offline") and "table" in entity and "generalization" not in entity
