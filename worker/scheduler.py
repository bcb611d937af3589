"""Per-device scheduling inside a worker: one run per device at a time, runs bounded by a
number of slots, and a device that is busy elsewhere parked without holding a slot.

Jobs of one device queue up in the order they came. A run takes all that wait for the
device (up to a bound), so several jobs are served with one read ("coalescing"). When
another worker holds the device, the run says so and the device is *parked*: its jobs
wait here, holding neither a slot nor a database connection, and the device is tried
again after a backoff. Other devices go on meanwhile: no device waits behind another.

Example::

    scheduler = DeviceScheduler(run, slots=16, max_group=64)
    scheduler.submit("dev-1", item)        # run("dev-1", [item, ...]) soon
    await scheduler.drain(timeout=30)      # on shutdown
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Busy", "DeviceScheduler"]

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_BACKOFF = 0.01
MAX_BACKOFF = 0.5


class Busy(Exception):
    """Raised by a run: another worker holds the device; try it again later."""


Run = Callable[[str, list[T]], Awaitable[None]]


class DeviceScheduler(Generic[T]):
    """Runs ``run(device, items)`` for the items submitted per device.

    ``run`` settles every item it is given, or raises ``Busy`` to hand them all back
    (they are tried again, first in line, with whatever came meanwhile). ``weight`` bounds
    a group: items are added while the group's weight stays within ``max_weight`` (the
    first is always taken).
    """

    def __init__(
        self,
        run: Run[T],
        *,
        slots: int,
        max_group: int,
        weight: Callable[[T], int] = lambda item: 1,
        max_weight: int | None = None,
    ) -> None:
        self._run = run
        self._slots = asyncio.Semaphore(slots)
        self._max_group = max_group
        self._weight = weight
        self._max_weight = max_weight
        self._waiting: dict[str, deque[T]] = {}
        self._drivers: dict[str, asyncio.Task[None]] = {}

    def waiting(self, device: str) -> int:
        """How many items of ``device`` are in hand (waiting or running)."""
        return len(self._waiting.get(device, ()))

    def submit(self, device: str, item: T) -> None:
        self._waiting.setdefault(device, deque()).append(item)
        if device not in self._drivers:
            self._drivers[device] = asyncio.create_task(self._drive(device))

    def _group(self, waiting: deque[T]) -> list[T]:
        group = [waiting[0]]
        total = self._weight(waiting[0])
        for item in list(waiting)[1 : self._max_group]:
            total += self._weight(item)
            if self._max_weight is not None and total > self._max_weight:
                break
            group.append(item)
        return group

    async def _drive(self, device: str) -> None:
        """Serve ``device`` until nothing of it waits; the one task that runs it here."""
        waiting = self._waiting[device]
        backoff = FIRST_BACKOFF
        try:
            while waiting:
                group, busy = await self._serve(device, waiting)
                if busy:
                    # Parked: the items stay first in line; no slot is held while waiting.
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                backoff = FIRST_BACKOFF
                for _ in group:
                    waiting.popleft()
        finally:
            del self._drivers[device]
            if not waiting:
                del self._waiting[device]

    async def _serve(self, device: str, waiting: deque[T]) -> tuple[list[T], bool]:
        """One run in a slot: the group it served, and whether the device was busy."""
        async with self._slots:
            group = self._group(waiting)
            try:
                await self._run(device, group)
            except Busy:
                return group, True
            except Exception:
                # A run settles its items itself: this is a bug, so say so loudly.
                log.exception("device run failed", extra={"device_id": device})
            return group, False

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for every device run in hand, then cancel what is left
        (its items stay unacked: the broker hands them over again)."""
        drivers = set(self._drivers.values())
        if not drivers:
            return
        _, late = await asyncio.wait(drivers, timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
