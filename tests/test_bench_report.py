"""The benchmark report's pure parts: ratios to a baseline, and the py-spy summary."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import Figure, as_json, as_table, profile_summary

LOOP = "run (asyncio/runners.py:190);BaseEventLoop._run_once (asyncio/base_events.py:1922)"


def test_a_figure_reads_against_its_baseline_not_the_ceiling() -> None:
    figures = [
        Figure("ceiling: publish", "jobs/s", (1000.0,), kind="ceiling"),
        Figure("broker: classic", "jobs/s", (800.0,), kind="info", baseline="broker: classic"),
        Figure("broker: path", "jobs/s", (200.0,), kind="info", baseline="broker: classic"),
        Figure("small jobs", "jobs/s", (250.0,)),
    ]
    table = {line.split("  ")[0]: line for line in as_table(figures).splitlines()}
    assert table["broker: path"].endswith("0.25b")
    assert table["small jobs"].endswith("0.25")
    ratios = {f["name"]: f for f in json.loads(as_json(figures))["figures"]}
    assert ratios["broker: path"]["ratio_to_baseline"] == 0.25
    assert ratios["broker: path"]["ratio_to_slowest_ceiling"] is None
    assert ratios["small jobs"]["ratio_to_slowest_ceiling"] == 0.25
    assert ratios["small jobs"]["ratio_to_baseline"] is None


def test_profile_summary_ranks_busy_samples_and_adds_up_runs(tmp_path: Path) -> None:
    busy = (
        f"{LOOP};decode (/work/wt/broker/wire.py:40);loads (/usr/lib/python3.11/json/__init__.py:3)"
    )
    (tmp_path / "small-1-worker.txt").write_text(
        f"{busy} 30\n"
        f"{LOOP};decode (/work/wt/broker/wire.py:41) 10\n"
        # A thread waiting for work is not busy.
        "_connection_worker_thread (aiosqlite/core.py:59) 500\n"
    )
    (tmp_path / "small-2-worker.txt").write_text(f"{LOOP};flush (worker/publisher.py:9) 60\n")
    summary = profile_summary(tmp_path, top=2)
    assert "small, worker process: 100 busy samples" in summary
    self_rank, total_rank = summary.split("top 2 by total")
    assert self_rank.index(
        "60.0% self  60.0% total  flush (worker/publisher.py)"
    ) < self_rank.index("30.0% self  30.0% total  loads (json/__init__.py)")
    # decode's two lines are one function; the event loop's frames are left out.
    assert "10.0% self  40.0% total  decode (broker/wire.py)" in total_rank
    assert "asyncio" not in total_rank
    assert "aiosqlite" not in summary
