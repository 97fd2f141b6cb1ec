"""The workloads, and one round of them on one contender.

Kept apart from :mod:`benchmarks.run` so that a child interpreter running an
earlier mpnb (:mod:`benchmarks.baseline`) times exactly the same calls, with
the same code, as the contenders run in the benchmark's own process.

Workloads, per contender and round (2 workers each; a round starts after
:attr:`Sizes.settle` seconds of rest (5; see :func:`_settle`), so no round runs
in the wake of the last one's large frees):

- **cold start**: create the pool and run one trivial task, to its result
  (with nothing left ready by an earlier pool: mpnb's spare workers are ended,
  the standard library's forkserver is stopped);
- **next pool**: the same, half a second after the round's pool closed:
  what a notebook's next ``with Pool() as pool:`` cell costs (no one runs
  cells faster; a forkserver is still running then, and mpnb adopts the
  spares the closed pool left);
- **warm call**: the median of :data:`WARM_CALLS` calls in a row (2 trivial
  tasks each) on that pool, from its second call on (one call is a single
  sample of some 0.5 ms, and its spread from round to round was wider than the
  gaps between the pools);
- **chunksize 1**: 2,000 trivial tasks, one per message (tasks/s);
- **auto-chunked**: 20,000 trivial tasks, the library's own chunking (tasks/s);
- **CPU-bound**: 16 tasks of 0.25 s of CPU each; speed-up = 4 s / wall time;
- **large array**: 8 tasks that each read the same 200 MB numpy array (the
  workers import numpy before, untimed; time,
  and extra memory: peak PSS of the process tree, shared memory counted
  once, minus the value before: see ``measure.py``);
- **1 ms tasks**: 10,000 tasks of 1 ms of CPU each, the library's own
  chunking (tasks/s; the ideal is 2 workers × 1,000 tasks/s);
- **1 MB results**: 200 tasks of 50 ms of CPU, each returning a 1 MB numpy
  array (time; the ideal is 200 × 50 ms ÷ 2 workers);
- **large results**: 8 tasks, each returning a new 100 MB numpy array (time,
  and extra memory, the results included);
- **pandas groupby**: a frame of 4 million rows split by group key into 8
  parts; each task aggregates one part, the parent concatenates the results,
  which must equal the groupby of the whole frame in one process (time;
  the workers import pandas before, untimed).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from benchmarks.contenders import WORKERS, Contender
from benchmarks.measure import Figure, PeakMemory, stolen_seconds
from benchmarks.tasks import array_sum, burn, burn_returning, group_stats, identity, import_module, make_array


@dataclass(frozen=True)
class Sizes:
    rounds: int
    tasks: int  # chunksize-1 workload
    auto: int  # auto-chunked workload
    cpu_tasks: int
    cpu_seconds: float
    array_mb: int
    array_tasks: int = 8
    ms_tasks: int = 10_000  # tasks of 1 ms
    mb_tasks: int = 200  # tasks of 50 ms returning 1 MB
    mb_seconds: float = 0.05
    out_mb: int = 100  # each large result
    out_tasks: int = 8
    frame_rows: int = 4_000_000
    frame_parts: int = 8
    # seconds of rest before each contender's round: CPU-bound tasks started within
    # 2 s of this process freeing large arrays ran up to 5 % slower (measured:
    # 1.88-1.95x in 5 of 8 tries, against 1.98x after 4 s), whoever came next
    settle: float = 5.0


# 3 rounds: with the last four workloads a round of every contender takes about 3 minutes on 2 cores
FULL = Sizes(rounds=3, tasks=2000, auto=20_000, cpu_tasks=16, cpu_seconds=0.25, array_mb=200)
QUICK = Sizes(rounds=1, tasks=200, auto=2000, cpu_tasks=4, cpu_seconds=0.05, array_mb=20,
              ms_tasks=500, mb_tasks=20, mb_seconds=0.01, out_mb=10, frame_rows=200_000, settle=0.1)
MS_TASK = 0.001  # seconds of CPU per task of the 1 ms workload
NEXT_POOL_PAUSE = 0.5  # seconds between a pool's close and the next pool (a notebook's next cell)
WARM_CALLS = 5  # calls of 2 trivial tasks, in a row, behind each figure of the warm call


def columns(sizes: Sizes) -> dict[str, str]:
    """Column key -> heading."""
    return {
        "cold": "cold start",
        "next": "next pool",
        "warm": "warm call",
        "cs1": f"{sizes.tasks:,} tasks, chunksize 1",
        "auto": f"{sizes.auto:,} tasks, auto-chunked",
        "cpu": f"CPU {sizes.cpu_tasks} × {sizes.cpu_seconds} s: speed-up",
        "array": f"{sizes.array_tasks} tasks × {sizes.array_mb} MB array",
        "array_mem": "… extra memory",
        "ms1": f"{sizes.ms_tasks:,} tasks of 1 ms",
        "mb": f"{sizes.mb_tasks} tasks of {sizes.mb_seconds * 1e3:g} ms → 1 MB each",
        "out": f"{sizes.out_tasks} tasks → {sizes.out_mb} MB array each",
        "out_mem": "… extra memory",
        "pandas": f"pandas groupby, {sizes.frame_rows:,} rows in {sizes.frame_parts} parts",
    }


UNITS = {"cold": "ms", "next": "ms", "warm": "ms", "cs1": "tasks/s", "auto": "tasks/s", "cpu": "×", "array": "s",
         "array_mem": "MB", "ms1": "tasks/s", "mb": "s", "out": "s", "out_mem": "MB", "pandas": "s",
         "cpu_steal": "ms"}  # not a column: the host's steal during the CPU-bound map (see run.render)
#: units where a larger figure is better; in the others (times, memory) a smaller one is
HIGHER_IS_BETTER = {"tasks/s", "×"}


@dataclass
class Data:
    """What the workloads send, and what they must get back (the same in every process: fixed seeds)."""

    array: np.ndarray
    expected: list[float]  # the large-array workload's results
    whole: object  # the pandas workload's frame
    parts: list  # the same, split by group key
    grouped: object  # the groupby of the whole frame, in one process


def large_array(sizes: Sizes) -> tuple[np.ndarray, list[float]]:
    """The large-array workload's array (the same in every process: a fixed
    seed) and the results its tasks must return."""
    array = np.random.default_rng(0).random((sizes.array_mb * 2**20 // (8 * 1024), 1024))
    return array, [float(array[i::8].sum()) for i in range(sizes.array_tasks)]


def frame(sizes: Sizes):
    """The pandas workload's frame: an integer group key (10,000 groups) and two float columns."""
    import pandas as pd

    rng = np.random.default_rng(1)
    return pd.DataFrame({"key": rng.integers(0, 10_000, sizes.frame_rows),
                         "x": rng.random(sizes.frame_rows), "y": rng.random(sizes.frame_rows)})


