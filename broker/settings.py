"""Settings every program shares: flags or ``SYNC_*`` environment variables."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["BrokerSettings"]


class BrokerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNC_", frozen=True, extra="ignore")

    amqp_url: str = "amqp://sync:sync@127.0.0.1:5673/"
