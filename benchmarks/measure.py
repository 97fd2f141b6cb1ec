"""Measuring memory, and turning repeated figures into a table.

Memory is the proportional set size (PSS) summed over this process and all
its descendants, read from ``/proc/<pid>/smaps_rollup``: a page shared by k
processes counts 1/k in each, so an array mapped by the parent and every
worker counts once, and a copy per worker counts once per copy.  Shared
memory (files in ``/dev/shm``, shared anonymous mappings) is counted once,
mapped or not: the machine's ``Shmem`` of ``/proc/meminfo`` in place of the
processes' ``Pss_Shmem`` (a pool that writes an array into a file and maps
it nowhere holds that memory all the same).  A thread samples it every few
milliseconds while a workload runs; the figure reported is the peak minus
the value just before the workload.  Where there is no ``Pss_Shmem`` (not
Linux), psutil's PSS alone.
"""

from __future__ import annotations

import os
import statistics
import threading
from dataclasses import dataclass, field

import psutil

SAMPLE_EVERY = 0.01  # seconds


def _rollup(pid: int) -> dict[str, int] | None:
    """A process's ``smaps_rollup`` in bytes by field, or None where there is none."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    fields = {}
    for line in lines:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return fields


def _machine_shmem() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Shmem in /proc/meminfo")


def tree_pss() -> int:
    """Bytes of memory of this process and its descendants (see the module's text)."""
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    if "Pss_Shmem" not in (_rollup(me.pid) or {}):
        total = 0
        for proc in procs:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:
                pass  # ended between listing and reading
        return total
    total = _machine_shmem()
    for proc in procs:
        fields = _rollup(proc.pid)
        if fields is not None:  # else it ended between listing and reading
            total += fields["Pss"] - fields["Pss_Shmem"]
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


def stolen_seconds() -> float:
    """CPU time the host gave to others so far, summed over this machine's
    CPUs (``steal`` in ``/proc/stat``: under a hypervisor, time a CPU of this
    machine wanted to run and could not); 0 where the count does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


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
        if low == high:  # an ideal, computed, or a single value
            return f"{_num(self.median)} {self.unit}"
        return f"{_num(self.median)} {self.unit} ({_num(low)}–{_num(high)})"


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if 0 < value < 0.1:  # the floors: a few microseconds in ms, a few ms in s
        return f"{value:.2g}"
    return f"{value:.2f}"


@dataclass(frozen=True)
class Layout:
    """How to read the figures of a table.

    ``columns``: column key -> heading; ``better``: column key -> +1 where a
    larger figure is better (throughput, speed-up), -1 where a smaller one is
    (time, memory); ``peers``: the rows compared against (the best of them per
    column is "the best peer"); ``floors``: column key -> the row holding that
    column's floor; ``reference``: the row the others are compared with where
    no peer has a figure (``--only mpnb``).
    """

    columns: dict[str, str]
    better: dict[str, int]
    peers: frozenset[str]
    floors: dict[str, str] = field(default_factory=dict)
    reference: str = ""


def _best(rows: dict[str, dict[str, Figure]], names, column: str, sign: int) -> str | None:
    """The name of the row with the best median in ``column`` among ``names``."""
    found = [(sign * rows[n][column].median, n) for n in names
             if column in rows.get(n, {}) and rows[n][column].values]
    return max(found)[1] if found else None


def table(figures: dict[str, dict[str, Figure]], layout: Layout) -> str:
    """A markdown table: one row per contender (then the floor rows), one column per workload.

    Each cell is the median (min–max), in bold where it is the best of its
    column (floor rows aside); then ``×p`` its ratio to the best peer's median
    (to the reference's where no peer has one) and ``×f`` its ratio to the
    column's floor.
    """
    keys = list(layout.columns)
    lines = ["| contender | " + " | ".join(layout.columns.values()) + " |", "|---|" + "---|" * len(keys)]
    floor_rows = set(layout.floors.values())
    contenders = [name for name in figures if name not in floor_rows]
    for name in contenders + [n for n in figures if n in floor_rows]:
        cells = []
        for key in keys:
            figure = figures[name].get(key)
            if figure is None or not figure.values:
                cells.append("–")
                continue
            cells.append(_cell(figures, layout, contenders, name, key))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(figures, layout: Layout, contenders: list[str], name: str, key: str) -> str:
    figure, sign = figures[name][key], layout.better.get(key, -1)
    text = figure.text()
    if name not in contenders:
        return text  # a floor row: the others are compared with it
    if name in contenders and name == _best(figures, contenders, key, sign):
        text = f"**{text}**"
    peer = _best(figures, [n for n in contenders if n in layout.peers], key, sign)
    ratios = []
    if peer is None and layout.reference in contenders and name != layout.reference:
        peer = layout.reference if figures[layout.reference].get(key, Figure("")).values else None
    if peer is not None and (peer != name or peer in layout.peers) and figures[peer][key].median:
        mark = "p" if peer in layout.peers else "r"
        ratios.append(f"×{mark} {figure.median / figures[peer][key].median:.2f}")
    floor = layout.floors.get(key)
    if floor and floor != name and key in figures.get(floor, {}) and figures[floor][key].values \
            and figures[floor][key].median:
        ratios.append(f"×f {figure.median / figures[floor][key].median:.2f}")
    return text + "".join(f" {r}" for r in ratios)
