"""Creates and removes device accounts through RabbitMQ's management HTTP API."""

from __future__ import annotations

import secrets
from urllib.parse import quote, unquote, urlsplit

import httpx

from broker.accounts import DEVICE_LIMITS, device_account, device_permissions
from broker.connection import amqp_urls
from broker.errors import ProgramError

__all__ = ["BrokerAccounts", "BrokerAccountsError"]


class BrokerAccountsError(ProgramError):
    """The management API is out of reach or refused a request; the message says which."""


class BrokerAccounts:
    """Device accounts on the broker, managed with the operator's (administrator) account.

    Example::

        accounts = BrokerAccounts("http://127.0.0.1:15673", "amqp://sync:sync@127.0.0.1:5673/")
        secret = await accounts.create_device_account("dev-1")  # shown once, never logged
    """

    def __init__(self, management_url: str, amqp_url: str) -> None:
        # The broker's own URL (the first node's, when it names several).
        parts = urlsplit(amqp_urls(amqp_url)[0])
        self._auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        self._vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self._base = management_url.rstrip("/")

    async def create_device_account(self, device_id: str) -> str:
        """Create (or reset) the device's AMQP user, its permissions and its connection and
        channel limits (``DEVICE_LIMITS``); returns its secret.

        Resetting deletes the user first: the broker closes a deleted user's connections,
        while a new password alone leaves connections made with the old secret open.
        """
        user = quote(device_account(device_id), safe="")
        secret = secrets.token_urlsafe(24)
        async with self._client() as client:
            await self._call(client, "DELETE", f"/api/users/{user}", missing_ok=True)
            await self._call(client, "PUT", f"/api/users/{user}", {"password": secret, "tags": ""})
            vhost = quote(self._vhost, safe="")
            await self._call(
                client, "PUT", f"/api/permissions/{vhost}/{user}", device_permissions(device_id)
            )
            for limit, value in DEVICE_LIMITS.items():
                path = f"/api/user-limits/{user}/{limit}"
                await self._call(client, "PUT", path, {"value": value})
        return secret

    async def check(self) -> None:
        """Raise ``BrokerAccountsError`` unless the API answers and the operator's account
        is an administrator, so a registration fails before it touches anything."""
        async with self._client() as client:
            response = await self._call(client, "GET", "/api/whoami")
        tags = response.json().get("tags", [])
        tags = tags.split(",") if isinstance(tags, str) else tags
        if "administrator" not in tags:
            raise BrokerAccountsError(
                f"the management account {self._auth[0]!r} is not an administrator: it "
                "cannot create device accounts"
            )

    async def has_device_account(self, device_id: str) -> bool:
        user = quote(device_account(device_id), safe="")
        async with self._client() as client:
            response = await self._call(client, "GET", f"/api/users/{user}", missing_ok=True)
        return response.status_code != 404

    async def delete_device_account(self, device_id: str) -> None:
        """Delete the device's AMQP user (its open connections are closed by the broker)."""
        user = quote(device_account(device_id), safe="")
        async with self._client() as client:
            await self._call(client, "DELETE", f"/api/users/{user}", missing_ok=True)

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self._base, auth=self._auth, timeout=10.0)

    async def _call(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        body: dict[str, str] | dict[str, int] | None = None,
        *,
        missing_ok: bool = False,
    ) -> httpx.Response:
        try:
            response = await client.request(method, path, json=body)
        except httpx.HTTPError as error:
            raise BrokerAccountsError(
                f"cannot reach the RabbitMQ management API at {self._base} "
                f"(SYNC_MANAGEMENT_URL): {error!r}"
            ) from None
        if response.status_code == 404 and missing_ok:
            return response
        if response.status_code == 401:
            raise BrokerAccountsError(
                f"the management API at {self._base} refused the login of {self._auth[0]!r}"
            )
        if response.is_error:
            # The path names the account, never the secret, so the message is safe to log.
            raise BrokerAccountsError(
                f"{method} {path}: {response.status_code} {response.text[:200]}"
            )
        return response
