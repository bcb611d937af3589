"""Publishes a job's changes to the device as bounded, confirmed change batches."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from aio_pika.abc import AbstractExchange
from pydantic import TypeAdapter

from broker.errors import Refused, Unroutable
from broker.models import Change, ChangeBatch
from broker.publishing import json_message, publish_confirmed
from worker.errors import JobRejected

__all__ = ["BatchPublisher", "batch_id"]

_CHANGES = TypeAdapter(tuple[Change, ...])


def batch_id(job_id: str, changes: tuple[Change, ...]) -> str:
    """The id of a batch, derived from its job and content.

    A job redelivered after its batches went out (a worker killed before its ack) reads
    again: if nothing changed it makes the same batches, which the device skips as
    applied, so offline edits made in between survive; newer state makes new ids and
    is applied.
    """
    digest = hashlib.sha256(job_id.encode())
    digest.update(_CHANGES.dump_json(changes))
    return digest.hexdigest()[:32]


def _batch(job_id: str, device_id: str, changes: tuple[Change, ...]) -> ChangeBatch:
    return ChangeBatch(
        batch_id=batch_id(job_id, changes), job_id=job_id, device_id=device_id, changes=changes
    )


class BatchPublisher:
    def __init__(
        self, changes: AbstractExchange, *, batch_size: int, timeout: float, window: int
    ) -> None:
        self._exchange = changes
        self._batch_size = batch_size
        self._timeout = timeout
        self._window = window

    async def publish(self, job_id: str, device_id: str, changes: Sequence[Change]) -> list[str]:
        """Publish ``changes`` in batches; returns the batch ids once all are confirmed."""
        batches = [
            _batch(job_id, device_id, tuple(changes[start : start + self._batch_size]))
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
        except Refused:
            # The queue dead-lettered the refused batch, so the device gets marked for
            # a resync; this job's caller learns now.
            raise JobRejected("device-queue-full") from None
        return [batch.batch_id for batch in batches]
