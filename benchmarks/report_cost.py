"""The cost of ``mpnb.report`` inside a task: ``python -m benchmarks.report_cost [--rounds N]``.

One local worker runs a loop of ``n`` = 1,000,000 iterations with a call of
``mpnb.report(i, n, "note")`` at each, and the same loop without it: in
blocks of 50,000 iterations taken in turn (so a change of the machine's
load falls on both alike), for ``--rounds`` rounds.  Each iteration does
``WORK``.  The row gives the median time of each, the difference as a share
of the time with reports, and the cost of one call (a tight loop of calls
minus an empty loop, in the same worker).
"""

from __future__ import annotations

import argparse
import statistics

import mpnb

ITERATIONS = 1_000_000
TASK_SOURCE = '''
import time, mpnb

def loops(n, block=50_000):
    """Seconds of n iterations without, then with, a report at each, in alternate blocks."""
    report = mpnb.report
    plain = reporting = 0.0
    acc = 0
    for first in range(0, n, block):
        start = time.perf_counter()
        for i in range(first, first + block):
            for k in range(30):
                acc += k * i
        middle = time.perf_counter()
        for i in range(first, first + block):
            for k in range(30):
                acc += k * i
            report(i, n, "looping")
        plain += middle - start
        reporting += time.perf_counter() - middle
    return plain, reporting

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
            without, with_ = pool.submit(TASKS["loops"], ITERATIONS).result()
            plain.append(without)
            reporting.append(with_)
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
