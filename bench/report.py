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
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

__all__ = ["Figure", "as_json", "as_table", "progress", "slowest_ceilings"]

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
