"""docker-compose.yml cannot run here (no Docker engine); check what can be checked."""

from __future__ import annotations

import shlex
import tomllib
from itertools import pairwise
from pathlib import Path

import yaml

from device_agent.settings import AgentSettings
from worker.settings import ServerSettings, WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
APP_SERVICES = ("init", "worker", "agent")


def test_names_the_services_with_two_workers():
    assert set(COMPOSE["services"]) == {"rabbitmq", "postgres", "init", "worker", "agent"}
    assert COMPOSE["services"]["worker"]["deploy"]["replicas"] == 2


def test_app_settings_are_ones_the_code_reads():
    known = {
        f"SYNC_{name.upper()}"
        for settings in (WorkerSettings, AgentSettings, ServerSettings)
        for name in settings.model_fields
    }
    for name in APP_SERVICES:
        environment = COMPOSE["services"][name]["environment"]
        assert set(environment) <= known, name
        assert {"SYNC_AMQP_URL", "SYNC_DATABASE_URL", "SYNC_MODEL"} <= set(environment)
        model = environment["SYNC_MODEL"].removeprefix("/app/")
        assert (ROOT / model).is_file()


def test_credentials_match_between_services_and_urls():
    rabbit = COMPOSE["services"]["rabbitmq"]["environment"]
    postgres = COMPOSE["services"]["postgres"]["environment"]
    init = COMPOSE["services"]["init"]["environment"]
    worker = COMPOSE["services"]["worker"]["environment"]
    user, password = rabbit["RABBITMQ_DEFAULT_USER"], rabbit["RABBITMQ_DEFAULT_PASS"]
    for environment in (init, worker):
        assert environment["SYNC_AMQP_URL"].startswith(f"amqp://{user}:{password}@rabbitmq:5672/")
    assert init["SYNC_DATABASE_URL"] == (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    # Workers log in with the read-only role init creates, with the password init sets.
    words = shlex.split(COMPOSE["services"]["init"]["command"][-1])
    role = words[words.index("--worker-role") + 1]
    assert worker["SYNC_DATABASE_URL"] == (
        f"postgresql://{role}:{init['SYNC_WORKER_DB_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )


def test_commands_are_the_projects_console_scripts():
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    for name in APP_SERVICES:
        command = COMPOSE["services"][name]["command"]
        words = shlex.split(command[-1]) if command[0] == "sh" else command
        # The first word and each word after "&&" is a program.
        programs = {words[0]} | {after for word, after in pairwise(words) if word == "&&"}
        assert programs and programs <= scripts, (name, programs)
