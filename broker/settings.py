"""Settings every program shares: flags or ``SYNC_*`` environment variables."""

from __future__ import annotations

from typing import Any, TypeVar

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
    # Where sync-worker and sync-agent serve /metrics, /healthz and /readyz; off when unset.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)


def load_settings(cls: type[S], **flags: Any) -> S:
    """``cls`` from the given flags and ``SYNC_*`` variables; a missing or wrong value
    raises ``ConfigurationError`` naming the setting and its variable.

    Example::

        settings = load_settings(WorkerSettings, prefetch=32)
    """
    try:
        return cls(**flags)
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigurationError(
            f"setting {name} (--{name.replace('_', '-')} or SYNC_{name.upper()}): {message}"
        ) from None
