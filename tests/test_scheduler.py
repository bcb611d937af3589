"""Per-device scheduling and admission in a worker: pure logic, no services."""

from __future__ import annotations

import asyncio

import pytest

from worker.limits import DeviceLimits
from worker.scheduler import Busy, DeviceScheduler


class Runs:
    """Records the groups run; ``busy`` devices raise ``Busy`` until released."""

    def __init__(self) -> None:
        self.groups: list[tuple[str, list[int]]] = []
        self.busy: set[str] = set()
        self.running: dict[str, int] = {}
        self.most_at_once = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, device: str, items: list[int]) -> None:
        if device in self.busy:
            raise Busy(device)
        self.running[device] = self.running.get(device, 0) + 1
        assert self.running[device] == 1, "two runs of one device at once"
        self.most_at_once = max(self.most_at_once, sum(self.running.values()))
        await self.gate.wait()
        self.groups.append((device, list(items)))
        self.running[device] -= 1


async def _settle(scheduler: DeviceScheduler[int]) -> None:
    await scheduler.drain(timeout=5)


async def test_jobs_of_a_device_in_hand_are_served_together_in_order():
    runs = Runs()
    runs.gate.clear()
    scheduler: DeviceScheduler[int] = DeviceScheduler(runs, slots=4, max_group=10)
    scheduler.submit("a", 1)
    await asyncio.sleep(0)  # the first run starts and holds the device
    for item in (2, 3, 4):
        scheduler.submit("a", item)
    runs.gate.set()
    await _settle(scheduler)
    assert runs.groups == [("a", [1]), ("a", [2, 3, 4])]
    assert scheduler.waiting("a") == 0


async def test_groups_are_bounded_by_count_and_weight():
    runs = Runs()
    runs.gate.clear()
    scheduler: DeviceScheduler[int] = DeviceScheduler(
        runs, slots=1, max_group=3, weight=lambda item: item, max_weight=10
    )
    for item in (1, 1, 1, 1, 6, 5):
        scheduler.submit("a", item)
    runs.gate.set()
    await _settle(scheduler)
    assert runs.groups == [("a", [1, 1, 1]), ("a", [1, 6]), ("a", [5])]


async def test_a_busy_device_is_parked_without_a_slot_and_others_go_on():
    runs = Runs()
    runs.busy.add("busy")
    scheduler: DeviceScheduler[int] = DeviceScheduler(runs, slots=1, max_group=10)
    scheduler.submit("busy", 1)
    await asyncio.sleep(0.05)
    # One slot only: if the parked device held it, this would never run.
    scheduler.submit("free", 2)
    await asyncio.sleep(0.05)
    assert runs.groups == [("free", [2])]
    scheduler.submit("busy", 3)
    runs.busy.clear()
    await _settle(scheduler)
    assert runs.groups[1:] == [("busy", [1, 3])]


async def test_runs_of_different_devices_share_the_slots():
    runs = Runs()
    runs.gate.clear()
    scheduler: DeviceScheduler[int] = DeviceScheduler(runs, slots=2, max_group=10)
    for number, device in enumerate("abcde"):
        scheduler.submit(device, number)
    await asyncio.sleep(0.01)
    runs.gate.set()
    await _settle(scheduler)
    assert runs.most_at_once == 2
    assert sorted(device for device, _ in runs.groups) == list("abcde")


async def test_drain_cancels_what_does_not_finish_in_time():
    runs = Runs()
    runs.gate.clear()
    scheduler: DeviceScheduler[int] = DeviceScheduler(runs, slots=1, max_group=10)
    scheduler.submit("a", 1)
    await asyncio.sleep(0)
    await scheduler.drain(timeout=0.05)
    assert runs.groups == []


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("rate", [1.0, 10.0])
def test_rate_allows_the_burst_then_the_rate(rate: float):
    clock = Clock()
    limits = DeviceLimits(rate=rate, burst=5, in_hand=100, clock=clock)
    assert [limits.admit("a", in_hand=0) for _ in range(6)] == [True] * 5 + [False]
    assert limits.admit("b", in_hand=0), "another device has its own bucket"
    clock.now += 1 / rate
    assert limits.admit("a", in_hand=0)
    assert not limits.admit("a", in_hand=0)


def test_jobs_in_hand_are_bounded():
    limits = DeviceLimits(rate=1000, burst=1000, in_hand=3, clock=Clock())
    assert limits.admit("a", in_hand=2)
    assert not limits.admit("a", in_hand=3)


def test_forgotten_buckets_come_back_full():
    clock = Clock()
    limits = DeviceLimits(rate=1, burst=2, in_hand=10, clock=clock)
    for number in range(10_002):
        limits.admit(f"d{number}", in_hand=0)
    clock.now += 10
    assert limits.admit("d0", in_hand=0) and limits.admit("d0", in_hand=0)
    assert not limits.admit("d0", in_hand=0)
