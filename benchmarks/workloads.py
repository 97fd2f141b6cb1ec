"""The workloads, and one round of them on one contender.

Kept apart from :mod:`benchmarks.run` so that a child interpreter running an
earlier mpnb (:mod:`benchmarks.baseline`) times exactly the same calls, with
the same code, as the contenders run in the benchmark's own process.

Workloads, per contender and round (2 workers each):

- **cold start**: create the pool and run one trivial task, to its result;
- **warm call**: a second call (2 trivial tasks) on that pool;
- **chunksize 1**: 2,000 trivial tasks, one per message (tasks/s);
- **auto-chunked**: 20,000 trivial tasks, the library's own chunking (tasks/s);
- **CPU-bound**: 16 tasks of 0.25 s of CPU each; speed-up = 4 s / wall time;
- **large array**: 8 tasks that each read the same 200 MB numpy array (time,
  and extra memory: peak PSS of the process tree minus the value before).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from benchmarks.contenders import Contender
from benchmarks.measure import Figure, PeakMemory
from benchmarks.tasks import array_sum, burn, identity


@dataclass(frozen=True)
class Sizes:
    rounds: int
    tasks: int  # chunksize-1 workload
    auto: int  # auto-chunked workload
    cpu_tasks: int
    cpu_seconds: float
    array_mb: int
    array_tasks: int = 8


FULL = Sizes(rounds=5, tasks=2000, auto=20_000, cpu_tasks=16, cpu_seconds=0.25, array_mb=200)
QUICK = Sizes(rounds=1, tasks=200, auto=2000, cpu_tasks=4, cpu_seconds=0.05, array_mb=20)


def columns(sizes: Sizes) -> dict[str, str]:
    """Column key -> heading."""
    return {
        "cold": "cold start",
        "warm": "warm call",
        "cs1": f"{sizes.tasks:,} tasks, chunksize 1",
        "auto": f"{sizes.auto:,} tasks, auto-chunked",
        "cpu": f"CPU {sizes.cpu_tasks} × {sizes.cpu_seconds} s: speed-up",
        "array": f"{sizes.array_tasks} tasks × {sizes.array_mb} MB array",
        "array_mem": "… extra memory",
    }


UNITS = {"cold": "ms", "warm": "ms", "cs1": "tasks/s", "auto": "tasks/s", "cpu": "×", "array": "s", "array_mem": "MB"}


def large_array(sizes: Sizes) -> tuple[np.ndarray, list[float]]:
    """The large-array workload's array (the same in every process: a fixed
    seed) and the results its tasks must return."""
    array = np.random.default_rng(0).random((sizes.array_mb * 2**20 // (8 * 1024), 1024))
    return array, [float(array[i::8].sum()) for i in range(sizes.array_tasks)]


def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def one_round(contender: Contender, sizes: Sizes, array: np.ndarray, expected: list[float],
              figures: dict[str, Figure]) -> None:
    """Every workload once on one fresh pool of ``contender``."""

    def check(got, want, what: str) -> None:
        if list(got) != list(want):
            raise AssertionError(f"{contender.name} returned wrong results for {what}")

    def cold() -> list:
        contender.start()
        return contender.map(identity, [0], None)

    try:  # a pool that failed any workload, even the first, is still closed
        seconds, got = _timed(cold)
        check(got, [0], "cold start")
        figures["cold"].values.append(seconds * 1e3)
        seconds, got = _timed(contender.map, identity, [1, 2], None)
        check(got, [1, 2], "the warm call")
        figures["warm"].values.append(seconds * 1e3)
        seconds, got = _timed(contender.map, identity, list(range(sizes.tasks)), 1)
        check(got, range(sizes.tasks), "chunksize 1")
        figures["cs1"].values.append(sizes.tasks / seconds)
        seconds, got = _timed(contender.map, identity, list(range(sizes.auto)), None)
        check(got, range(sizes.auto), "auto-chunked")
        figures["auto"].values.append(sizes.auto / seconds)
        seconds, _ = _timed(contender.map, burn, [sizes.cpu_seconds] * sizes.cpu_tasks, 1)
        figures["cpu"].values.append(sizes.cpu_tasks * sizes.cpu_seconds / seconds)
        items = [(array, i) for i in range(sizes.array_tasks)]
        with PeakMemory() as memory:
            seconds, got = _timed(contender.map, array_sum, items, 1)
        check(got, expected, "the large array")
        figures["array"].values.append(seconds)
        figures["array_mem"].values.append(memory.extra / 2**20)
    finally:
        contender.close()
