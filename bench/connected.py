"""A connected fleet: what a device whose agent is connected costs the broker.

    .venv/bin/python -m bench.connected [--devices 10000] [--processes 4]
        [--kernel-buffers-devices 1000]

Registers ``--devices`` devices as registration does, in bulk: their ``sync.device``
rows in one statement, their queues and bindings (``declare_device_queue`` over 16
channels) and their AMQP accounts, each with its own secret, the permissions of
``device_permissions`` and the limits of ``DEVICE_LIMITS``, in one import of definitions
through the management API (``POST /api/definitions``). A sample of accounts is made one
by one with ``BrokerAccounts.create_device_account`` as well, to time the per-account way
and to check that an imported account has the same permissions and limits.

Then a real ``DeviceAgent`` per device, each with its own SQLite file and logging in with
its own account, runs in ``--processes`` agent processes (``python -m bench.connected
--serve-agents SPEC``, which raise their file-descriptor limit to the hard limit). Each
agent holds what a device holds: one connection, one channel, the passive declare of its
queue, a consumer. The broker's memory is read as ``bench.fleet`` reads it (the VM total
after the queues went idle and a garbage collection) three times: before, once the
devices are registered, once the agents are connected; the last difference per
connected agent is the figure. The same scrape gives the broker's connections, channels,
consumers and open file descriptors. The broker's CPU while the fleet idles is read from
``/proc`` for the node of ``scripts/services.sh``.

With ``--kernel-buffers-devices N`` (N > 0) the part runs twice: first with N devices on
the broker restarted with the kernel's socket buffers (``SYNC_RABBIT_TCP_BUFFER=`` for
``scripts/services.sh``: about 4 MB per connection here, so N stays small), then with
``--devices`` on the broker restarted as the caller's environment configures it (the
shipped 32 KiB buffers unless ``SYNC_RABBIT_TCP_BUFFER`` is set). Restarting stops the
broker: run it on services nothing else uses. Every account, queue and row is removed at
the end, even on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

from bench.fleet import MB, Memory, broker_memory, prometheus_url
from bench.report import Figure, as_details, as_table, progress
from bench.rig import ROOT, accounts, registered_devices, service_env
from broker.accounts import DEVICE_LIMITS, device_account, device_permissions
from broker.errors import ProgramError
from device_agent import AgentSettings, DeviceAgent
from device_agent.agent import open_store

__all__ = ["connected", "main"]

PREFIX = "bench-conn-"
USER_ID = 1
PROCESSES = 4
STARTING = 16  # agents connecting at once in each process
SAMPLE = 50  # accounts made one by one through the management API, for the time per account
IDLE = 10.0  # s of the connected fleet idling, for the broker's CPU
SERVICES = ROOT / "scripts" / "services.sh"
BROKER_PID = ROOT / ".services" / "rabbitmq" / "rabbitmq.pid"
# The broker's sndbuf, or ``kernel`` when tcp_listen_options leave it to the kernel.
SNDBUF = (
    'io:format("~p", [proplists:get_value(sndbuf, '
    "element(2, application:get_env(rabbit, tcp_listen_options)), kernel)])."
)


def _password_hash(secret: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: a 4-byte salt, then
    SHA-256(salt + password), in base64."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + secret.encode()).digest()).decode()


def _definitions(account_secrets: Mapping[str, str]) -> dict[str, list[dict[str, object]]]:
    """The device accounts as definitions: users with their limits, and permissions."""
    return {
        "users": [
            {
                "name": device_account(device_id),
                "password_hash": _password_hash(secret),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
                "limits": DEVICE_LIMITS,
            }
            for device_id, secret in account_secrets.items()
        ],
        "permissions": [
            {"user": device_account(device_id), "vhost": "/", **device_permissions(device_id)}
            for device_id in account_secrets
        ],
    }


class _Management:
    """The management API calls of the bench, with the services' operator account."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._client = httpx.AsyncClient(
            base_url=env["SYNC_MANAGEMENT_URL"], auth=("sync", "sync"), timeout=600
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def call(self, method: str, path: str, body: object = None) -> httpx.Response:
        response = await self._client.request(method, path, json=body)
        response.raise_for_status()
        return response

    async def account(self, device_id: str) -> tuple[list[object], list[object]]:
        """An account's permissions and limits, as the management API shows them."""
        user = quote(device_account(device_id), safe="")
        permissions = (await self.call("GET", f"/api/users/{user}/permissions")).json()
        limits = (await self.call("GET", f"/api/user-limits/{user}")).json()
        return permissions, [limit["value"] for limit in limits]

    async def delete_accounts(self, device_ids: list[str]) -> None:
        users = [device_account(device_id) for device_id in device_ids]
        await self.call("POST", "/api/users/bulk-delete", {"users": users})


