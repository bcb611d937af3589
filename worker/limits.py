"""Per-device admission in one worker: a rate (a token bucket) and a bound on the jobs a
device may have in hand, so a device flooding jobs delays only itself.

The limits are a worker's own: with N workers a device may reach N times the rate. They
need no shared state and no round trip, and a flood is spread over the workers anyway.

Example::

    limits = DeviceLimits(rate=50, burst=100, in_hand=8)
    if not limits.admit("dev-1", in_hand=scheduler.waiting("dev-1")):
        raise JobRejected("rate-limited")
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["DeviceLimits"]

# Past this many devices remembered, those whose bucket has filled up again are forgotten.
_SWEEP_AT = 10_000


class DeviceLimits:
    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        in_hand: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._in_hand = in_hand
        self._clock = clock
        # device -> (tokens, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def admit(self, device: str, *, in_hand: int) -> bool:
        """Take one job of ``device``, which has ``in_hand`` jobs here already; ``False``
        when it is over its rate or its bound (the job is then refused, not held)."""
        now = self._clock()
        tokens, then = self._buckets.get(device, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        if in_hand >= self._in_hand or tokens < 1:
            self._buckets[device] = (tokens, now)
            return False
        self._buckets[device] = (tokens - 1, now)
        if len(self._buckets) > _SWEEP_AT:
            self._sweep(now)
        return True

    def _sweep(self, now: float) -> None:
        full = [
            device
            for device, (tokens, then) in self._buckets.items()
            if tokens + (now - then) * self._rate >= self._burst
        ]
        for device in full:
            del self._buckets[device]
