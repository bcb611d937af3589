"""Publishes a job's changes to the device as bounded, confirmed change batches."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from aio_pika.abc import AbstractExchange, AbstractRobustChannel
from pydantic import TypeAdapter
from typing_extensions import TypedDict

from broker.errors import PUBLISH_FAILED
from broker.publishing import Confirmed, json_message, publish_confirmed
from broker.topology import device_queue_name

__all__ = ["BatchPublisher", "EncodedBatch", "batch_id", "encode_batch"]


class _Envelope(TypedDict):
    schema_version: int
    batch_id: str
    job_id: str
    device_id: str
    position: int
    total: int


_ENVELOPE = TypeAdapter(_Envelope)


def batch_id(job_id: str, changes_json: bytes) -> str:
    """The id of a batch, derived from its job and content (its changes as JSON).

    A job redelivered after its batches went out (a worker killed before its ack) reads
    again: if nothing changed it makes the same batches, which the device skips as
    applied, so offline edits made in between survive; newer state makes new ids and
    is applied.
    """
    digest = hashlib.sha256(job_id.encode())
    digest.update(changes_json)
    return digest.hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    batch_id: str
    job_id: str
    body: bytes


def encode_batch(
    job_id: str, device_id: str, changes: Sequence[str], *, position: int, total: int
) -> EncodedBatch:
    """A ``ChangeBatch`` as JSON around ``changes``, each change's JSON text as written
    (mostly by PostgreSQL), so no change is parsed or encoded again here; the batch is
    number ``position`` of the ``total`` of its job.

    The envelope is written in ``ChangeBatch``'s field order; a test checks that the result
    reads back as the ``ChangeBatch`` of those changes.
    """
    changes_json = ("[" + ",".join(changes) + "]").encode()
    # Not from the place: a job run again with the same content makes the same ids.
    the_id = batch_id(job_id, changes_json)
    envelope = _ENVELOPE.dump_json(
        {
            "schema_version": 1,
            "batch_id": the_id,
            "job_id": job_id,
            "device_id": device_id,
            "position": position,
            "total": total,
        }
    )
    return EncodedBatch(the_id, job_id, envelope[:-1] + b',"changes":' + changes_json + b"}")


class BatchPublisher:
    def __init__(
        self,
        channel: AbstractRobustChannel,
        changes: AbstractExchange,
        *,
        batch_size: int,
        timeout: float,
        window: int,
    ) -> None:
        # The exchange's channel: where the device queues' depth is asked too.
        self._channel = channel
        self._exchange = changes
        self._batch_size = batch_size
        self._timeout = timeout
        self._window = window

    def encode(self, job_id: str, device_id: str, changes: Sequence[str]) -> list[EncodedBatch]:
        """``changes`` (JSON texts) cut into batches of at most ``batch_size``, each
        numbered among them."""
        starts = range(0, len(changes), self._batch_size)
        return [
            encode_batch(
                job_id,
                device_id,
                changes[start : start + self._batch_size],
                position=position,
                total=len(starts),
            )
            for position, start in enumerate(starts, 1)
        ]

    async def depth(self, device_id: str) -> int | None:
        """How many batches the device's queue holds now, or ``None`` when the broker
        does not say (the queue's node unavailable, say)."""
        try:
            queue = await self._channel.declare_queue(
                device_queue_name(device_id), passive=True, robust=False, timeout=self._timeout
            )
        except PUBLISH_FAILED:
            return None
        count = queue.declaration_result.message_count
        return int(count) if count is not None else None

    async def publish(
        self,
        device_id: str,
        batches: Sequence[EncodedBatch],
        *,
        confirmed: Confirmed | None = None,
    ) -> None:
        """Publish ``batches`` to the device, in order, confirmed in windows; returns once
        the broker confirmed them all, calling ``confirmed(index)`` as each one is. Raises
        ``Unroutable`` (no device queue), ``Refused`` (the queue is full) or
        ``BrokerUnavailable``."""
        messages = [
            json_message(batch.body, message_id=batch.batch_id, correlation_id=batch.job_id)
            for batch in batches
        ]
        await publish_confirmed(
            self._exchange,
            messages,
            routing_key=device_id,
            timeout=self._timeout,
            window=self._window,
            confirmed=confirmed,
        )