async def _check_account(management: _Management, device_id: str) -> None:
    """The account has registration's permissions and limits, made either way."""
    expected = (
        [{"user": device_account(device_id), "vhost": "/", **device_permissions(device_id)}],
        [DEVICE_LIMITS],
    )
    found = await management.account(device_id)
    if found != expected:
        raise RuntimeError(f"account of {device_id}: {found}, expected {expected}")


@dataclass(frozen=True)
class _Registration:
    secrets: dict[str, str]
    queues_s: float
    import_s: float
    per_account_ms: float


@asynccontextmanager
async def _registered(
    env: dict[str, str], management: _Management, device_ids: list[str]
) -> AsyncIterator[_Registration]:
    """Rows, queues and accounts of ``device_ids``; all removed after."""
    started = time.perf_counter()
    async with registered_devices(env, USER_ID, device_ids):
        queues_s = time.perf_counter() - started
        sample, bulk = device_ids[:SAMPLE], device_ids[SAMPLE:]
        account_secrets: dict[str, str] = {}
        try:
            progress(f"{len(sample)} accounts one by one (create_device_account)")
            started = time.perf_counter()
            for device_id in sample:
                account_secrets[device_id] = await accounts(env).create_device_account(device_id)
            per_account_ms = (time.perf_counter() - started) * 1000 / max(len(sample), 1)
            progress(f"{len(bulk):,} accounts in one definitions import")
            imported = {device_id: secrets.token_urlsafe(24) for device_id in bulk}
            started = time.perf_counter()
            await management.call("POST", "/api/definitions", _definitions(imported))
            import_s = time.perf_counter() - started
            account_secrets.update(imported)
            for device_id in (*sample[:1], *bulk[:1]):
                await _check_account(management, device_id)
            progress(
                f"registered in {queues_s:.1f} s (rows, queues) + {import_s:.1f} s (import); "
                f"{per_account_ms:.0f} ms per account one by one"
            )
            yield _Registration(account_secrets, queues_s, import_s, per_account_ms)
        finally:
            progress("deleting the accounts")
            await management.delete_accounts(device_ids)


def _agent_url(amqp_url: str, device_id: str, secret: str) -> str:
    user = quote(device_account(device_id), safe="")
    host = amqp_url.split("@", 1)[1]
    return f"amqp://{user}:{secret}@{host}"


@dataclass(frozen=True)
class _Agents:
    started: int
    failed: int
    errors: dict[str, int]
    connect_s: float
    rss: float  # bytes, all agent processes
    processes: int


def _rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) * 1024
    return 0.0


def _file(folder: Path, device_id: str) -> Path:
    return folder / f"{device_id}.sqlite"


async def _device_files(folder: Path, device_ids: list[str]) -> None:
    """A store per device, copied from one fresh store: the agents open existing files, as
    devices coming back do (creating thousands of files at once timed the disk's fsyncs,
    not the fleet)."""
    template = folder / "template.sqlite"
    await (await open_store(template)).close()

    def copy() -> None:
        for device_id in device_ids:
            shutil.copyfile(template, _file(folder, device_id))

    await asyncio.to_thread(copy)


@asynccontextmanager
async def _running_agents(
    env: dict[str, str], account_secrets: Mapping[str, str], processes: int, folder: Path
) -> AsyncIterator[_Agents]:
    """An agent per device in ``processes`` processes, yielded once all are connected (or
    have failed: each process says how many and why); stopped with SIGTERM after."""
    devices = list(account_secrets)
    await _device_files(folder, devices)
    children: list[asyncio.subprocess.Process] = []
    started = time.perf_counter()
    try:
        for n in range(processes):
            spec = folder / f"agents-{n}.json"
            part = [
                [d, _agent_url(env["SYNC_AMQP_URL"], d, account_secrets[d]), str(_file(folder, d))]
                for d in devices[n::processes]
            ]
            await asyncio.to_thread(spec.write_text, json.dumps(part))
            children.append(
                await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "bench.connected", "--serve-agents", str(spec)),
                    cwd=ROOT,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        reports = []
        for child in children:
            assert child.stdout is not None
            line = await child.stdout.readline()
            if not line:
                raise RuntimeError(f"agent process {child.pid} exited {await child.wait()}")
            reports.append(json.loads(line))
        connect_s = time.perf_counter() - started
        errors: Counter[str] = Counter()
        for report in reports:
            errors.update(report["errors"])
        agents = _Agents(
            started=sum(report["started"] for report in reports),
            failed=sum(report["failed"] for report in reports),
            errors=dict(errors),
            connect_s=connect_s,
            rss=sum(_rss(child.pid) for child in children),
            processes=processes,
        )
        progress(f"{agents.started:,} agents connected in {connect_s:.1f} s; failed: {errors}")
        yield agents
    finally:
        for child in children:
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            await child.wait()


