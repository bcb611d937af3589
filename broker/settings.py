"""Settings every program shares: flags or ``SYNC_*`` environment variables."""

from __future__ import annotations

import argparse
from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.errors import ConfigurationError
from broker.logs import LogFormat

__all__ = ["BrokerSettings", "load_settings"]

S = TypeVar("S", bound=BaseSettings)


class BrokerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNC_", frozen=True, extra="ignore")

    amqp_url: str = "amqp://sync:sync@127.0.0.1:5673/"
    log_format: LogFormat = "text"
    # Where sync-worker and sync-agent serve /metrics, /healthz and /readyz; off when the
    # port is unset. Loopback by default; 0.0.0.0 in a container, for the scraper.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"


def load_settings(cls: type[S], args: argparse.Namespace, parser: argparse.ArgumentParser) -> S:
    """``cls`` from the flags given in ``args`` and ``SYNC_*`` variables; a missing or
    wrong value raises ``ConfigurationError`` naming its flag and variable.

    Example::

        settings = load_settings(WorkerSettings, parser.parse_args(), parser)
    """
    given = {
        name: value
        for name, value in vars(args).items()
        if value is not None and name in cls.model_fields
    }
    try:
        return cls(**given)
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        flags = [
            a.option_strings[0] for a in parser._actions if a.dest == name and a.option_strings
        ]
        where = f"{flags[0]} or SYNC_{name.upper()}" if flags else f"SYNC_{name.upper()}"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigurationError(f"setting {name} ({where}): {message}") from None
