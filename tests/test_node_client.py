"""SPEC §8a: the Node.js client in examples/node against the real broker, worker and database.

The client runs as a subprocess, as an app server or a device app would run it; its npm
dependencies are installed from the committed lockfile once per session.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from typing import Any

import aio_pika
import pytest

from broker import models
from broker.models import SyncJob
from broker.topology import JOBS_QUEUE
from tests.conftest import (
    ROOT,
    Device,
    Finished,
    MakeDevice,
    Services,
    dead_letters,
    insert,
    run_process,
)

NODE_DIR = ROOT / "examples" / "node"
# A job id the client generates or one the caller passes: what the worker accepts.
JOB_ID_PATTERN = getattr(models, "JOB_ID_PATTERN", r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with examples/node's dependencies installed (``npm ci``)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "node and npm (Node.js 20 or later) are needed to test examples/node; install them",
            pytrace=False,
        )
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if installed.returncode != 0:
        pytest.fail(f"npm ci in {NODE_DIR} failed:\n{installed.stderr}", pytrace=False)
    return node


def _result(run: Finished) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(run.stdout)
    return answer


async def _node(node: str, *args: str, timeout: float = 20.0) -> Finished:
    return await run_process(node, *args, cwd=NODE_DIR, timeout=timeout)


async def sync_js(node: str, url: str, *args: str) -> Finished:
    return await _node(node, "sync.js", "--url", url, "--timeout", "10", *args)


async def _settled(device: Device, result: dict[str, Any]) -> None:
    await device.store.wait_for_batches(result["batch_ids"], timeout=10)


@pytest.mark.usefixtures("worker")
async def test_the_app_server_account_syncs_and_gets_the_outcomes(
    node: str, services: Services, make_device: MakeDevice, pg
):
    device = await make_device(7, ["Admin"])
    task = await insert(pg, "t_task", title="t", status="Open", secret="s")
    gone = task + 1000

    run = await sync_js(
        node,
        services.amqp_url,
        "--user",
        "7",
        "--device",
        device.device_id,
        "--job-id",
        "app-server:job-1",
        "--uncommitted",
        f'Task:{task}={{"status": "Done"}}',
        f"Task:{task}",
        f"Task:{gone}",
    )

    assert run.code == 0, run.stderr
    result = _result(run)
    assert result["job_id"] == "app-server:job-1"
    assert (result["status"], result["synced"], result["removed"]) == ("done", 1, 1)
    assert result["objects"] == [
        {"entity": "Task", "id": task, "outcome": "synced", "reason": None},
        {"entity": "Task", "id": gone, "outcome": "removed", "reason": "gone"},
    ]
    await _settled(device, result)
    committed = await device.store.get_committed("Task", task)
    assert committed is not None and committed["status"] == "Open"
    # The call's uncommitted change arrived as such: on top, not in the committed state.
    seen = await device.store.get("Task", task)
    assert seen is not None and seen["status"] == "Done"


@pytest.mark.usefixtures("worker")
async def test_a_device_account_syncs_to_its_own_device(node: str, make_device: MakeDevice, pg):
    # The Worker role reads titles and statuses only: the device's own user's rights apply.
    device = await make_device(7, ["Worker"])
    task = await insert(pg, "t_task", title="t", status="Open", secret="s")

    # No --device: a device account speaks for its own device.
    run = await sync_js(node, device.amqp_url, "--user", "7", f"Task:{task}")

    assert run.code == 0, run.stderr
    result = _result(run)
    assert (result["status"], result["synced"]) == ("done", 1)
    await _settled(device, result)
    assert await device.store.get_committed("Task", task) == {"title": "t", "status": "Open"}


@pytest.mark.parametrize(
    ("entity", "reason"),
    [
        ("Nope", "unknown-entity: Nope"),
        ("Report", "not-in-offline-profile: Report"),
        ("File", "file-entity: File"),
    ],
)
@pytest.mark.usefixtures("worker")
async def test_a_job_naming_a_bad_entity_is_rejected_with_its_reason(
    node: str,
    services: Services,
    make_device: MakeDevice,
    pg,
    amqp: aio_pika.abc.AbstractRobustChannel,
    entity: str,
    reason: str,
):
    device = await make_device(7, ["Admin"])
    task = await insert(pg, "t_task", title="t")

    run = await sync_js(
        node,
        services.amqp_url,
        "--user",
        "7",
        "--device",
        device.device_id,
        "--job-id",
        "bad-entity-1",
        f"Task:{task}",
        f"{entity}:1",
    )

    assert run.code == 1, run.stderr
    assert _result(run)["status"] == "rejected"
    assert _result(run)["reason"] == reason
    # The whole job is rejected: nothing reached the device; the dead letter says why.
    assert await dead_letters(amqp) == {"bad-entity-1": reason}
    assert await device.store.ids("Task") == []


@pytest.mark.usefixtures("worker")
async def test_retrying_with_the_same_job_id_has_the_effect_of_one_submission(
    node: str, services: Services, make_device: MakeDevice, pg
):
    device = await make_device(7, ["Admin"])
    task = await insert(pg, "t_task", title="t")
    args = ("--user", "7", "--device", device.device_id, "--job-id", "retried-1", f"Task:{task}")

    first = await sync_js(node, services.amqp_url, *args)
    again = await sync_js(node, services.amqp_url, *args)

    assert first.code == again.code == 0, (first.stderr, again.stderr)
    # The same job read the same state: the same batches, which the device applies once.
    assert _result(first)["batch_ids"] == _result(again)["batch_ids"]
    await _settled(device, _result(again))
    assert await device.store.ids("Task") == [task]


@pytest.mark.usefixtures("worker")
async def test_progress_reports_come_when_asked_and_the_result_is_unchanged(
    node: str, services: Services, make_device: MakeDevice, pg
):
    device = await make_device(7, ["Admin"])
    ids = [
        row["id"]
        for row in await pg.fetch(
            "INSERT INTO t_task (title) SELECT 't' || g FROM generate_series(1, 120) g RETURNING id"
        )
    ]
    listed = "Task:" + ",".join(map(str, ids))
    args = ("--user", "7", "--device", device.device_id, "--list", listed)

    asked = await sync_js(node, services.amqp_url, *args, "--progress")
    assert asked.code == 0, asked.stderr
    # The test worker's batches hold 50 changes: 3 batches. A report still waiting when
    # a newer one comes is replaced by it, so some may be left out, never the last.
    reported = [line.removeprefix("progress ") for line in asked.stderr.splitlines()]
    assert reported[-1] == "3/3" and sorted(set(reported)) == reported, reported
    assert len(_result(asked)["batch_ids"]) == 3

    plain = await sync_js(node, services.amqp_url, *args)
    assert plain.code == 0 and plain.stderr == ""
    assert _result(plain)["status"] == "done"


async def test_the_client_builds_jobs_the_worker_parses(node: str):
    """The job JSON the client builds is a ``SyncJob``, ids as exact JSON integers."""
    script = """
    const { buildJob, encodeJson } = require('./client');
    process.stdout.write(encodeJson(buildJob({ userId: 7, deviceId: 'dev-1' }, {
      jobId: 'job-1',
      objects: [{ entity: 'WorkOrder', id: 1 }, { entity: 'System.User', id: 2n ** 63n - 1n }],
      lists: [{ entity: 'WorkOrder', ids: [2, 3] }],
      queries: [{ entity: 'WorkOrder', constraint: `[status = "Open"][title != 'it''s']` }],
      deleted: [{ entity: 'WorkOrder', id: 4 }],
      new: [{ entity: 'WorkOrder', id: 5 }],
      uncommitted: [{ ref: { entity: 'WorkOrder', id: 1 }, changes: { status: 'Done', n: 1.5 } }],
    })));
    """
    run = await _node(node, "-e", script)
    assert run.code == 0, run.stderr
    job = SyncJob.model_validate_json(run.stdout)
    assert job.model_dump(mode="json") == json.loads(run.stdout)
    assert job.objects[1].id == 2**63 - 1
    assert job.queries[0].constraint == "[status = \"Open\"][title != 'it''s']"


async def test_the_client_leaves_queries_out_when_there_are_none_and_bounds_them(node: str):
    # Left out: workers from before queries refuse the field, as with the Python client.
    script = """
    const c = require('./client');
    const session = { userId: 7, deviceId: 'dev-1' };
    const bad = (queries) => {
      try { c.buildJob(session, { queries }); } catch (e) { return e.name; }
    };
    const query = (constraint) => ({ entity: 'A', constraint });
    console.log(JSON.stringify({
      job: c.buildJob(session, { jobId: 'job-1', objects: [{ entity: 'A', id: 1 }] }),
      limits: [c.MAX_QUERIES_PER_JOB, c.MAX_CONSTRAINT_LENGTH],
      empty: bad([query('')]),
      long: bad([query('x'.repeat(c.MAX_CONSTRAINT_LENGTH + 1))]),
      many: bad(Array(c.MAX_QUERIES_PER_JOB + 1).fill(query('[a]'))),
      text: bad([query('x'.repeat(c.MAX_CONSTRAINT_LENGTH)), query('[a]')]),
    }));
    """
    run = await _node(node, "-e", script)
    assert run.code == 0, run.stderr
    built = json.loads(run.stdout)
    assert "queries" not in built["job"]
    assert built["job"] == json.loads(SyncJob.model_validate(built["job"]).model_dump_json())
    assert built["limits"] == [models.MAX_QUERIES_PER_JOB, models.MAX_CONSTRAINT_LENGTH]
    assert (built["empty"], built["long"], built["many"], built["text"]) == ("InvalidJob",) * 4


@pytest.mark.usefixtures("worker")
async def test_a_query_syncs_the_matching_objects_the_user_may_read(
    node: str, services: Services, make_device: MakeDevice, pg
):
    device = await make_device(7, ["Worker"])
    open_task = await insert(pg, "t_task", title="t", status="Open", secret="s")
    await insert(pg, "t_task", title="t", status="Done")

    run = await sync_js(
        node,
        services.amqp_url,
        "--user",
        "7",
        "--device",
        device.device_id,
        "--query",
        'Task[status = "Open"]',
    )

    assert run.code == 0, run.stderr
    result = _result(run)
    assert result["objects"] == [
        {"entity": "Task", "id": open_task, "outcome": "synced", "reason": None}
    ]
    await _settled(device, result)
    assert await device.store.get_committed("Task", open_task) == {"title": "t", "status": "Open"}


async def test_the_client_checks_names_with_the_contracts_patterns(node: str):
    run = await _node(node, "-e", "console.log(JSON.stringify(require('./client').PATTERNS))")
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout) == {
        "JOB_ID": JOB_ID_PATTERN,
        "ENTITY_NAME": models.ENTITY_NAME_PATTERN,
        "MEMBER_NAME": models.MEMBER_NAME_PATTERN,
        "DEVICE_ID": models.DEVICE_ID_PATTERN,
    }


async def test_a_broker_that_is_down_is_one_clear_line(node: str):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the probe is closed.
    run = await sync_js(node, f"amqp://sync:sync@127.0.0.1:{port}/", "--user", "7", "Task:1")

    assert run.code == 3
    assert run.stderr == f"sync.js: cannot reach the broker at 127.0.0.1:{port}: ECONNREFUSED\n"
    assert run.stdout == ""


@pytest.mark.usefixtures("clean_queues")
async def test_no_result_in_time_is_one_clear_line_naming_the_job(
    node: str, services: Services, amqp: aio_pika.abc.AbstractRobustChannel
):
    # No worker runs: the job waits in the queue and no result comes.
    run = await _node(
        node,
        "sync.js",
        "--url",
        services.amqp_url,
        "--timeout",
        "0.3",
        "--user",
        "7",
        "--device",
        "dev-1",
        "--job-id",
        "never-answered",
        "Task:1",
    )
    await (await amqp.get_queue(JOBS_QUEUE.name)).purge()

    assert run.code == 3
    assert run.stderr.startswith("sync.js: no result for job never-answered within 300 ms")
    assert run.stderr.count("\n") == 1