def _broker_cpu_s() -> float | None:
    """CPU seconds the local node has used, or ``None`` when it is not the services'."""
    try:
        pid = BROKER_PID.read_text().strip()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _idle_cores() -> float:
    before = _broker_cpu_s()
    await asyncio.sleep(IDLE)
    after = _broker_cpu_s()
    return float("nan") if before is None or after is None else (after - before) / IDLE


def _rabbitmqctl(*args: str, extra_env: Mapping[str, str] | None = None) -> str:
    return subprocess.run(
        ["bash", str(SERVICES), "rabbitmqctl", "-q", *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **(extra_env or {})},
    ).stdout.strip()


def _broker_buffers() -> str:
    sndbuf = _rabbitmqctl("eval", SNDBUF).removesuffix("ok").strip()
    return "kernel socket buffers" if sndbuf == "kernel" else f"socket buffers {sndbuf} B"


async def _restart_broker(extra_env: Mapping[str, str]) -> None:
    """RabbitMQ stopped and started again by ``scripts/services.sh`` with ``extra_env``
    (it rewrites the config on every start); PostgreSQL is left running."""
    progress(f"restarting the broker with {dict(extra_env) or 'the environment as it is'}")
    environment = {**os.environ, **extra_env}

    def restart() -> None:
        _rabbitmqctl("shutdown", extra_env=extra_env)
        subprocess.run(
            ["bash", str(SERVICES), "start"], check=True, capture_output=True, env=environment
        )

    await asyncio.to_thread(restart)


@dataclass(frozen=True)
class _Measured:
    buffers: str
    before: Memory
    registered: Memory
    connected: Memory
    registration: _Registration
    agents: _Agents
    idle_cores: float


async def _measure(env: dict[str, str], devices: int, processes: int) -> _Measured:
    device_ids = [f"{PREFIX}{n:05d}" for n in range(1, devices + 1)]
    url = prometheus_url(env)
    buffers = await asyncio.to_thread(_broker_buffers)
    progress(f"connected fleet: {devices:,} devices, broker with {buffers}")
    folder = Path(tempfile.mkdtemp(prefix="bench-connected-"))
    management = _Management(env)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            before = await broker_memory(client, url, settle=0)
            async with _registered(env, management, device_ids) as registration:
                registered = await broker_memory(client, url)
                async with _running_agents(env, registration.secrets, processes, folder) as agents:
                    connected = await broker_memory(client, url)
                    idle_cores = await _idle_cores()
    finally:
        await management.close()
        shutil.rmtree(folder, ignore_errors=True)
    return _Measured(buffers, before, registered, connected, registration, agents, idle_cores)


