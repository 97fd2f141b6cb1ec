"""The physical floor, measured in the same run as the pools, and the ideal.

No pool can start a worker faster than the machine starts a bare interpreter,
answer a call faster than two processes pass a small message back and forth,
or hand over an array faster than memory copies it once.  These rows measure
those costs, interleaved with the contenders, so that every pool's figure
can be read as a multiple of what is physically possible:

- **fork+exec**: ``python -I -S -c pass`` through ``subprocess`` (vfork or
  posix_spawn, then exec), to its exit: the floor of a cold start;
- **pipe round trip**: 8 bytes to a child process and back through two
  pipes: the floor of a warm call, and, as 1 ÷ round trip, of a task sent
  alone (chunksize 1);
- **memcpy**: a numpy copy of the data that crosses between processes,
  once, into memory already mapped: the large array (arguments); one large
  result, times the number of results;

and the **ideal** of 2 workers with no overhead at all: a speed-up of 2,
2 × 1,000 tasks of 1 ms per second, the 50 ms tasks' CPU time ÷ 2, the
extra memory of holding the large results once, and the pandas groupby of
the whole frame in one process ÷ 2 (measured).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from benchmarks.contenders import WORKERS
from benchmarks.measure import Figure
from benchmarks.tasks import group_stats
from benchmarks.workloads import MS_TASK, Sizes

FORK_EXEC = "floor: fork+exec of `python -I -S -c pass`"
PIPE = "floor: pipe round trip (8 bytes)"
MEMCPY = "floor: memcpy of the data, once"
IDEAL = f"ideal: {WORKERS} workers, no overhead"
ROWS = {FORK_EXEC: ("cold", "next"), PIPE: ("warm", "cs1"), MEMCPY: ("array", "out"),
        IDEAL: ("cpu", "ms1", "mb", "out_mem", "pandas")}
ROUND_TRIPS = 2000
#: the echo child: reads 8 bytes, writes them back, until its input closes
ECHO = ("import os, sys\nr, w = int(sys.argv[1]), int(sys.argv[2])\n"
        "while (b := os.read(r, 8)):\n    os.write(w, b)\n")


def fork_exec() -> float:
    """Seconds to start a bare interpreter and see it exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
    return time.perf_counter() - start


def pipe_round_trip() -> float:
    """Seconds per round trip of 8 bytes to a child and back (the mean of many)."""
    child_reads, to_child = os.pipe()
    from_child, child_writes = os.pipe()
    child = subprocess.Popen([sys.executable, "-I", "-S", "-c", ECHO, str(child_reads), str(child_writes)],
                             pass_fds=(child_reads, child_writes))
    os.close(child_reads)
    os.close(child_writes)
    try:
        message = b"12345678"
        os.write(to_child, message)  # the first one waits for the child to start: not timed
        os.read(from_child, 8)
        start = time.perf_counter()
        for _ in range(ROUND_TRIPS):
            os.write(to_child, message)
            os.read(from_child, 8)
        return (time.perf_counter() - start) / ROUND_TRIPS
    finally:
        os.close(to_child)
        child.wait()
        os.close(from_child)


def memcpy(megabytes: int) -> float:
    """Seconds to copy ``megabytes`` with numpy into memory already mapped: the bytes' move alone."""
    source = np.ones(megabytes * 2**20 // 8)
    target = np.zeros_like(source)  # written once, so no page fault falls inside the copy
    start = time.perf_counter()
    np.copyto(target, source)
    return time.perf_counter() - start


def floor_round(sizes: Sizes, data, figures: dict[str, dict[str, Figure]]) -> None:
    """One measurement of every floor and ideal, appended to ``figures[row][column]``."""
    for _ in range(3):  # each is short: three samples per round
        seconds = fork_exec()
        figures[FORK_EXEC]["cold"].values.append(seconds * 1e3)
        figures[FORK_EXEC]["next"].values.append(seconds * 1e3)
    trip = pipe_round_trip()
    figures[PIPE]["warm"].values.append(trip * 1e3)
    figures[PIPE]["cs1"].values.append(1 / trip)
    figures[MEMCPY]["array"].values.append(memcpy(sizes.array_mb))
    figures[MEMCPY]["out"].values.append(memcpy(sizes.out_mb) * sizes.out_tasks)
    ideal = figures[IDEAL]
    ideal["cpu"].values.append(float(WORKERS))
    ideal["ms1"].values.append(WORKERS / MS_TASK)
    ideal["mb"].values.append(sizes.mb_tasks * sizes.mb_seconds / WORKERS)
    ideal["out_mem"].values.append(sizes.out_tasks * sizes.out_mb)
    start = time.perf_counter()
    group_stats(data.whole)
    ideal["pandas"].values.append((time.perf_counter() - start) / WORKERS)
