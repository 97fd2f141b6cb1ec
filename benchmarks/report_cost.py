"""The cost of ``mpnb.report`` inside a task: ``python -m benchmarks.report_cost [--rounds N]``.

One local worker runs the same task with and without a call of
``mpnb.report(i, n, "note")`` at each of its ``n`` = 1,000,000 iterations,
alternately, for ``--rounds`` rounds.  Each iteration does about
``WORK`` of arithmetic.  The row gives the median time of each, the
difference as a share of the task's time, and the cost of one call (a
tight loop of calls minus an empty loop, in the same worker).
"""

from __future__ import annotations

import argparse
import statistics

import mpnb

ITERATIONS = 1_000_000
TASK_SOURCE = '''
import time, mpnb

def loop(n, reporting):
    """n iterations of a little arithmetic, with or without a report each."""
    report = mpnb.report
    start = time.perf_counter()
    acc = 0
    for i in range(n):
        for k in range(30):
            acc += k * i
        if reporting:
            report(i, n, "looping")
    return time.perf_counter() - start

def per_call(n):
    """Nanoseconds of one report call (its loop minus an empty loop)."""
    report = mpnb.report
    start = time.perf_counter()
    for i in range(n):
        pass
    empty = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(n):
        report(i, n)
    return (time.perf_counter() - start - empty) / n * 1e9
'''
# a module no worker imports: the functions travel by value
TASKS: dict = {"__name__": "report_cost_tasks"}
exec(compile(TASK_SOURCE, "report_cost_tasks.py", "exec"), TASKS)
WORK = "30 multiply-adds"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report_cost")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    plain: list[float] = []
    reporting: list[float] = []
    calls: list[float] = []
    with mpnb.Pool(1, live=False) as pool:
        for _ in range(args.rounds):
            plain.append(pool.submit(TASKS["loop"], ITERATIONS, False).result())
            reporting.append(pool.submit(TASKS["loop"], ITERATIONS, True).result())
            calls.append(pool.submit(TASKS["per_call"], ITERATIONS).result())
    base, with_reports = statistics.median(plain), statistics.median(reporting)
    share = 100 * (with_reports - base) / with_reports
    print("| row | without report | with report at every iteration | cost, share of the task | one call |")
    print("|---|---|---|---|---|")
    print(f"| task of {ITERATIONS:,} iterations × {WORK}, median of {args.rounds} | {base:.2f} s "
          f"({min(plain):.2f}–{max(plain):.2f}) | {with_reports:.2f} s ({min(reporting):.2f}–{max(reporting):.2f}) "
          f"| {share:.1f} % | {statistics.median(calls):.0f} ns ({min(calls):.0f}–{max(calls):.0f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
