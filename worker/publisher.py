"""Publishes a job's changes to the device as bounded, confirmed change batches."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from aio_pika.abc import AbstractExchange

from broker.errors import Unroutable
from broker.models import Change, ChangeBatch
from broker.publishing import json_message, publish_confirmed
from worker.errors import JobRejected

__all__ = ["BatchPublisher"]


class BatchPublisher:
    def __init__(
        self, changes: AbstractExchange, *, batch_size: int, timeout: float, window: int
    ) -> None:
        self._exchange = changes
        self._batch_size = batch_size
        self._timeout = timeout
        self._window = window

    async def publish(self, job_id: str, device_id: str, changes: Sequence[Change]) -> list[str]:
        """Publish ``changes`` in batches; returns the batch ids once all are confirmed.

        Batch ids are fresh on every attempt: a redelivered job reads again and may carry
        newer state, which must not be mistaken for a batch the device already applied.
        """
        batches = [
            ChangeBatch(
                batch_id=uuid.uuid4().hex,
                job_id=job_id,
                device_id=device_id,
                changes=tuple(changes[start : start + self._batch_size]),
            )
            for start in range(0, len(changes), self._batch_size)
        ]
        messages = [
            json_message(
                batch.model_dump_json().encode(),
                message_id=batch.batch_id,
                correlation_id=job_id,
            )
            for batch in batches
        ]
        try:
            await publish_confirmed(
                self._exchange,
                messages,
                routing_key=device_id,
                timeout=self._timeout,
                window=self._window,
            )
        except Unroutable:
            raise JobRejected("no-device-queue") from None
        return [batch.batch_id for batch in batches]
