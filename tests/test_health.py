"""The operations endpoint, served for real on loopback; needs no other services."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from broker.health import HealthServer, ReadinessCheck
from broker.models import SyncResult
from device_agent import metrics as agent_metrics
from worker import metrics as worker_metrics
from worker.answers import answer_of

Serve = Callable[[ReadinessCheck | None], Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts a HealthServer with the given readiness check; a client for it."""
    servers: list[HealthServer] = []
    clients: list[httpx.AsyncClient] = []

    async def start(ready: ReadinessCheck | None) -> httpx.AsyncClient:
        server = HealthServer(ready=ready, ready_timeout=0.3)
        await server.start()
        servers.append(server)
        assert server.port != 0
        # trust_env=False: a proxy from the environment must not stand between us.
        client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}", trust_env=False, timeout=5
        )
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.aclose()
    for server in servers:
        await server.stop()


async def ready_now() -> str | None:
    return None


async def test_metrics_exposes_sync_families(serve: Serve) -> None:
    worker_metrics.record_job(
        answer_of(
            SyncResult(job_id="health-1", status="done", synced=3, skipped=1, batch_ids=("b1",))
        ),
        0.2,
    )
    agent_metrics.record_dropped("wrong-device")
    client = await serve(None)

    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()

    def has(prefix: str) -> bool:
        return any(line.startswith(prefix) for line in lines)

    assert "# TYPE sync_jobs_total counter" in lines
    assert has('sync_jobs_total{status="failed"} ')  # pre-initialised label
    assert has('sync_objects_total{outcome="synced"} ')
    assert has("sync_job_duration_seconds_count ")
    assert has('sync_batches_dropped_total{reason="wrong-device"} ')
    done = next(line for line in lines if line.startswith('sync_jobs_total{status="done"} '))
    assert float(done.split()[-1]) >= 1


async def test_healthz(serve: Serve) -> None:
    client = await serve(None)
    response = await client.get("/healthz")
    assert (response.status_code, response.text) == (200, "ok\n")


async def test_readyz_ready(serve: Serve) -> None:
    client = await serve(ready_now)
    response = await client.get("/readyz")
    assert (response.status_code, response.text) == (200, "ready\n")


async def test_readyz_not_ready_gives_reason(serve: Serve) -> None:
    async def ready() -> str | None:
        return "not connected to the broker"

    client = await serve(ready)
    response = await client.get("/readyz")
    assert (response.status_code, response.text) == (503, "not connected to the broker\n")


async def test_readyz_check_that_hangs_times_out(serve: Serve) -> None:
    cancelled = asyncio.Event()

    async def ready() -> str | None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return None

    client = await serve(ready)
    response = await client.get("/readyz")
    assert (response.status_code, response.text) == (503, "readiness check timed out\n")
    # The abandoned check does not linger on the loop.
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_readyz_check_that_raises(serve: Serve) -> None:
    async def ready() -> str | None:
        raise ConnectionError("boom")

    client = await serve(ready)
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.text == "readiness check failed: ConnectionError\n"


async def test_other_paths_404(serve: Serve) -> None:
    client = await serve(ready_now)
    for path in ("/", "/metricsx", "/healthz/more"):
        assert (await client.get(path)).status_code == 404


async def test_check_runs_on_the_loop_which_stays_responsive(serve: Serve) -> None:
    loop = asyncio.get_running_loop()
    seen: list[tuple[asyncio.AbstractEventLoop, int]] = []
    ticks = 0

    async def ready() -> str | None:
        seen.append((asyncio.get_running_loop(), threading.get_ident()))
        await asyncio.sleep(0.1)  # other tasks run meanwhile
        return None

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    client = await serve(ready)
    ticker = asyncio.create_task(tick())
    try:
        response = await client.get("/readyz")
    finally:
        ticker.cancel()
    assert response.status_code == 200
    assert seen == [(loop, threading.get_ident())]
    assert ticks >= 5


async def test_stop_is_quick_and_idempotent() -> None:
    server = HealthServer()
    await server.stop()  # before start: nothing to do
    await server.start()
    port = server.port
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        await asyncio.wait_for(server.stop(), 1)
        await server.stop()
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/healthz")


async def test_context_manager_on_a_given_host() -> None:
    async with (
        HealthServer(host="127.0.0.1", port=0) as server,
        httpx.AsyncClient(trust_env=False, timeout=5) as client,
    ):
        response = await client.get(f"http://127.0.0.1:{server.port}/healthz")
        assert response.status_code == 200