def split(whole, parts: int) -> list:
    """``whole`` in ``parts`` frames by group key, so that every group is whole in one part."""
    return [whole[whole["key"] % parts == i] for i in range(parts)]


def prepare(sizes: Sizes) -> Data:
    array, expected = large_array(sizes)
    whole = frame(sizes)
    return Data(array, expected, whole, split(whole, sizes.frame_parts), group_stats(whole))


def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


class WrongResults(AssertionError):
    pass


def _check(contender: Contender, got, want, what: str) -> None:
    if list(got) != list(want):
        raise WrongResults(f"{contender.name} returned wrong results for {what}")


def warm_call(map_two: Callable[[], list], name: str) -> float:
    """The median seconds of :data:`WARM_CALLS` calls of ``map_two()``, each of
    which must return ``[1, 2]``."""
    times = []
    for _ in range(WARM_CALLS):
        start = time.perf_counter()
        got = map_two()
        times.append(time.perf_counter() - start)
        if list(got) != [1, 2]:
            raise WrongResults(f"{name} returned wrong results for the warm call")
    return statistics.median(times)


def _settle(seconds: float) -> None:
    """Rest ``seconds``: sleep, then half a second of busy wait here, so that
    the next cold start does not pay the CPU's wake from a long idle
    (measured: a fork Pool's cold start took 5.8 ms after no pause, 8.7 ms
    after 3 s of sleep, 5.9 ms after 3 s of busy wait)."""
    busy = min(0.5, seconds)
    time.sleep(seconds - busy)
    end = time.perf_counter() + busy
    while time.perf_counter() < end:
        pass


def one_round(contender: Contender, sizes: Sizes, data: Data, figures: dict[str, Figure]) -> None:
    """Every workload once on one fresh pool of ``contender``, then the next pool's start."""
    contender.forget()
    _settle(sizes.settle)
    try:  # a pool that failed any workload, even the first, is still closed
        _small_tasks(contender, sizes, figures)
        _arrays_in(contender, sizes, data, figures)
        _results_back(contender, sizes, figures)
        _pandas(contender, data, figures)
    finally:
        contender.close()
    time.sleep(NEXT_POOL_PAUSE)
    seconds, got = _timed(_first_result, contender)
    contender.close()
    contender.forget()  # nothing of it may run on beside the next contender
    _check(contender, got, [0], "the next pool")
    figures["next"].values.append(seconds * 1e3)


