"""The chaos soak's pure parts (bench/chaos.py): the seeded schedule, and the checks made
on what the agents report."""

from __future__ import annotations

import itertools

from bench.chaos import KINDS, Reports, schedule


def _line(
    device: int, kind: str, batch: str, job: str, position: int, total: int, versions: str = "-"
) -> bytes:
    return f"b {device} {kind} {batch} {job} {position} {total} 1.0 {versions}\n".encode()


def test_the_same_seed_gives_the_same_schedule_of_whole_rounds() -> None:
    first = list(itertools.islice(schedule(7), 3 * len(KINDS)))
    assert first == list(itertools.islice(schedule(7), 3 * len(KINDS)))
    assert first != list(itertools.islice(schedule(8), 3 * len(KINDS)))
    for start in range(0, len(first), len(KINDS)):
        assert sorted(fault.kind for fault in first[start : start + len(KINDS)]) == sorted(KINDS)
    assert [fault.number for fault in first] == list(range(1, len(first) + 1))


def test_a_batch_not_right_after_its_predecessor_is_out_of_place() -> None:
    reports = Reports()
    reports.feed(1, _line(0, "A", "a1", "job-a", 1, 2))
    reports.feed(1, _line(0, "A", "b1", "job-b", 1, 1))
    reports.feed(1, _line(0, "A", "a2", "job-a", 2, 2))
    assert len(reports.out_of_place) == 1 and "a2" in reports.out_of_place[0]


def test_a_job_run_again_continues_after_its_skipped_batches() -> None:
    # A worker killed after the first batch: the job's second run sends it again
    # (skipped on the device), then the rest; another job came between the two runs.
    reports = Reports()
    for line in (
        _line(0, "A", "a1", "job-a", 1, 2),
        _line(0, "A", "b1", "job-b", 1, 1),
        _line(0, "S", "a1", "job-a", 1, 2),
        _line(0, "A", "a2", "job-a", 2, 2),
    ):
        reports.feed(1, line)
    assert reports.out_of_place == [] and reports.twice == 0


def test_the_first_batch_of_an_agent_life_is_not_checked() -> None:
    reports = Reports()
    reports.feed(1, _line(0, "A", "b1", "job-b", 1, 1))
    reports.feed(2, _line(0, "A", "a2", "job-a", 2, 2))
    assert reports.out_of_place == [] and reports.unchecked == 1


def test_an_older_version_after_a_newer_one_is_counted() -> None:
    reports = Reports()
    reports.feed(1, _line(0, "A", "x", "job-x", 1, 1, "5:3,6:1"))
    reports.feed(1, _line(0, "A", "y", "follow.9", 1, 1, "5:2"))
    reports.feed(1, _line(1, "A", "z", "job-z", 1, 1, "5:1"))  # another device
    assert len(reports.older) == 1 and "#5 at version 2 after 3" in reports.older[0]
    assert reports.pushes == 1


def test_a_batch_applied_twice_is_counted_across_agent_lives() -> None:
    reports = Reports()
    reports.feed(1, _line(0, "A", "x", "job-x", 1, 1))
    reports.feed(2, _line(0, "S", "x", "job-x", 1, 1))
    assert reports.twice == 0
    reports.feed(3, _line(0, "A", "x", "job-x", 1, 1))
    assert reports.twice == 1


def test_a_schedule_without_a_kind_never_injects_it():
    kinds = [kind for kind in KINDS if kind != "node"]
    faults = list(itertools.islice(schedule(7, kinds), 5 * len(kinds)))
    assert {fault.kind for fault in faults} == set(kinds)
