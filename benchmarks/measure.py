"""Measuring memory, and turning repeated figures into a table.

Memory is the proportional set size (PSS) summed over this process and all
its descendants, as psutil reads it from ``/proc/<pid>/smaps_rollup``: a
page shared by k processes counts 1/k in each, so an array mapped by the
parent and every worker counts once, and a copy per worker counts once per
copy.  A thread samples it every few milliseconds while a workload runs; the
figure reported is the peak minus the value just before the workload.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass, field

import psutil

SAMPLE_EVERY = 0.01  # seconds


def tree_pss() -> int:
    """Bytes of PSS of this process and its descendants."""
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            pass  # ended between listing and reading
    return total


class PeakMemory:
    """``with PeakMemory() as m: ...``; then ``m.extra`` is the peak rise in bytes."""

    def __init__(self) -> None:
        self.extra = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-memory", daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._base = self._peak = tree_pss()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self._peak = max(self._peak, tree_pss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, tree_pss())
        self.extra = self._peak - self._base


@dataclass
class Figure:
    """Repeated measurements of one workload for one contender."""

    unit: str  # "ms", "s", "tasks/s", "x", "MB"
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def text(self) -> str:
        low, high = min(self.values), max(self.values)
        return f"{_num(self.median)} {self.unit} ({_num(low)}–{_num(high)})"


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(columns: list[str], figures: dict[str, dict[str, Figure]], reference: str) -> str:
    """A markdown table: one row per contender, one column per workload.

    Each cell is the median (min–max) and, below mpnb's row, the ratio of the
    median to ``reference``'s median in the same column.
    """
    lines = ["| contender | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in figures.items():
        cells = []
        for column in columns:
            figure = row.get(column)
            if figure is None or not figure.values:
                cells.append("–")
                continue
            cell = figure.text()
            ref = figures.get(reference, {}).get(column)
            if name != reference and ref is not None and ref.values and ref.median:
                cell += f" **×{figure.median / ref.median:.2f}**"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
