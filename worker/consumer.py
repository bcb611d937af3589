"""The job consumer: decode, handle, dead-letter bad jobs, reply, and ack at the right time.

Ack policy: a job is acked only after the broker confirmed all its batches (or after a
rejected job reached the dead-letter queue). Transient failures are retried in place with
backoff while the delivery is still ours; anything unexpected is returned to the queue,
where the quorum queue's delivery limit dead-letters a job that keeps failing.
"""

from __future__ import annotations

import logging
import re
import time
from functools import partial

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from broker.accounts import device_of_account
from broker.client import DIRECT_REPLY_TO
from broker.delivery import ack, delivery_count, nack, retry_while_held
from broker.errors import PUBLISH_FAILED, BrokerUnavailable, Refused
from broker.models import JOB_ID_PATTERN, SyncJob, SyncResult
from broker.publishing import json_message, publish_confirmed
from broker.topology import JOB_DELIVERY_LIMIT
from broker.wire import WireError, decode
from worker.errors import TRANSIENT_ERRORS, JobRejected
from worker.handler import JobHandler
from worker.metrics import record_failed_job, record_job

__all__ = ["JobConsumer", "job_id_of"]

log = logging.getLogger(__name__)

REASON_HEADER = "x-sync-reason"
# The AMQP user that published the job; the broker validated it on the way in.
USER_HEADER = "x-sync-user-id"


def job_id_of(message: AbstractIncomingMessage) -> str:
    """The job id to answer and log a message under, before its body is trusted: the
    message id when it is a valid job id, else ``invalid-job-id`` (so it cannot forge
    log lines or results)."""
    candidate = message.message_id or message.correlation_id or ""
    return candidate if re.fullmatch(JOB_ID_PATTERN, candidate) else "invalid-job-id"


def _device(message: AbstractIncomingMessage, job: SyncJob | None) -> str:
    """The device to name in logs: a device account's own, never one its body claims."""
    own = device_of_account(message.user_id)
    if own is not None:
        return own
    return job.session.device_id if job else "unknown"


class JobConsumer:
    def __init__(
        self,
        handler: JobHandler,
        dead_jobs: AbstractExchange,
        results: AbstractExchange,
        *,
        publish_timeout: float,
    ) -> None:
        self._handler = handler
        self._dead_jobs = dead_jobs
        self._results = results
        self._publish_timeout = publish_timeout

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        try:
            job = decode(SyncJob, message.body)
        except WireError as error:
            await self._reject(message, started, job_id_of(message), error.reason)
            return
        try:
            result = await retry_while_held(
                message,
                partial(self._handler.handle, job, message.user_id),
                transient=TRANSIENT_ERRORS,
                what=f"job {job.job_id}",
            )
        except JobRejected as rejected:
            await self._reject(message, started, job.job_id, rejected.reason, job)
            return
        except Exception as error:
            await self._failed(message, started, job, error)
            return
        if result is None:
            return
        await self._reply(message, result)
        await ack(message)
        record_job(result, time.perf_counter() - started)
        log.info(
            "job done",
            extra={
                "job_id": job.job_id,
                "publisher": message.user_id,
                "device_id": _device(message, job),
                "status": result.status,
                "synced": result.synced,
                "removed": result.removed,
                "skipped": result.skipped,
                "batches": len(result.batch_ids),
                "ms": (time.perf_counter() - started) * 1000,
            },
        )

    async def _failed(
        self, message: AbstractIncomingMessage, started: float, job: SyncJob, error: Exception
    ) -> None:
        """A bug or a broken database, not bad input: try again, but not forever."""
        attempt = delivery_count(message) + 1
        log.error(
            "job failed",
            exc_info=error,
            extra={
                "job_id": job.job_id,
                "device_id": _device(message, job),
                "attempt": attempt,
                "attempts": JOB_DELIVERY_LIMIT,
            },
        )
        if attempt < JOB_DELIVERY_LIMIT:
            record_failed_job(time.perf_counter() - started)
            await nack(message, requeue=True)
            return
        # The last attempt dead-letters the job itself, so the caller learns why (the
        # broker's own delivery limit is the backstop if this worker dies first).
        reason = f"job-failed: {type(error).__name__} on {attempt} attempts"
        await self._reject(message, started, job.job_id, reason, job)

    async def _reject(
        self,
        message: AbstractIncomingMessage,
        started: float,
        job_id: str,
        reason: str,
        job: SyncJob | None = None,
    ) -> None:
        """Dead-letter the job with its reason, answer ``rejected``, then ack it."""
        dead = json_message(
            message.body,
            message_id=job_id,
            headers={REASON_HEADER: reason, USER_HEADER: message.user_id or ""},
        )
        try:
            await publish_confirmed(
                self._dead_jobs, [dead], routing_key="", timeout=self._publish_timeout, window=1
            )
        except (BrokerUnavailable, Refused):
            log.warning(
                "dead-letter publish failed; job returned to the queue", extra={"job_id": job_id}
            )
            await nack(message, requeue=True)
            return
        result = SyncResult(job_id=job_id, status="rejected", reason=reason)
        await self._reply(message, result)
        await ack(message)
        record_job(result, time.perf_counter() - started)
        log.info(
            "job rejected",
            extra={"job_id": job_id, "device_id": _device(message, job), "reason": reason},
        )

    async def _reply(self, message: AbstractIncomingMessage, result: SyncResult) -> None:
        if not message.reply_to:
            return
        if not message.reply_to.startswith(DIRECT_REPLY_TO):
            # The worker publishes with the operator's rights: a reply_to naming a queue
            # would let a device drop messages into any queue (another device's, say).
            log.warning(
                "result not sent: reply_to is not direct reply-to",
                extra={"job_id": result.job_id, "reply_to": message.reply_to},
            )
            return
        reply = json_message(
            result.model_dump_json().encode(), correlation_id=message.correlation_id
        )
        try:
            # Not mandatory: a caller that stopped waiting is no reason to fail the job.
            await self._results.publish(
                reply, message.reply_to, mandatory=False, timeout=self._publish_timeout
            )
        except PUBLISH_FAILED as error:
            log.warning("result not sent", extra={"job_id": result.job_id, "error": repr(error)})
