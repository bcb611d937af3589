"""The job consumer: decode, handle, dead-letter bad jobs, reply, and ack at the right time.

Ack policy: a job is acked only after the broker confirmed all its batches (or after a
rejected job reached the dead-letter queue). Transient failures are retried in place with
backoff while the delivery is still ours; anything unexpected is returned to the queue,
where the quorum queue's delivery limit dead-letters a job that keeps failing.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from pydantic import ValidationError

from broker.accounts import device_of_account
from broker.client import DIRECT_REPLY_TO
from broker.delivery import ack, delivery_count, nack, retry_while_held
from broker.errors import PUBLISH_FAILED, BrokerUnavailable, Refused
from broker.models import SyncJob, SyncResult
from broker.publishing import json_message, publish_confirmed
from broker.topology import JOB_DELIVERY_LIMIT
from worker.errors import TRANSIENT_ERRORS, JobRejected
from worker.handler import JobHandler

__all__ = ["JobConsumer", "describe_invalid_job"]

log = logging.getLogger(__name__)

REASON_HEADER = "x-sync-reason"
# The AMQP user that published the job; the broker validated it on the way in.
USER_HEADER = "x-sync-user-id"


def describe_invalid_job(body: bytes, error: ValidationError) -> str:
    """A precise, stack-trace-free reason for a job body that is not a valid ``SyncJob``."""
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return f"malformed-json: {first['msg']}"
    where = ".".join(str(part) for part in first["loc"])
    if where == "schema_version":
        return f"unsupported-schema-version: {_peek_schema_version(body)!r}"
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid-job: {where}: {message}" if where else f"invalid-job: {message}"


def _device(message: AbstractIncomingMessage, job: SyncJob | None) -> str:
    """The device to name in logs: a device account's own, never one its body claims."""
    own = device_of_account(message.user_id)
    if own is not None:
        return own
    return job.session.device_id if job else "unknown"


def _peek_schema_version(body: bytes) -> object:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get("schema_version") if isinstance(data, dict) else None


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
        job_id = message.message_id or message.correlation_id or "unknown"
        try:
            job = SyncJob.model_validate_json(message.body)
        except ValidationError as error:
            await self._reject(message, job_id, describe_invalid_job(message.body, error))
            return
        try:
            result = await retry_while_held(
                message,
                partial(self._handler.handle, job, message.user_id),
                transient=TRANSIENT_ERRORS,
                what=f"job {job.job_id}",
            )
        except JobRejected as rejected:
            await self._reject(message, job.job_id, rejected.reason, job)
            return
        except Exception as error:
            await self._failed(message, job, error)
            return
        if result is None:
            return
        await self._reply(message, result)
        await ack(message)
        log.info(
            "job done job_id=%s publisher=%s device_id=%s status=%s synced=%d removed=%d "
            "skipped=%d batches=%d ms=%.1f",
            job.job_id,
            message.user_id,
            _device(message, job),
            result.status,
            result.synced,
            result.removed,
            result.skipped,
            len(result.batch_ids),
            (time.perf_counter() - started) * 1000,
        )

    async def _failed(
        self, message: AbstractIncomingMessage, job: SyncJob, error: Exception
    ) -> None:
        """A bug or a broken database, not bad input: try again, but not forever."""
        attempt = delivery_count(message) + 1
        log.error(
            "job failed job_id=%s device_id=%s attempt=%d/%d",
            job.job_id,
            _device(message, job),
            attempt,
            JOB_DELIVERY_LIMIT,
            exc_info=error,
        )
        if attempt < JOB_DELIVERY_LIMIT:
            await nack(message, requeue=True)
            return
        # The last attempt dead-letters the job itself, so the caller learns why (the
        # broker's own delivery limit is the backstop if this worker dies first).
        reason = f"job-failed: {type(error).__name__} on {attempt} attempts"
        await self._reject(message, job.job_id, reason, job)

    async def _reject(
        self,
        message: AbstractIncomingMessage,
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
            log.warning("job %s: dead-letter publish failed; returned to the queue", job_id)
            await nack(message, requeue=True)
            return
        await self._reply(message, SyncResult(job_id=job_id, status="rejected", reason=reason))
        await ack(message)
        log.info(
            "job rejected job_id=%s device_id=%s reason=%s", job_id, _device(message, job), reason
        )

    async def _reply(self, message: AbstractIncomingMessage, result: SyncResult) -> None:
        if not message.reply_to:
            return
        if not message.reply_to.startswith(DIRECT_REPLY_TO):
            # The worker publishes with the operator's rights: a reply_to naming a queue
            # would let a device drop messages into any queue (another device's, say).
            log.warning(
                "result for job %s not sent: reply_to %r is not direct reply-to",
                result.job_id,
                message.reply_to,
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
            log.warning("result for job %s not sent: %r", result.job_id, error)
