"""``SyncClient``: what a server action calls to synchronize objects to a device."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, overload

from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from broker.closing import AsyncClosable
from broker.connection import amqp_user, connect, open_channel
from broker.errors import BrokerUnavailable
from broker.models import (
    ObjectList,
    ObjectRef,
    Origin,
    Query,
    Session,
    SyncJob,
    SyncProgress,
    SyncResult,
    UncommittedChange,
)
from broker.publishing import json_message, publish_confirmed
from broker.topology import JOBS_EXCHANGE
from broker.wire import WireError, decode

__all__ = [
    "DIRECT_REPLY_TO",
    "PROGRESS_HEADER",
    "PROGRESS_TYPE",
    "RESULT_TYPE",
    "OnProgress",
    "SyncClient",
]

log = logging.getLogger(__name__)

# RabbitMQ's direct reply-to: results come back without a queue per caller.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# A job published with this header set to true gets ``SyncProgress`` messages before its
# result; the replies' ``type`` property tells the two apart.
PROGRESS_HEADER = "x-sync-progress"
PROGRESS_TYPE = "progress"
RESULT_TYPE = "result"

# Called with each progress report of a job, in the event loop: it must not block.
OnProgress = Callable[[SyncProgress], None]


class SyncClient(AsyncClosable):
    """Publishes sync jobs and, when asked, waits for their results.

    Example::

        async with await SyncClient.connect("amqp://sync:sync@127.0.0.1:5673/") as client:
            result = await client.synchronize_to_device(
                Session(user_id=7, device_id="dev-1"), objects=[ObjectRef("WorkOrder", 1)]
            )
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        jobs: AbstractExchange,
        *,
        user_id: str | None,
        publish_timeout: float,
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._jobs = jobs
        self._user_id = user_id
        self._publish_timeout = publish_timeout
        self._pending: dict[str, asyncio.Future[SyncResult]] = {}
        self._on_progress: dict[str, OnProgress] = {}

    @classmethod
    async def connect(
        cls, amqp_url: str, *, name: str = "sync-client", publish_timeout: float = 10.0
    ) -> SyncClient:
        connection = await connect(amqp_url, name)
        channel = await open_channel(connection)
        # Passive: devices may not configure anything; the topology is declared by operators.
        jobs = await channel.get_exchange(JOBS_EXCHANGE.name)
        client = cls(
            connection,
            channel,
            jobs,
            user_id=amqp_user(amqp_url),
            publish_timeout=publish_timeout,
        )
        await client._consume_replies()
        # Direct reply-to lives and dies with the channel: the robust channel does not
        # restore it, so consume again after every reopen, and fail the calls that were
        # waiting on the old channel instead of letting them time out.
        channel.reopen_callbacks.add(client._consume_replies)
        channel.close_callbacks.add(client._fail_pending)
        return client

    async def _consume_replies(self, *_: object) -> None:
        replies = await self._channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await replies.consume(self._on_reply, no_ack=True)

    def _fail_pending(self, *_: object) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(
                    BrokerUnavailable("connection to the broker lost before the result came")
                )

    @staticmethod
    def new_job_id() -> str:
        """A fresh job id (32 hex digits)."""
        return uuid.uuid4().hex

    async def close(self) -> None:
        self._fail_pending()
        await self._connection.close()

    @overload
    async def synchronize_to_device(
        self,
        session: Session,
        *,
        objects: Iterable[ObjectRef] = (),
        lists: Iterable[ObjectList] = (),
        queries: Iterable[Query] = (),
        deleted: Iterable[ObjectRef] = (),
        new: Iterable[ObjectRef] = (),
        uncommitted: Mapping[ObjectRef, Mapping[str, Any]] | None = None,
        origin: Origin = "nanoflow",
        wait: Literal[True] = True,
        timeout: float = 10.0,
        job_id: str | None = None,
        on_progress: OnProgress | None = None,
    ) -> SyncResult: ...

    @overload
    async def synchronize_to_device(
        self,
        session: Session,
        *,
        objects: Iterable[ObjectRef] = (),
        lists: Iterable[ObjectList] = (),
        queries: Iterable[Query] = (),
        deleted: Iterable[ObjectRef] = (),
        new: Iterable[ObjectRef] = (),
        uncommitted: Mapping[ObjectRef, Mapping[str, Any]] | None = None,
        origin: Origin = "nanoflow",
        wait: Literal[False],
        timeout: float = 10.0,
        job_id: str | None = None,
    ) -> str: ...

    async def synchronize_to_device(
        self,
        session: Session,
        *,
        objects: Iterable[ObjectRef] = (),
        lists: Iterable[ObjectList] = (),
        queries: Iterable[Query] = (),
        deleted: Iterable[ObjectRef] = (),
        new: Iterable[ObjectRef] = (),
        uncommitted: Mapping[ObjectRef, Mapping[str, Any]] | None = None,
        origin: Origin = "nanoflow",
        wait: bool = True,
        timeout: float = 10.0,
        job_id: str | None = None,
        on_progress: OnProgress | None = None,
    ) -> SyncResult | str:
        """Ask to synchronize objects and lists to the session's device. ``queries``
        name lists by constraint: the worker lists the matching objects the user may read.

        With ``wait=True`` returns the worker's ``SyncResult`` (raises ``TimeoutError``
        after ``timeout`` seconds); otherwise returns the job id once the broker has
        the job. ``job_id`` names the job (default: a new one from ``new_job_id()``).

        ``on_progress`` (with ``wait=True``) is called with each ``SyncProgress`` of the
        job while it runs: ``published`` of ``total`` batches, rising, the last at the
        total; a job with nothing to send, ignored or rejected sends none. It is a plain
        function called in the event loop (it must not block; schedule a task for async
        work); what it raises is logged. Reports are best effort: one may be missing,
        and only the result settles the call.

        Example::

            result = await client.synchronize_to_device(
                session, lists=[big_list], timeout=60,
                on_progress=lambda p: print(f"{p.published}/{p.total}"),
            )
        """
        job = SyncJob(
            job_id=job_id or self.new_job_id(),
            session=session,
            origin=origin,
            objects=tuple(objects),
            lists=tuple(lists),
            queries=tuple(queries),
            deleted=tuple(deleted),
            new=tuple(new),
            uncommitted=tuple(
                UncommittedChange(ref=ref, changes=dict(changes))
                for ref, changes in (uncommitted or {}).items()
            ),
        )
        body = job.model_dump_json().encode()
        if not wait:
            if on_progress is not None:
                raise ValueError("on_progress needs wait=True: progress goes to the caller")
            await self._publish(body, job_id=job.job_id, reply=False, routing_key=session.device_id)
            return job.job_id
        return await self.publish_raw(
            body,
            job_id=job.job_id,
            timeout=timeout,
            routing_key=session.device_id,
            on_progress=on_progress,
        )

    async def publish_raw(
        self,
        body: bytes,
        *,
        job_id: str,
        timeout: float,
        routing_key: str = "",
        on_progress: OnProgress | None = None,
    ) -> SyncResult:
        """Publish a job body as is and wait for its result (and its progress, with
        ``on_progress``, as ``synchronize_to_device`` does).

        For tools and tests that must send what ``SyncJob`` would refuse to build.
        """
        future: asyncio.Future[SyncResult] = asyncio.get_running_loop().create_future()
        self._pending[job_id] = future
        if on_progress is not None:
            self._on_progress[job_id] = on_progress
        try:
            await self._publish(
                body,
                job_id=job_id,
                reply=True,
                routing_key=routing_key,
                progress=on_progress is not None,
            )
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._pending.pop(job_id, None)
            self._on_progress.pop(job_id, None)

    async def _publish(
        self, body: bytes, *, job_id: str, reply: bool, routing_key: str, progress: bool = False
    ) -> None:
        message = json_message(
            body,
            message_id=job_id,
            correlation_id=job_id,
            reply_to=DIRECT_REPLY_TO if reply else None,
            user_id=self._user_id,
            headers={PROGRESS_HEADER: True} if progress else None,
        )
        try:
            await publish_confirmed(
                # The routing key (the device) lets a hashing exchange keep a device's jobs
                # on one queue; the fanout exchange ignores it.
                self._jobs,
                [message],
                routing_key=routing_key,
                timeout=self._publish_timeout,
                window=1,
            )
        except BrokerUnavailable as error:
            alarm = (
                " The broker is blocking publishers (a memory or disk alarm)."
                if _blocked(self._connection)
                else ""
            )
            raise BrokerUnavailable(
                f"job {job_id} was not confirmed: {error}.{alarm} It may have been sent; "
                f"retrying with the same job_id ({job_id}) is safe: a job id is answered "
                "once and its retries get the same answer."
            ) from error

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        # A worker from before progress reports sets no type: its replies are results.
        if message.type == PROGRESS_TYPE:
            self._progress(message)
            return
        try:
            result = decode(SyncResult, message.body)
        except WireError as error:
            log.warning("result ignored", extra={"reason": error.reason})
            return
        future = self._pending.get(message.correlation_id or result.job_id)
        if future is not None and not future.done():
            future.set_result(result)

    def _progress(self, message: AbstractIncomingMessage) -> None:
        try:
            progress = decode(SyncProgress, message.body)
        except WireError as error:
            log.warning("progress ignored", extra={"reason": error.reason})
            return
        job_id = message.correlation_id or progress.job_id
        future = self._pending.get(job_id)
        report = self._on_progress.get(job_id)
        # A job no longer waited for (or that did not ask) is not reported.
        if report is None or future is None or future.done():
            return
        try:
            report(progress)
        except Exception:
            # The caller's own code: its error must not lose the result it waits for.
            log.exception("on_progress failed", extra={"job_id": job_id})


def _blocked(connection: AbstractRobustConnection) -> bool:
    """Whether the broker told this connection it blocks publishers (connection.blocked).

    aiormq acts on the notification but keeps it in a private event; read defensively.
    """
    transport = connection.transport
    event = (
        getattr(transport.connection, "_Connection__connection_unblocked", None)
        if transport
        else None
    )
    return isinstance(event, asyncio.Event) and not event.is_set()
