"""Progress of a job, for a caller that asked for it (``broker.client.PROGRESS_HEADER``).

As the broker confirms a run's batches, each job that asked learns how many of its own
batches are confirmed, at most ``STEPS`` times (every ``1/STEPS`` of its batches, and at
the last one): a 200-batch job sends 20 small messages, not 200. The reports go to the
job's reply-to one at a time, unconfirmed by the caller and not persistent: best effort.
A report still waiting when a newer one comes is replaced by it, so a slow reply path
never builds a backlog, and the job's own batches never wait for a report. The result
waits for the last report to go out (at most ``SEND_TIMEOUT``), so it comes last.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from aio_pika.abc import AbstractExchange

from broker.client import PROGRESS_TYPE
from broker.errors import PUBLISH_FAILED
from broker.models import SyncProgress
from broker.publishing import Confirmed, json_message

__all__ = ["SEND_TIMEOUT", "STEPS", "ProgressReply", "Report", "stream_progress"]

log = logging.getLogger(__name__)

STEPS = 20
# A report not out within this long is given up: it must not hold up the result.
SEND_TIMEOUT = 1.0

# Told (published, total) of one job; must not block.
Report = Callable[[int, int], None]


def stream_progress(jobs: Iterable[tuple[Report | None, int]]) -> Confirmed | None:
    """The ``confirmed(index)`` callback of a stream made of the jobs' batches in order,
    given each job's report (``None``: not asked) and number of batches; ``None`` when no
    job asked."""
    owners: list[int] = []
    reports: list[Report | None] = []
    totals: list[int] = []
    for report, total in jobs:
        owners.extend([len(reports)] * total)
        reports.append(report)
        totals.append(total)
    if not any(reports):
        return None
    counts = [0] * len(totals)
    every = [max(1, -(-total // STEPS)) for total in totals]

    def confirmed(index: int) -> None:
        job = owners[index]
        report = reports[job]
        if report is None:
            return
        counts[job] += 1
        if counts[job] == totals[job] or counts[job] % every[job] == 0:
            report(counts[job], totals[job])

    return confirmed


class ProgressReply:
    """Sends one job's progress to its caller's reply-to. ``report`` never blocks;
    ``finish`` waits, bounded, for the last report to go out.

    Reports only rise: a job run again (its device busy, a broker outage in its publish)
    counts its batches again from the first, and reports none below what was sent.
    """

    def __init__(
        self, results: AbstractExchange, *, job_id: str, reply_to: str, correlation_id: str | None
    ) -> None:
        self._results = results
        self._job_id = job_id
        self._reply_to = reply_to
        self._correlation_id = correlation_id
        self._highest = 0
        self._waiting: tuple[int, int] | None = None
        self._sending: asyncio.Task[None] | None = None

    def report(self, published: int, total: int) -> None:
        if published <= self._highest:
            return
        self._highest = published
        self._waiting = (published, total)
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while self._waiting is not None:
            published, total = self._waiting
            self._waiting = None
            body = SyncProgress(job_id=self._job_id, published=published, total=total)
            message = json_message(
                body.model_dump_json().encode(),
                persistent=False,
                correlation_id=self._correlation_id,
                type=PROGRESS_TYPE,
            )
            try:
                await self._results.publish(
                    message, self._reply_to, mandatory=False, timeout=SEND_TIMEOUT
                )
            except PUBLISH_FAILED as error:
                # Harmless: a later report or the result says more.
                log.info("progress not sent", extra={"job_id": self._job_id, "error": repr(error)})

    async def finish(self) -> None:
        """Wait for the report in flight (and the one behind it), at most
        ``SEND_TIMEOUT``; what is not out by then is dropped."""
        sending = self._sending
        if sending is None or sending.done():
            return
        done, _ = await asyncio.wait([sending], timeout=SEND_TIMEOUT)
        if not done:
            sending.cancel()
