"""End-to-end figures: objects or jobs from publish until committed on the devices.

    .venv/bin/python -m bench.pipeline [--runs 3] [--workers 1] [--profile DIR]

- **bulk**: 100 list jobs of 1,000 objects over 10 devices, published at once (SPEC §11:
  1,000-object list jobs, small rows); objects/s until the last batch is applied.
- **small jobs**: 2,000 single-object jobs over 10 devices, all in flight; jobs/s.
- **latency**: single-object jobs offered at a fixed rate for 5 s; p50, p95 and p99 from
  the moment each job was due to be published until its batch was committed on its
  device, so a slow publisher counts against the figure too. Taken twice per run (SPEC
  §11): at 500 jobs/s, and at half the small-jobs figure of the same run, so on a slow
  machine the second one measures the system rather than a queue in front of it.

Workers run as processes; agents and the client share this process.

With ``--profile DIR`` py-spy (``.venv/bin/pip install py-spy``) samples the first worker
process and this one during each run's bulk and small-jobs parts, writes the raw stacks
to DIR, and the top functions by self and total share are printed after the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from bench.report import Figure, as_table, profile_summary, progress
from bench.rig import Rig, profiled, rig, seed_work_orders, service_env
from broker import ObjectList

__all__ = ["pipeline"]

DEVICES = 10


async def _bulk_once(the_rig: Rig, jobs: int, per_job: int) -> float:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            the_rig.client.synchronize_to_device(
                the_rig.sessions[n % len(the_rig.sessions)],
                lists=[ObjectList("WorkOrder", [r.id for r in the_rig.refs(n * per_job, per_job)])],
                timeout=300,
            )
            for n in range(jobs)
        )
    )
    await the_rig.landed({r.job_id: len(r.batch_ids) for r in results}, timeout=300)
    assert all(r.status == "done" and r.synced == per_job for r in results)
    return jobs * per_job / (time.perf_counter() - started)


async def _small_once(the_rig: Rig, jobs: int) -> float:
    started = time.perf_counter()
    job_ids = await asyncio.gather(
        *(
            the_rig.client.synchronize_to_device(
                the_rig.sessions[n % len(the_rig.sessions)], objects=the_rig.refs(n, 1), wait=False
            )
            for n in range(jobs)
        )
    )
    await the_rig.landed(dict.fromkeys(job_ids, 1), timeout=300)
    return jobs / (time.perf_counter() - started)


async def _latency_once(the_rig: Rig, rate: float, seconds: float) -> list[float]:
    """Latencies (ms) of jobs offered at ``rate`` per second, from when each was due."""
    count = int(rate * seconds)
    start = time.perf_counter() + 0.05
    due: dict[str, float] = {}
    sends = []
    for n in range(count):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sends.append(asyncio.create_task(_send(the_rig, n, start + n / rate, due)))
    await asyncio.gather(*sends)
    await the_rig.landed(dict.fromkeys(due, 1), timeout=120)
    return sorted((the_rig.last_applied[job_id] - at) * 1000 for job_id, at in due.items())


async def _send(the_rig: Rig, n: int, at: float, due: dict[str, float]) -> None:
    session = the_rig.sessions[n % len(the_rig.sessions)]
    job_id = await the_rig.client.synchronize_to_device(
        session, objects=the_rig.refs(n, 1), wait=False
    )
    due[job_id] = at


def _percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))]


PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def _latency_figures(
    where: str, percentiles: dict[str, list[float]], note: str, extra: dict[str, float]
) -> list[Figure]:
    return [
        Figure(
            f"latency {name} at {where}, due to applied",
            "ms",
            tuple(percentiles[name]),
            higher_is_better=False,
            note=note,
            extra=extra,
        )
        for name, _ in PERCENTILES
    ]


async def pipeline(
    env: dict[str, str],
    *,
    runs: int = 3,
    workers: int = 1,
    rate: float = 500.0,
    seconds: float = 5.0,
    profile: Path | None = None,
) -> list[Figure]:
    """Bulk objects/s, small jobs/s, and the latency percentiles at ``rate`` jobs/s and at
    half the small-jobs figure of each run; with ``profile``, py-spy's raw stacks of the
    bulk and small-jobs parts there."""
    ids = await seed_work_orders(env["SYNC_DATABASE_URL"], 100_000)
    bulk: list[float] = []
    small: list[float] = []
    half_rates: list[float] = []
    fixed: dict[str, list[float]] = {name: [] for name, _ in PERCENTILES}
    half: dict[str, list[float]] = {name: [] for name, _ in PERCENTILES}
    async with rig(env, devices=DEVICES, workers=workers, ids=ids) as the_rig:
        pids = {"bench": os.getpid(), "worker": the_rig.worker_pids[0]}
        for run in range(1, runs + 1):
            progress(f"pipeline run {run}/{runs}: bulk, 100 jobs x 1,000 objects")
            async with profiled(profile, f"bulk-{run}", pids):
                bulk.append(await _bulk_once(the_rig, 100, 1_000))
            progress(f"pipeline run {run}/{runs}: 2,000 single-object jobs in flight")
            async with profiled(profile, f"small-{run}", pids):
                small.append(await _small_once(the_rig, 2_000))
            half_rates.append(small[-1] / 2)
            for offered, into in ((rate, fixed), (half_rates[-1], half)):
                progress(
                    f"pipeline run {run}/{runs}: {offered:.0f} jobs/s offered for {seconds:.0f} s"
                )
                latencies = await _latency_once(the_rig, offered, seconds)
                for name, fraction in PERCENTILES:
                    into[name].append(_percentile(latencies, fraction))
    setup = f"{workers} worker process(es), {DEVICES} devices"
    rates = ", ".join(f"{value:.0f}" for value in half_rates)
    return [
        Figure("bulk: 1,000-object jobs, publish to applied", "objects/s", tuple(bulk), note=setup),
        Figure(
            "small jobs: 2,000 in flight, publish to applied", "jobs/s", tuple(small), note=setup
        ),
        *_latency_figures(f"{rate:.0f} jobs/s", fixed, setup, {"offered_jobs_per_s": rate}),
        *_latency_figures(
            "half capacity",
            half,
            f"{setup}; offered at half of each run's small-jobs figure: {rates} jobs/s",
            {"offered_jobs_per_s": statistics.median(half_rates)},
        ),
    ]


async def main(runs: int, workers: int, profile: Path | None) -> None:
    figures = await pipeline(service_env(), runs=runs, workers=workers, profile=profile)
    print(as_table(figures))
    print(f"(median, min and max of {runs} runs)")
    if profile is not None:
        print(profile_summary(profile))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--profile", type=Path, help="folder for py-spy's raw stacks")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.workers, args.profile))
