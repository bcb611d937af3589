"""What every benchmark returns and how the suite prints it: figures as a table and JSON.

A figure is measured once per run; the median is what reads, min and max show the noise.
Pipeline figures are compared with the slowest raw ceiling of the same unit measured in
the same run, so they read as ratios on any machine; a figure that names a ``baseline``
(another figure of the same run) is compared with that one instead.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["Figure", "as_json", "as_table", "profile_summary", "progress", "slowest_ceilings"]

Kind = Literal["pipeline", "ceiling", "info"]
_STARTED = time.monotonic()


@dataclass(frozen=True)
class Figure:
    """One measured quantity, one value per run.

    Example::

        Figure("bulk, publish to applied", "objects/s", (31000.0, 29500.0, 30200.0))
    """

    name: str
    unit: str
    values: tuple[float, ...]
    kind: Kind = "pipeline"
    higher_is_better: bool = True
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    baseline: str = ""  # the name of the figure this one reads against, if not a ceiling

    @property
    def median(self) -> float:
        return statistics.median(self.values)


def progress(message: str) -> None:
    """A progress line on stderr, so the table and JSON on stdout stay clean."""
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def slowest_ceilings(figures: Sequence[Figure]) -> dict[str, Figure]:
    """Per unit, the slowest raw ceiling: the part that bounds the pipeline."""
    slowest: dict[str, Figure] = {}
    for figure in figures:
        if figure.kind != "ceiling" or not figure.higher_is_better:
            continue
        if figure.unit not in slowest or figure.median < slowest[figure.unit].median:
            slowest[figure.unit] = figure
    return slowest


def _ratio_to_baseline(figure: Figure, figures: Sequence[Figure]) -> float | None:
    base = next((other for other in figures if other.name == figure.baseline), None)
    return figure.median / base.median if base is not None and base.median else None


def as_table(figures: Sequence[Figure]) -> str:
    slowest = slowest_ceilings(figures)
    header = f"{'figure':<60} {'median':>12} {'min':>12} {'max':>12}  {'unit':<10} {'/ceiling':>8}"
    lines = [header, "-" * len(header)]
    for figure in figures:
        ceiling = slowest.get(figure.unit)
        ratio = ""
        to_baseline = _ratio_to_baseline(figure, figures) if figure.baseline else None
        if to_baseline is not None:
            ratio = f"{to_baseline:7.2f}b"
        elif figure.kind == "pipeline" and ceiling is not None and figure.higher_is_better:
            ratio = f"{figure.median / ceiling.median:8.2f}"
        lines.append(
            f"{figure.name:<60} {figure.median:>12,.1f} {min(figure.values):>12,.1f} "
            f"{max(figure.values):>12,.1f}  {figure.unit:<10} {ratio:>8}"
        )
    for unit, ceiling in slowest.items():
        lines.append(f"slowest ceiling in {unit}: {ceiling.name}")
    if any(figure.baseline for figure in figures):
        lines.append("b: ratio to the figure's baseline (its part's first figure), not a ceiling")
    return "\n".join(lines)


def as_details(figures: Sequence[Figure]) -> str:
    """Each figure's extra values and note, a figure per entry (after ``as_table``)."""
    lines = []
    for figure in figures:
        extra = ", ".join(f"{key} {value:,.2f}" for key, value in figure.extra.items())
        lines.append(f"{figure.name}: {extra}\n  {figure.note}")
    return "\n".join(lines)


def as_json(figures: Sequence[Figure]) -> str:
    """The whole run, for comparing runs: machine, figures, medians and ratios."""
    slowest = slowest_ceilings(figures)
    return json.dumps(
        {
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": _cpus(),
            },
            "figures": [
                {
                    **asdict(figure),
                    "median": figure.median,
                    "ratio_to_slowest_ceiling": (
                        figure.median / slowest[figure.unit].median
                        if figure.kind == "pipeline" and figure.unit in slowest
                        else None
                    ),
                    "ratio_to_baseline": (
                        _ratio_to_baseline(figure, figures) if figure.baseline else None
                    ),
                }
                for figure in figures
            ],
        },
        indent=2,
    )


def _cpus() -> int:
    return os.cpu_count() or 0


# "function (path/to/file.py:123)": the line goes, so a function's samples add up.
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
_PREFIXES = re.compile(r"^.*?(?:site-packages/|lib/python3\.\d+/|/work/[^/]+/)")
# Leaves where a thread waits, which py-spy still counts as active (function, file, line;
# no line: any), for the versions installed here: aiosqlite's thread waiting for work, the
# thread pool's idle threads, asyncio's child watcher and the event loop's epoll wait.
_IDLE = {
    ("_connection_worker_thread", "aiosqlite/core.py", "59"),
    ("_worker", "concurrent/futures/thread.py", "81"),
    ("ThreadedChildWatcher._do_waitpid", "asyncio/unix_events.py", None),
    ("EpollSelector.select", "selectors.py", None),
}


# Frames every busy stack passes through (the event loop, a program's entry), left out of
# the ranking by total share, where they would fill the top with ~100% each.
_PLUMBING = re.compile(
    r"^(?:<module> |.* \((?:asyncio/|<frozen |threading\.py|broker/runtime\.py))"
)


def _frame(frame: str) -> tuple[str, str, str | None]:
    match = _FRAME.match(frame)
    if match is None:
        return frame, "", None
    return match["function"], _PREFIXES.sub("", match["file"]), match["line"]


def _idle(leaf: tuple[str, str, str | None]) -> bool:
    return leaf in _IDLE or (*leaf[:2], None) in _IDLE


def profile_summary(folder: Path, top: int = 10) -> str:
    """The ``top`` functions by self and by total share of busy samples, per part and
    process, from the py-spy raw files ``<part>-<run>-<process>.txt`` in ``folder``; runs
    add up, and samples of a thread waiting (``_IDLE``) are left out."""
    own: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    within: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    samples: Counter[tuple[str, str]] = Counter()
    for path in sorted(folder.glob("*-*-*.txt")):
        part, _, role = path.stem.split("-", 2)
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [_frame(frame) for frame in stack.split(";")]
            if _idle(frames[-1]):
                continue
            functions = [f"{function} ({file})" for function, file, _ in frames]
            samples[part, role] += int(count)
            own[part, role][functions[-1]] += int(count)
            for function in set(functions):
                within[part, role][function] += int(count)
    lines = []
    for key in sorted(samples):
        total = samples[key]
        lines.append(f"\n{key[0]}, {key[1]} process: {total:,} busy samples (100/s per thread)")
        ranked = {
            "self": [function for function, _ in own[key].most_common(top)],
            "total (event loop and entry frames left out)": [
                function
                for function, _ in within[key].most_common()
                if not _PLUMBING.match(function)
            ][:top],
        }
        for title, functions in ranked.items():
            lines.append(f"  top {top} by {title}:")
            for function in functions:
                lines.append(
                    f"    {100 * own[key][function] / total:5.1f}% self "
                    f"{100 * within[key][function] / total:5.1f}% total  {function}"
                )
    return "\n".join(lines)