def _figures(m: _Measured) -> list[Figure]:
    devices = len(m.registration.secrets)
    agents = max(m.agents.started, 1)
    per_agent = (m.connected.vm - m.registered.vm) / 1024 / agents
    per_registered = (m.registered.vm - m.before.vm) / 1024 / devices
    label = f"{m.buffers}, {m.agents.started:,} agents"
    extra = {
        "devices": float(devices),
        "agents_started": float(m.agents.started),
        "agents_failed": float(m.agents.failed),
        "agent_processes": float(m.agents.processes),
        "connections": m.connected.connections,
        "channels": m.connected.channels,
        "consumers": m.connected.consumers,
        "broker_open_fds": m.connected.open_fds,
        "broker_open_fds_before_agents": m.registered.open_fds,
        "binary_kb_per_agent": (m.connected.binary - m.registered.binary) / 1024 / agents,
        "rss_kb_per_agent": (m.connected.rss - m.registered.rss) / 1024 / agents,
        "vm_before_mb": m.before.vm / MB,
        "vm_registered_mb": m.registered.vm / MB,
        "vm_connected_mb": m.connected.vm / MB,
        "kb_per_registered_device": per_registered,
        "agent_processes_rss_kb_per_agent": m.agents.rss / 1024 / agents,
        "broker_idle_cores": m.idle_cores,
        "connect_s": m.agents.connect_s,
    }
    errors = "; ".join(f"{count} x {error}" for error, count in m.agents.errors.items())
    memory = (
        "erlang:memory(total) after the connections went idle and a GC of every broker "
        f"process, connected minus registered, per agent; {m.agents.failed} failed"
        + (f" ({errors})" if errors else "")
    )
    return [
        Figure(
            f"connected fleet: broker memory per connected agent ({label})",
            "KB",
            (per_agent,),
            kind="info",
            higher_is_better=False,
            note=f"real DeviceAgent each (connection, channel, passive declare, consumer); "
            f"{memory}",
            extra=extra,
        ),
        Figure(
            f"connected fleet: broker memory per registered device ({m.buffers})",
            "KB",
            (per_registered,),
            kind="info",
            higher_is_better=False,
            note="queue + binding + AMQP account with permissions and limits, no connection",
            extra=extra,
        ),
        Figure(
            f"connected fleet: register {devices:,} devices (rows, queues, accounts)",
            "s",
            (m.registration.queues_s + m.registration.import_s,),
            kind="info",
            higher_is_better=False,
            note=f"rows + queues {m.registration.queues_s:.1f} s, accounts in one definitions "
            f"import {m.registration.import_s:.1f} s; one by one through the management API "
            f"{m.registration.per_account_ms:.0f} ms per account",
            extra={
                "queues_s": m.registration.queues_s,
                "import_s": m.registration.import_s,
                "per_account_ms_one_by_one": m.registration.per_account_ms,
            },
        ),
        Figure(
            f"connected fleet: connect {m.agents.started:,} agents ({m.buffers})",
            "s",
            (m.agents.connect_s,),
            kind="info",
            higher_is_better=False,
            note=f"{m.agents.processes} agent processes, {STARTING} agents starting at once "
            "in each",
            extra={"agents_per_s": m.agents.started / m.agents.connect_s},
        ),
    ]


async def connected(
    env: dict[str, str],
    *,
    devices: int = 10_000,
    processes: int = PROCESSES,
    kernel_buffers_devices: int = 1_000,
) -> list[Figure]:
    """The connected fleet's figures (kind "info"): with the kernel's socket buffers first
    when ``kernel_buffers_devices`` > 0, then with the broker as configured."""
    figures: list[Figure] = []
    if kernel_buffers_devices > 0:
        await _restart_broker({"SYNC_RABBIT_TCP_BUFFER": ""})
        try:
            figures += _figures(await _measure(env, kernel_buffers_devices, processes))
        finally:
            await _restart_broker({})
    figures += _figures(await _measure(env, devices, processes))
    return figures


# --- the agent processes --------------------------------------------------------


async def _serve_agents(spec: Path) -> None:
    """Start the agents of ``spec`` ([device id, URL, SQLite path] each), print one JSON
    line (started, failed, errors by kind), run them until SIGTERM."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    gate = asyncio.Semaphore(STARTING)
    runs: list[asyncio.Task[None]] = []
    errors: Counter[str] = Counter()

    async def start(device_id: str, url: str, path: str) -> None:
        async with gate:
            try:
                agent = await DeviceAgent.start(
                    AgentSettings(amqp_url=url, device_id=device_id, db_path=Path(path))
                )
            except (ProgramError, OSError) as error:
                # The device id varies; the kind of failure is what counts.
                errors[f"{type(error).__name__}: {str(error).replace(device_id, '<id>')}"] += 1
                return
        runs.append(asyncio.create_task(agent.run(stop)))

    devices = json.loads(await asyncio.to_thread(spec.read_text))
    await asyncio.gather(*(start(*device) for device in devices))
    report = {"started": len(runs), "failed": sum(errors.values()), "errors": errors}
    print(json.dumps(report), flush=True)
    await stop.wait()
    await asyncio.gather(*runs, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=PROCESSES)
    parser.add_argument(
        "--kernel-buffers-devices",
        type=int,
        default=1_000,
        help="devices measured first on the broker restarted with the kernel's socket "
        "buffers (0: skip)",
    )
    parser.add_argument("--serve-agents", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_agents is not None:
        asyncio.run(_serve_agents(args.serve_agents))
        return
    env = service_env()
    figures = asyncio.run(
        connected(
            env,
            devices=args.devices,
            processes=args.processes,
            kernel_buffers_devices=args.kernel_buffers_devices,
        )
    )
    print(as_table(figures))
    print(as_details(figures))


if __name__ == "__main__":
    main()
