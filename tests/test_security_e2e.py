"""SPEC §8 against the real broker and database: each device reads only its own data,
jobs cannot be forged, and what arrives from outside never reaches SQL as code."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed, ConnectionNotAllowed

from broker import ObjectRef, Session, SyncClient, SyncJob
from broker.accounts import DEVICE_LIMITS, device_account
from broker.connection import connect
from broker.errors import AccessRefused
from broker.topology import CHANGES_EXCHANGE, JOBS_EXCHANGE, device_queue_name
from syncctl.devices import register_device
from tests.conftest import (
    Device,
    MakeDevice,
    dead_letters,
    insert,
    sync_settled,
    wait_for,
)
from worker.schema import create_worker_role

pytestmark = pytest.mark.usefixtures("worker")

Attack = Callable[[AbstractChannel], Awaitable[object]]


@asynccontextmanager
async def _channel_as(device: Device) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(device.amqp_url)
    try:
        yield await connection.channel(publisher_confirms=True)
    finally:
        await connection.close()


async def _refused(device: Device, attack: Attack) -> type[Exception]:
    """Run ``attack`` on a fresh channel of ``device``; the error the broker closed it with."""
    async with _channel_as(device) as channel:
        with pytest.raises((ChannelAccessRefused, ChannelPreconditionFailed)) as raised:
            await attack(channel)
    return raised.type


async def _get(channel: AbstractChannel, queue_name: str) -> object:
    queue = await channel.get_queue(queue_name, ensure=False)
    return await queue.get(fail=False)


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    await message.nack(requeue=True)


async def _consume(channel: AbstractChannel, queue_name: str) -> object:
    queue = await channel.get_queue(queue_name, ensure=False)
    return await queue.consume(_ignore)


async def _publish(
    channel: AbstractChannel, exchange: str, routing_key: str, **properties: object
) -> object:
    target = await channel.get_exchange(exchange, ensure=False)
    return await target.publish(aio_pika.Message(b"{}", **properties), routing_key)  # type: ignore[arg-type]


async def test_a_device_cannot_read_or_redirect_another_devices_queue(make_device: MakeDevice):
    mine = await make_device(7, ["Admin"], run_agent=False)
    theirs = await make_device(8, ["Admin"], run_agent=False)
    other_queue = device_queue_name(theirs.device_id)

    assert await _refused(mine, lambda ch: _get(ch, other_queue)) is ChannelAccessRefused
    assert await _refused(mine, lambda ch: _consume(ch, other_queue)) is ChannelAccessRefused

    async def bind_my_queue_to_their_batches(channel: AbstractChannel) -> object:
        queue = await channel.get_queue(device_queue_name(mine.device_id), ensure=False)
        return await queue.bind(CHANGES_EXCHANGE.name, routing_key=theirs.device_id)

    assert await _refused(mine, bind_my_queue_to_their_batches) is ChannelAccessRefused

    async def declare_a_queue(channel: AbstractChannel) -> object:
        return await channel.declare_queue("stolen", auto_delete=True)

    assert await _refused(mine, declare_a_queue) is ChannelAccessRefused
    # Its own queue it may consume.
    async with _channel_as(mine) as channel:
        assert await _consume(channel, device_queue_name(mine.device_id))


async def test_a_device_cannot_publish_change_batches(make_device: MakeDevice):
    mine = await make_device(7, ["Admin"], run_agent=False)
    theirs = await make_device(8, ["Admin"], run_agent=False)
    attack = lambda ch: _publish(ch, CHANGES_EXCHANGE.name, theirs.device_id)  # noqa: E731
    assert await _refused(mine, attack) is ChannelAccessRefused


@pytest.mark.parametrize("forged", ["other-device", "sync"])
async def test_a_forged_user_id_is_refused_by_the_broker(make_device: MakeDevice, forged: str):
    mine = await make_device(7, ["Admin"], run_agent=False)
    theirs = await make_device(8, ["Admin"], run_agent=False)
    user_id = device_account(theirs.device_id) if forged == "other-device" else forged
    attack = lambda ch: _publish(ch, JOBS_EXCHANGE.name, "", user_id=user_id)  # noqa: E731
    assert await _refused(mine, attack) is ChannelPreconditionFailed


async def test_a_job_body_naming_another_user_and_device_is_ignored(make_device: MakeDevice, pg):
    # User 7 may read titles only; user 8 everything, including the secret.
    mine = await make_device(7, ["Worker"])
    theirs = await make_device(8, ["Admin"])
    task = await insert(pg, "t_task", title="t", status="Open", secret="s3cret")
    async with await SyncClient.connect(mine.amqp_url, name="device-client") as device_client:
        result = await device_client.synchronize_to_device(
            Session(user_id=8, device_id=theirs.device_id), objects=[ObjectRef("Task", task)]
        )
    assert result.status == "done"
    await mine.settled(result)
    # The job ran for the publishing device and its own user: user 8's rights did not apply.
    assert await mine.store.get_committed("Task", task) == {"title": "t", "status": "Open"}
    assert await theirs.store.ids("Task") == []


async def test_the_app_server_account_may_sync_any_owned_session(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(7, ["Admin"])
    task = await insert(pg, "t_task", title="t")
    await sync_settled(client, device, [ObjectRef("Task", task)])
    assert await device.store.ids("Task") == [task]


@pytest.mark.parametrize(
    ("objects", "reason"),
    [
        ([{"entity": "Task; DROP TABLE t_task; --", "id": 1}], "invalid-job: objects.0.entity"),
        ([{"entity": "Task", "id": "1 OR 1=1"}], "invalid-job: objects.0.id"),
        ([{"entity": "Task", "id": 2**63}], "invalid-job: objects.0.id"),
    ],
)
async def test_sql_through_ids_and_entity_names_is_refused_as_invalid(
    client: SyncClient, make_device: MakeDevice, pg, amqp, objects, reason: str
):
    device = await make_device(7, ["Admin"])
    await insert(pg, "t_task", title="still here")
    body = {
        "schema_version": 1,
        "job_id": "injection",
        "session": device.session.model_dump(),
        "origin": "nanoflow",
        "objects": objects,
    }
    result = await client.publish_raw(json.dumps(body).encode(), job_id="injection", timeout=10)
    assert result.status == "rejected" and (result.reason or "").startswith(reason)
    assert (await dead_letters(amqp))["injection"].startswith(reason)
    assert await pg.fetchval("SELECT count(*) FROM t_task") == 1


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO t_task (title) VALUES ('planted')",
        "UPDATE t_task SET title = 'changed'",
        "DELETE FROM t_task",
        "TRUNCATE t_task",
        "UPDATE sync.device SET user_id = 1",
        "INSERT INTO sync.user_role VALUES (7, 'Admin')",
        "CREATE TABLE public.planted (id int)",
    ],
)
async def test_the_worker_role_cannot_write_application_data(services, pg, statement: str):
    await insert(pg, "t_task", title="t")
    worker_conn = await asyncpg.connect(services.worker_database_url)
    try:
        assert await worker_conn.fetchval("SELECT count(*) FROM t_task") == 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await worker_conn.execute(statement)
    finally:
        await worker_conn.close()
    assert await pg.fetchval("SELECT title FROM t_task") == "t"


async def test_a_reply_to_naming_a_queue_gets_no_message(make_device: MakeDevice, pg, amqp):
    # The worker publishes results with the operator's rights; a device must not be able
    # to point them at another device's queue.
    mine = await make_device(7, ["Admin"])
    theirs = await make_device(8, ["Admin"], run_agent=False)
    task = await insert(pg, "t_task", title="t")
    job = SyncJob(
        job_id="aimed-at-b",
        session=mine.session,
        origin="nanoflow",
        objects=(ObjectRef("Task", task),),
    )
    async with _channel_as(mine) as channel:
        jobs = await channel.get_exchange(JOBS_EXCHANGE.name, ensure=False)
        await jobs.publish(
            aio_pika.Message(
                job.model_dump_json().encode(),
                user_id=device_account(mine.device_id),
                reply_to=device_queue_name(theirs.device_id),
                correlation_id=job.job_id,
            ),
            routing_key="",
        )
    # The job itself runs: the device gets its object; the result goes nowhere. The result
    # would follow the batch within milliseconds, so a second is plenty to see it.
    await wait_for(lambda: _holds(mine, task))
    await asyncio.sleep(1)
    queue = await amqp.get_queue(device_queue_name(theirs.device_id))
    assert await queue.get(no_ack=True, fail=False) is None


async def test_re_adding_a_device_cuts_off_the_old_secret(
    make_device: MakeDevice, pg, amqp, accounts
):
    device = await make_device(7, ["Admin"], run_agent=False)
    old = await aio_pika.connect(device.amqp_url)
    try:
        await register_device(pg, amqp, accounts, device.device_id, 7)
        # The broker closed the connection made with the old secret.
        await wait_for(lambda: _refuses_channels(old), timeout=10)
    finally:
        await old.close()
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(device.amqp_url)


async def _holds(device: Device, task: int) -> bool:
    return await device.store.get_committed("Task", task) is not None


async def _refuses_channels(connection: aio_pika.abc.AbstractConnection) -> bool:
    try:
        channel = await connection.channel()
    except RuntimeError:  # aio-pika: the connection is gone
        return True
    await channel.close()
    return False


@pytest.mark.parametrize("role", ["sync", "postgres"])
async def test_a_privileged_role_is_never_made_the_worker_role(pg, model, role: str):
    with pytest.raises(ValueError, match="must be a role of its own"):
        await create_worker_role(pg, model, role, "secret")
    assert await pg.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = $1", role)


@asynccontextmanager
async def _held(connections: Sequence[aio_pika.abc.AbstractConnection]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for connection in connections:
            await connection.close()


async def test_a_device_account_cannot_open_connections_past_its_limit(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(7, ["Admin"])  # its agent holds one connection
    limit = DEVICE_LIMITS["max-connections"]
    more = [await aio_pika.connect(device.amqp_url) for _ in range(limit - 1)]
    async with _held(more):
        with pytest.raises(AccessRefused, match="connection limit"):
            await connect(device.amqp_url, "one-too-many")
        # Refusing the extra connection leaves the agent's alone: it still applies batches.
        task = await insert(pg, "t_task", title="t", status="Open")
        await sync_settled(client, device, [ObjectRef("Task", task)])
    assert await device.store.get_committed("Task", task) is not None


async def test_a_device_account_cannot_open_channels_past_its_limit(
    client: SyncClient, make_device: MakeDevice, pg
):
    device = await make_device(7, ["Admin"])  # its agent holds one channel
    connection = await aio_pika.connect(device.amqp_url)
    async with _held([connection]):
        for _ in range(DEVICE_LIMITS["max-channels"] - 1):
            await connection.channel()
        with pytest.raises(ConnectionNotAllowed, match="channels"):
            await connection.channel()
        task = await insert(pg, "t_task", title="t", status="Open")
        await sync_settled(client, device, [ObjectRef("Task", task)])
    assert await device.store.get_committed("Task", task) is not None
