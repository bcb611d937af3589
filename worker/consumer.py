"""The job consumer: admit each job, hand it to its device's turn, answer and settle it.

A delivery is checked on arrival (the body, the publisher, the names, the device's rate)
and a job that can never succeed is rejected at once; a device account's job past its
device's rate is refused first, before its body is read. Good jobs wait for their device in
the ``DeviceScheduler``; a run serves all of a device's jobs in hand together. Each job
still gets its own result, then is settled by ``broker.settle``: acked only after the
broker confirmed its batches, dead-lettered with its reason when rejected, handed back
when something failed (the jobs queue counts the attempts).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from broker.accounts import device_of_account
from broker.client import DIRECT_REPLY_TO, PROGRESS_HEADER, RESULT_TYPE
from broker.errors import PUBLISH_FAILED
from broker.models import JOB_ID_PATTERN, MAX_OBJECTS_PER_JOB, SyncJob, SyncResult
from broker.publishing import json_message
from broker.settle import Reject, Settlement, settle
from broker.topology import JOB_DELIVERY_LIMIT
from broker.wire import WireError, decode
from worker.answers import Answer, answer_of
from worker.eligibility import check_job_names
from worker.errors import TRANSIENT_ERRORS, JobRejected
from worker.handler import Claimed, JobHandler, claim, ignored
from worker.limits import DeviceLimits
from worker.metrics import DEVICE_LOCK_WAIT, record_failed_job, record_job
from worker.model import DomainModel
from worker.progress import ProgressReply
from worker.pushes import FOLLOW_HEADER
from worker.queries import compile_queries
from worker.scheduler import Busy, DeviceScheduler

__all__ = ["RATE_LIMITED", "USER_HEADER", "JobConsumer", "job_id_of"]

log = logging.getLogger(__name__)

# The AMQP user that published the job; the broker validated it on the way in.
USER_HEADER = "x-sync-user-id"
# The answer to a job past its device's limits (``worker.limits``).
RATE_LIMITED = "rate-limited"
# A push's cause as the feed writes it (entity names, ids, words): safe to log.
_CAUSE = re.compile(r"[A-Za-z0-9_. -]{1,200}")


def job_id_of(message: AbstractIncomingMessage) -> str:
    """The job id to answer and log a message under, before its body is trusted: the
    message id when it is a valid job id, else ``invalid-job-id`` (so it cannot forge
    log lines or results)."""
    candidate = message.message_id or message.correlation_id or ""
    return candidate if re.fullmatch(JOB_ID_PATTERN, candidate) else "invalid-job-id"


def _publisher_header(message: AbstractIncomingMessage) -> dict[str, str]:
    return {USER_HEADER: message.user_id or ""}


@dataclass(eq=False)
class Pending:
    """A job in hand, waiting for its device's turn: a delivery to settle, or a push the
    follow feed hands this worker directly (``message`` is ``None``; ``push`` tells the
    feed how it went)."""

    message: AbstractIncomingMessage | None
    claimed: Claimed
    received: float = field(default_factory=time.perf_counter)
    # Set after a run of several jobs failed unexpectedly: the job then runs alone, so one
    # poison job cannot take the others of its device down with it.
    alone: bool = False
    push: PushTicket | None = None
    progress: ProgressReply | None = None


@dataclass(eq=False)
class PushTicket:
    """A follow push served in this worker: ``served`` says ``True`` once it was answered
    (its batches confirmed, or a final rejection)."""

    served: asyncio.Future[bool]
    # How many items of its device are in hand here, itself included.
    in_hand: Callable[[], int]
    # Set once its device was found busy in another worker.
    parked: bool = False

    @property
    def held_up(self) -> bool:
        """Waiting for its device rather than for a slot: busy elsewhere, or behind other
        work of the device here."""
        return self.parked or self.in_hand() > 1


class JobConsumer:
    def __init__(
        self,
        handler: JobHandler,
        model: DomainModel,
        dead_jobs: AbstractExchange,
        results: AbstractExchange,
        *,
        reports: AbstractExchange,
        trusted_publishers: Collection[str],
        limits: DeviceLimits,
        slots: int,
        max_group: int,
        publish_timeout: float,
    ) -> None:
        self._handler = handler
        self._model = model
        self._results = results
        # Progress reports are best effort: on a channel without confirms, as a confirm
        # would wait behind those of the batches the job is publishing.
        self._reports = reports
        self._trusted = frozenset(trusted_publishers)
        self._limits = limits
        self._publish_timeout = publish_timeout
        self._settlement = Settlement(
            what="job",
            attempts=JOB_DELIVERY_LIMIT,
            dead_letters=dead_jobs,
            timeout=publish_timeout,
            headers=_publisher_header,
            id_of=job_id_of,
        )
        self.scheduler: DeviceScheduler[Pending] = DeviceScheduler(
            self._run,
            slots=slots,
            max_group=max_group,
            weight=self._weight,
            max_weight=MAX_OBJECTS_PER_JOB,
        )

    @staticmethod
    def _weight(pending: Pending) -> int:
        if pending.alone:
            return MAX_OBJECTS_PER_JOB + 1
        # A job with queries may come to the most objects a job can have: it runs alone.
        if pending.claimed.queries:
            return MAX_OBJECTS_PER_JOB
        return max(1, len(pending.claimed.targets))

    def _admit(self, device_id: str) -> bool:
        return self._limits.admit(device_id, in_hand=self.scheduler.waiting(device_id))

    def serve_push(self, device_id: str, claimed: Claimed) -> PushTicket:
        """Serve a follow push here, in its device's turn like any job."""
        ticket = PushTicket(
            asyncio.get_running_loop().create_future(),
            lambda: self.scheduler.waiting(device_id),
        )
        self.scheduler.submit(device_id, Pending(None, claimed, push=ticket))
        return ticket

    def _push_cause(self, message: AbstractIncomingMessage) -> str | None:
        """What caused a follow push (``worker.follow``), or ``None`` for an app's job.
        Only a trusted account's message can be a push."""
        cause = (message.headers or {}).get(FOLLOW_HEADER)
        if cause is None or message.user_id not in self._trusted:
            return None
        return cause if isinstance(cause, str) and _CAUSE.fullmatch(cause) else "unknown"

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Admit one delivery: reject it now, answer it now, or queue it for its device."""
        started = time.perf_counter()
        push = self._push_cause(message)
        own_device = device_of_account(message.user_id)
        if own_device is not None and not self._admit(own_device):
            # The broker checked the user_id and a device account speaks for its own
            # device only, so its limit is known before the body is read: a flood is
            # refused without the strict decode and the name checks. Its bad jobs use
            # up its rate too.
            await self._answer(message, started, None, error=Reject(RATE_LIMITED))
            return
        try:
            job = decode(SyncJob, message.body)
        except WireError as error:
            await self._answer(message, started, None, error=Reject(error.reason))
            return
        try:
            device_id, claimed_user = claim(job, message.user_id, self._trusted)
            if job.origin != "nanoflow":
                result = ignored(job, "not-called-from-nanoflow")
                await self._answer(message, started, job, result=result)
                return
            targets = job.targets()
            check_job_names(job, self._model, targets)
            queries = compile_queries(job, self._model)
            # A trusted account's job names its device in the body, read only now. A
            # push is the server's own: it is bounded by the feed, not by the device.
            if own_device is None and push is None and not self._admit(device_id):
                raise JobRejected(RATE_LIMITED)
        except JobRejected as rejected:
            await self._answer(message, started, job, error=Reject(rejected.reason))
            return
        progress = None
        if push is not None:
            # The device's owner comes from PostgreSQL when the push runs.
            claimed_user = None
        elif (message.headers or {}).get(PROGRESS_HEADER) is True and _direct(message):
            progress = ProgressReply(
                self._reports,
                job_id=job.job_id,
                reply_to=message.reply_to or "",
                correlation_id=message.correlation_id,
            )
        claimed = Claimed(
            job,
            device_id,
            claimed_user,
            targets,
            push,
            queries,
            progress=progress.report if progress is not None else None,
        )
        self.scheduler.submit(device_id, Pending(message, claimed, started, progress=progress))

    async def _run(self, device_id: str, group: list[Pending]) -> None:
        """Serve a device's jobs in hand; raises ``Busy`` to be tried again later."""
        # A delivery whose channel is gone is the broker's again: it hands it over anew.
        live = [
            pending
            for pending in group
            if pending.message is None or not pending.message.channel.is_closed
        ]
        if not live:
            return
        try:
            outcomes = await self._handler.handle(device_id, [p.claimed for p in live])
        except Busy:
            _parked(live)
            raise
        except TRANSIENT_ERRORS as error:
            log.warning(
                "transient error; the device is tried again",
                extra={"device_id": device_id, "jobs": len(live), "error": repr(error)},
            )
            raise Busy(device_id) from error
        except Exception as error:
            if len(live) > 1:
                # Which job is poison is not known: each runs alone from now on.
                for pending in live:
                    pending.alone = True
                raise Busy(device_id) from error
            await self._finish(live[0], error=error)
            return
        for pending, outcome in zip(live, outcomes, strict=True):
            DEVICE_LOCK_WAIT.observe(time.perf_counter() - pending.received)
            if isinstance(outcome, JobRejected):
                await self._finish(pending, error=Reject(outcome.reason))
            else:
                await self._finish(pending, result=outcome)

    async def _finish(
        self,
        pending: Pending,
        *,
        error: BaseException | None = None,
        result: Answer | None = None,
    ) -> None:
        """Answer and settle a delivery; for a push served here, tell the feed."""
        if pending.message is not None:
            await self._answer(
                pending.message,
                pending.received,
                pending.claimed.job,
                error=error,
                result=result,
                progress=pending.progress,
            )
            return
        assert pending.push is not None
        seconds = time.perf_counter() - pending.received
        if result is not None:
            record_job(result, seconds)
        elif not isinstance(error, Reject):
            # The feed hands the push to the jobs queue instead, which retries it.
            record_failed_job(seconds)
            log.error(
                "follow push failed",
                extra={"device_id": pending.claimed.device_id, "error": repr(error)},
            )
        if not pending.push.served.done():
            pending.push.served.set_result(result is not None or isinstance(error, Reject))

    async def _answer(
        self,
        message: AbstractIncomingMessage,
        started: float,
        job: SyncJob | None,
        *,
        error: BaseException | None = None,
        result: Answer | None = None,
        progress: ProgressReply | None = None,
    ) -> None:
        """Answer the caller (``result``, or the rejection), after the job's last progress
        report if it asked for them, then settle ``message``. A job handed back to be tried
        again gets no answer yet."""
        job_id = job.job_id if job is not None else job_id_of(message)

        async def answer(reason: str | None) -> None:
            final = result
            if reason is not None:
                final = answer_of(SyncResult(job_id=job_id, status="rejected", reason=reason))
            assert final is not None
            seconds = time.perf_counter() - started
            record_job(final, seconds)
            if progress is not None:
                await progress.finish()
            await self._reply(message, final)
            log.info(
                "job " + ("rejected" if reason else final.status),
                extra={
                    "job_id": job_id,
                    "publisher": message.user_id,
                    "device_id": _device(message, job),
                    "reason": final.reason,
                    "synced": final.synced,
                    "removed": final.removed,
                    "skipped": final.skipped,
                    "batches": final.batches,
                    "ms": seconds * 1000,
                },
            )

        if await settle(message, self._settlement, error, answer=answer) is None and error:
            record_failed_job(time.perf_counter() - started)

    async def _reply(self, message: AbstractIncomingMessage, result: Answer) -> None:
        if not message.reply_to:
            return
        if not _direct(message):
            log.warning(
                "result not sent: reply_to is not direct reply-to",
                extra={"job_id": result.job_id, "reply_to": message.reply_to},
            )
            return
        reply = json_message(result.body, correlation_id=message.correlation_id, type=RESULT_TYPE)
        try:
            # Not mandatory: a caller that stopped waiting is no reason to fail the job.
            await self._results.publish(
                reply, message.reply_to, mandatory=False, timeout=self._publish_timeout
            )
        except PUBLISH_FAILED as error:
            log.warning("result not sent", extra={"job_id": result.job_id, "error": repr(error)})


def _direct(message: AbstractIncomingMessage) -> bool:
    """Whether replies may go to ``message``'s reply_to. The worker publishes with the
    operator's rights: a reply_to naming a queue would let a device drop messages into any
    queue (another device's, say)."""
    return bool(message.reply_to and message.reply_to.startswith(DIRECT_REPLY_TO))


def _parked(group: list[Pending]) -> None:
    """The group's device is busy in another worker: its pushes say so to the feed."""
    for pending in group:
        if pending.push is not None:
            pending.push.parked = True


def _device(message: AbstractIncomingMessage, job: SyncJob | None) -> str:
    """The device to name in logs: a device account's own, never one its body claims."""
    own = device_of_account(message.user_id)
    if own is not None:
        return own
    return job.session.device_id if job else "unknown"
