"""The benchmark suite of SPEC §11 in one command.

    .venv/bin/python -m bench [--runs 3] [--json bench-results.json] [--only NAME ...]

Starts the local services, then measures in one run:

- the raw ceilings: AMQP confirmed publish and consume, PostgreSQL batch fetch, SQLite
  upsert;
- the broker part of a small job: confirmed publish to a quorum, a classic and a transient
  queue, and a small job's broker path (job, batch, optional reply) without the database;
- the worker's resolve rate, with and without XPath constraints, on 100,000 rows;
- the device side: store apply rate, an agent process draining a backlog, its memory;
- the pipeline: bulk objects/s, small jobs/s, latency percentiles at 500 jobs/s and at
  half the measured small-jobs figure;
- scale-out: 1, 2 and 4 worker processes on one job stream, with its checks, at 20 and
  at 1,000 devices, and with the workers' database 20 ms away (worker-bound);
- isolation: the other devices' latency while a worker holding a device's job is
  stopped, and while one device floods 20,000 jobs from its own account;
- the fleet: broker memory per idle device queue, with 10,000 device queues;
- the connected fleet: broker memory per connected device agent, with 10,000 real agents
  on the shipped socket buffers and 1,000 on the kernel's (the broker is restarted);
- follow: commit → applied on every holding device at 1,000, 100 and 50 changes/s with
  1,000 holding devices, the changes/s sustained, and the write ceilings with and without
  the capture trigger;
- the chaos soak: 10,000 jobs over 100 devices with follow changes flowing while faults
  are injected on a seeded schedule (on a 3-node cluster of its own; not in the default
  run: ``--only chaos``).

Prints a table (with each pipeline figure's ratio to the slowest ceiling of its unit) and
writes the same figures as JSON, for comparing runs. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from bench.agent import device_side
from bench.ceilings import broker_paths, ceilings
from bench.chaos import ChaosFailed, chaos
from bench.connected import connected
from bench.fleet import fleet
from bench.follow import follow
from bench.isolation import isolation
from bench.pipeline import pipeline
from bench.report import Figure, as_json, as_table, progress
from bench.resolve import resolve
from bench.rig import service_env
from bench.scaleout import scaleout

Suite = Callable[[dict[str, str], int], Awaitable[list[Figure]]]

SUITES: dict[str, Suite] = {
    "ceilings": lambda env, runs: ceilings(env, runs=runs),
    "broker": lambda env, runs: broker_paths(env, runs=runs),
    "resolve": lambda env, runs: resolve(env, runs=runs),
    "device": lambda env, runs: device_side(env, runs=runs),
    "pipeline": lambda env, runs: pipeline(env, runs=runs),
    "scaleout": lambda env, runs: scaleout(env),
    "isolation": lambda env, runs: isolation(env),
    "fleet": lambda env, runs: fleet(env),
    "connected": lambda env, runs: connected(env),
    "follow": lambda env, runs: follow(env),
    # Starts services of its own (a 3-node cluster and PostgreSQL), ignoring ``env``.
    "chaos": lambda env, runs: chaos(),
}
# The parts that need no local services started for them.
OWN_SERVICES = {"chaos"}


async def main(runs: int, only: list[str], json_path: Path) -> None:
    env = service_env() if set(only) - OWN_SERVICES else {}
    figures: list[Figure] = []
    failed: ChaosFailed | None = None
    for name in only:
        progress(f"== {name}")
        try:
            figures += await SUITES[name](env, runs)
        except ChaosFailed as error:
            # Its figures are the finding: kept, and the run fails after the table.
            failed = error
            figures += error.figures
        # Written after each part, so a long run that fails late keeps what it measured.
        await asyncio.to_thread(partial(json_path.write_text, as_json(figures) + "\n"))
    print(as_table(figures))
    print(f"\n(median, min and max of {runs} runs; JSON in {json_path})")
    if failed is not None:
        sys.exit(str(failed))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median reported)")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    parser.add_argument(
        "--only", nargs="+", choices=list(SUITES), default=[s for s in SUITES if s != "chaos"]
    )
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.only, args.json))
