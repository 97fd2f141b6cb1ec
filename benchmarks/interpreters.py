"""Subinterpreters (Python 3.14) against processes.

``python -m benchmarks.interpreters [--rounds N]`` on Python 3.14 compares
``concurrent.futures.InterpreterPoolExecutor`` (no process start, bytes
shared instead of piped) and ``mpnb.Pool(backend="interpreters")`` (built on
the same subinterpreters) with ``mpnb.Pool`` (exec workers) and
``ProcessPoolExecutor`` (forkserver, 3.14's default), two
workers each, on the workloads where subinterpreters could win: a cold start,
a warm call, many trivial tasks one per message, CPU-bound tasks, and large
bytes arguments.  Contenders run interleaved for several rounds; the table
gives medians with min-max.  (numpy cannot load in a subinterpreter, so the
array workloads of ``python -m benchmarks`` cannot be run there.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

from benchmarks.contenders import end_spares
from benchmarks.tasks import burn, identity

WORKERS = 2
TASKS = 2000
CPU_TASKS, CPU_SECONDS = 16, 0.25
BLOBS, BLOB_MB = 8, 25


def blob_size(blob: bytes) -> int:
    """Read a large bytes argument: it must reach the worker."""
    return len(blob) + blob[-1]


def make_pool(name: str) -> Any:
    if name == "InterpreterPoolExecutor":
        from concurrent.futures import InterpreterPoolExecutor

        return InterpreterPoolExecutor(WORKERS)
    if name == "mpnb.Pool (exec)":
        import mpnb

        return mpnb.Pool(WORKERS)
    if name == "mpnb.Pool (interpreters)":
        import mpnb

        return mpnb.Pool(WORKERS, backend="interpreters")
    return ProcessPoolExecutor(WORKERS)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_round(name: str, figures: dict[str, list[float]]) -> None:
    end_spares()  # a cold start: no spare worker left by the previous round
    pool = make_pool(name)
    try:
        figures["cold start (ms)"].append(1000 * timed(lambda: pool.submit(identity, 1).result()))
    finally:
        pool.shutdown()
    pool = make_pool(name)
    blob = bytes(BLOB_MB * 2**20)
    try:
        pool.submit(identity, 1).result()
        list(pool.map(identity, range(WORKERS * 4)))  # every worker started
        figures["warm call (ms)"].append(
            1000 * timed(lambda: [f.result() for f in [pool.submit(identity, i) for i in range(2)]]))
        seconds = timed(lambda: [f.result() for f in [pool.submit(identity, i) for i in range(TASKS)]])
        figures[f"{TASKS} tasks, one per message (tasks/s)"].append(TASKS / seconds)
        seconds = timed(lambda: list(pool.map(burn, [CPU_SECONDS] * CPU_TASKS)))
        figures[f"CPU {CPU_TASKS} x {CPU_SECONDS} s: speed-up"].append(
            CPU_TASKS * CPU_SECONDS / seconds)
        figures[f"{BLOBS} tasks x {BLOB_MB} MB bytes (s)"].append(
            timed(lambda: list(pool.map(blob_size, [blob] * BLOBS))))
    finally:
        pool.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    if sys.version_info < (3, 14):
        print("InterpreterPoolExecutor is new in Python 3.14; run this on 3.14", file=sys.stderr)
        return 2
    names = ["InterpreterPoolExecutor", "mpnb.Pool (interpreters)", "mpnb.Pool (exec)",
             "ProcessPoolExecutor (forkserver)"]
    figures: dict[str, dict[str, list[float]]] = {
        n: {k: [] for k in ("cold start (ms)", "warm call (ms)",
                            f"{TASKS} tasks, one per message (tasks/s)",
                            f"CPU {CPU_TASKS} x {CPU_SECONDS} s: speed-up",
                            f"{BLOBS} tasks x {BLOB_MB} MB bytes (s)")} for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            one_round(name, figures[name])
    columns = list(figures[names[0]])
    print(f"Python {sys.version.split()[0]}, {WORKERS} workers, medians of {rounds} rounds (min-max)\n")
    print("| contender | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name in names:
        cells = [f"{statistics.median(v):,.2f} ({min(v):,.2f}-{max(v):,.2f})"
                 for v in figures[name].values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