def _first_result(contender: Contender) -> list:
    """A new pool and one trivial task, to its result."""
    contender.start()
    return contender.map(identity, [0], None)


def _small_tasks(contender: Contender, sizes: Sizes, figures: dict[str, Figure]) -> None:
    """Cold start, warm call, trivial tasks, CPU-bound tasks and 1 ms tasks."""

    seconds, got = _timed(_first_result, contender)
    _check(contender, got, [0], "cold start")
    figures["cold"].values.append(seconds * 1e3)
    seconds = warm_call(lambda: contender.map(identity, [1, 2], None), contender.name)
    figures["warm"].values.append(seconds * 1e3)
    seconds, got = _timed(contender.map, identity, list(range(sizes.tasks)), 1)
    _check(contender, got, range(sizes.tasks), "chunksize 1")
    figures["cs1"].values.append(sizes.tasks / seconds)
    seconds, got = _timed(contender.map, identity, list(range(sizes.auto)), None)
    _check(contender, got, range(sizes.auto), "auto-chunked")
    figures["auto"].values.append(sizes.auto / seconds)
    stolen = stolen_seconds()
    seconds, _ = _timed(contender.map, burn, [sizes.cpu_seconds] * sizes.cpu_tasks, 1)
    figures["cpu"].values.append(sizes.cpu_tasks * sizes.cpu_seconds / seconds)
    figures.setdefault("cpu_steal", Figure(UNITS["cpu_steal"])).values.append((stolen_seconds() - stolen) * 1e3)
    seconds, got = _timed(contender.map, burn, [MS_TASK] * sizes.ms_tasks, None)
    _check(contender, got, [MS_TASK] * sizes.ms_tasks, "the 1 ms tasks")
    figures["ms1"].values.append(sizes.ms_tasks / seconds)


def _import_in_workers(contender: Contender, module: str) -> None:
    """Have each worker import ``module`` (untimed): one task each, held long enough that the next goes to another."""
    contender.map(import_module, [(module, 0.05)] * WORKERS, 1)


def _arrays_in(contender: Contender, sizes: Sizes, data: Data, figures: dict[str, Figure]) -> None:
    # the workers import numpy first, untimed, as for pandas: a fork-started one
    # (or joblib's, at its first task) has it already, and the import (30-50 ms
    # and some 10 MB per worker) is not the array's move
    _import_in_workers(contender, "numpy")
    items = [(data.array, i) for i in range(sizes.array_tasks)]
    with PeakMemory() as memory:
        seconds, got = _timed(contender.map, array_sum, items, 1)
    _check(contender, got, data.expected, "the large array")
    figures["array"].values.append(seconds)
    figures["array_mem"].values.append(memory.extra / 2**20)


def _firsts(arrays, megabytes: int) -> list[float]:
    """Each array's first element, or NaN where its size is wrong (a wrong result)."""
    return [float(a[0]) if a.nbytes == megabytes * 2**20 else float("nan") for a in arrays]


def _results_back(contender: Contender, sizes: Sizes, figures: dict[str, Figure]) -> None:
    """Tasks of 50 ms returning 1 MB each; tasks returning a large array each."""
    items = [(sizes.mb_seconds, 1, i) for i in range(sizes.mb_tasks)]
    seconds, got = _timed(contender.map, burn_returning, items, None)
    _check(contender, _firsts(got, 1), map(float, range(sizes.mb_tasks)), "the 1 MB results")
    figures["mb"].values.append(seconds)
    del got
    items = [(sizes.out_mb, i) for i in range(sizes.out_tasks)]
    with PeakMemory() as memory:
        seconds, got = _timed(contender.map, make_array, items, 1)
    ok = all(float(a[-1]) == i for i, a in enumerate(got))
    _check(contender, _firsts(got, sizes.out_mb) if ok else [], map(float, range(sizes.out_tasks)),
           "the large results")
    figures["out"].values.append(seconds)
    figures["out_mem"].values.append(memory.extra / 2**20)


def _pandas(contender: Contender, data: Data, figures: dict[str, Figure]) -> None:
    import pandas as pd

    # the workers import pandas first, untimed: a fork-started one has it already, and
    # the import (about 0.5 s) would otherwise outweigh what the pools do
    _import_in_workers(contender, "pandas")
    seconds, got = _timed(lambda: pd.concat(contender.map(group_stats, data.parts, 1)).sort_index())
    try:
        pd.testing.assert_frame_equal(got, data.grouped)
    except AssertionError as error:
        raise WrongResults(f"{contender.name} returned wrong results for the pandas groupby: {error}") from None
    figures["pandas"].values.append(seconds)
