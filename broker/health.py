"""The operations endpoint of ``sync-worker`` and ``sync-agent`` (SPEC §14).

``/metrics`` is prometheus_client's exposition of a registry, ``/healthz`` answers while
the process runs, ``/readyz`` asks the program's own readiness check. The HTTP server
runs in a daemon thread so a slow scrape never holds the event loop; the readiness check
runs *on* the loop (it reads connection state that belongs to the loop), and a check that
does not answer in time is reported as not ready rather than waited for.

Example::

    async def ready() -> str | None:
        return None if connection.is_open else "not connected to the broker"

    async with HealthServer(ready=ready, port=settings.metrics_port) as health:
        log.info("operations endpoint on port %d", health.port)
        await run_until_stopped()
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager, nullcontext
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import urlsplit

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from broker.errors import ConfigurationError
from broker.settings import BrokerSettings

__all__ = ["HealthServer", "ReadinessCheck", "operations_endpoint"]

log = logging.getLogger(__name__)

# None means ready; a string is the reason the program is not.
ReadinessCheck = Callable[[], Coroutine[Any, Any, str | None]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        registry: CollectorRegistry,
        ready: ReadinessCheck | None,
        loop: asyncio.AbstractEventLoop,
        ready_timeout: float,
    ) -> None:
        super().__init__(address, _Handler)
        self.registry = registry
        self.ready = ready
        self.loop = loop
        self.ready_timeout = ready_timeout

    def readiness(self) -> str | None:
        """Runs the check on the program's loop; called from a request thread."""
        if self.ready is None:
            return None
        if self.loop.is_closed():
            return "event loop closed"
        future = asyncio.run_coroutine_threadsafe(self.ready(), self.loop)
        try:
            return future.result(timeout=self.ready_timeout)
        except TimeoutError:
            future.cancel()
            return "readiness check timed out"
        except Exception as exc:
            # The endpoint answers "not ready" whatever the check raised; the log keeps why.
            log.warning("readiness check failed", exc_info=True)
            return f"readiness check failed: {type(exc).__name__}"


class _Handler(MetricsHandler):
    def do_GET(self) -> None:
        server = cast(_Server, self.server)
        path = urlsplit(self.path).path
        if path == "/metrics":
            self.registry = server.registry
            super().do_GET()
        elif path == "/healthz":
            self._reply(200, "ok")
        elif path == "/readyz":
            reason = server.readiness()
            if reason is None:
                self._reply(200, "ready")
            else:
                self._reply(503, reason)
        else:
            self._reply(404, "not found")

    def _reply(self, status: int, text: str) -> None:
        body = f"{text}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (0: a free port)."""

    def __init__(
        self,
        *,
        ready: ReadinessCheck | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        registry: CollectorRegistry = REGISTRY,
        ready_timeout: float = 5.0,
    ) -> None:
        self._ready = ready
        self._address = (host, port)
        self._registry = registry
        self._ready_timeout = ready_timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the given one before)."""
        return self._server.server_address[1] if self._server else self._address[1]

    async def start(self) -> None:
        """Binds and serves; readiness checks will run on the calling event loop."""
        if self._server is not None:
            return
        try:
            self._server = _Server(
                self._address,
                registry=self._registry,
                ready=self._ready,
                loop=asyncio.get_running_loop(),
                ready_timeout=self._ready_timeout,
            )
        except OSError as error:
            host, port = self._address
            raise ConfigurationError(
                f"cannot serve /metrics on {host}:{port}: {error.strerror}"
            ) from None
        # A short poll interval keeps stop() quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="health-server", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        """Stops serving and closes the socket; safe to call twice or before start()."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None or thread is None:
            return

        def shut() -> None:
            server.shutdown()  # returns once serve_forever has (within one poll interval)
            server.server_close()
            thread.join()

        # In a thread: shutdown() blocks, and the loop must keep answering readiness
        # checks that requests in flight are waiting for.
        await asyncio.to_thread(shut)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


def operations_endpoint(
    settings: BrokerSettings, ready: ReadinessCheck
) -> AbstractAsyncContextManager[object]:
    """The endpoint ``settings.metrics_port`` asks for, or nothing when it is unset.

    Example::

        async with operations_endpoint(settings, worker.readiness):
            await stop.wait()
    """
    if settings.metrics_port is None:
        return nullcontext()
    return HealthServer(ready=ready, host=settings.metrics_host, port=settings.metrics_port)
