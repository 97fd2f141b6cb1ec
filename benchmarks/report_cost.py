"""The cost of ``mpnb.report`` inside a task: ``python -m benchmarks.report_cost [--rounds N]``.

One local worker runs a loop of ``n`` = 1,000,000 iterations with a call of
``mpnb.report(i, n, "note")`` at each, the same loop without it, and the
same loop with a call of a Python function of the same signature that does
nothing (the floor: no Python-callable ``report`` can cost less): in
blocks of 50,000 iterations, the three taken in turn and each block started
by the next one (so a change of the machine's load, or an advantage of going
first, falls on all alike), for ``--rounds`` rounds.  Each iteration does
``adds`` multiply-adds: 30 (about 1 µs, where even the floor costs over
2 %) and 150 (about 5 µs).  Each row gives the median time, the difference to the loop
without a call as a share of the task's time, and the cost of one call (a
tight loop of calls minus an empty loop, in the same worker).
"""

from __future__ import annotations

import argparse
import statistics

import mpnb

ITERATIONS = 1_000_000
TASK_SOURCE = '''
import time, mpnb

def nothing(done, total=None, note=None):
    """The floor: a Python function of report's signature that does nothing."""

def plain(first, last, adds, call):
    """Seconds of iterations first..last-1 of ``adds`` multiply-adds, no call."""
    acc = 0
    start = time.perf_counter()
    for i in range(first, last):
        for k in range(adds):
            acc += k * i
    return time.perf_counter() - start

def with_report(first, last, adds, call):
    """The same iterations, each with a call of mpnb.report(i, last, note)."""
    report = mpnb.report
    acc = 0
    start = time.perf_counter()
    for i in range(first, last):
        for k in range(adds):
            acc += k * i
        report(i, last, "looping")
    return time.perf_counter() - start

def with_nothing(first, last, adds, call):
    """The same iterations, each with a call of nothing(i, last, note).  A
    function of its own, not with_report with another callable: the
    interpreter specializes each call site for the one function it calls."""
    acc = 0
    start = time.perf_counter()
    for i in range(first, last):
        for k in range(adds):
            acc += k * i
        nothing(i, last, "looping")
    return time.perf_counter() - start

def loops(n, adds, block=50_000):
    """Seconds of n iterations of ``adds`` multiply-adds without a call, with a
    report at each, and with a call of nothing() at each: in blocks, the three
    taken in turn, each block starting with the next one (no order favours one)."""
    runs = [(plain, None), (with_report, None), (with_nothing, None)]
    seconds = [0.0, 0.0, 0.0]
    for b, first in enumerate(range(0, n, block)):
        for j in range(3):
            which = (b + j) % 3
            run, call = runs[which]
            seconds[which] += run(first, first + block, adds, call)
    return tuple(seconds)

def per_call(n):
    """Nanoseconds of one report call and of one nothing() call (each loop minus an empty loop)."""
    report = mpnb.report
    start = time.perf_counter()
    for i in range(n):
        pass
    empty = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(n):
        report(i, n, "looping")
    middle = time.perf_counter()
    for i in range(n):
        nothing(i, n, "looping")
    end = time.perf_counter()
    return (middle - start - empty) / n * 1e9, (end - middle - empty) / n * 1e9
'''
# a module no worker imports: the functions travel by value
TASKS: dict = {"__name__": "report_cost_tasks"}
exec(compile(TASK_SOURCE, "report_cost_tasks.py", "exec"), TASKS)


#: multiply-adds per iteration: about 1 µs, and about 5 µs
WORKS = (30, 150)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report_cost")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    # per work: the loop's seconds without a call, with report, with nothing()
    times: dict[int, list[list[float]]] = {adds: [[], [], []] for adds in WORKS}
    calls: list[float] = []
    floor_calls: list[float] = []
    with mpnb.Pool(1, live=False) as pool:
        for _ in range(args.rounds):
            for adds in WORKS:
                for kept, seconds in zip(times[adds], pool.submit(TASKS["loops"], ITERATIONS, adds).result()):
                    kept.append(seconds)
            call, nothing = pool.submit(TASKS["per_call"], ITERATIONS).result()
            calls.append(call)
            floor_calls.append(nothing)
    print(f"One call: mpnb.report {statistics.median(calls):.0f} ns ({min(calls):.0f}–{max(calls):.0f}), "
          f"the floor (a Python function that does nothing) {statistics.median(floor_calls):.0f} ns "
          f"({min(floor_calls):.0f}–{max(floor_calls):.0f}); medians of {args.rounds} rounds.")
    print()
    print(f"| task of {ITERATIONS:,} iterations | without a call | with mpnb.report(i, n, note) | share of the task "
          "| with a call that does nothing (floor) | share of the task |")
    print("|---|---|---|---|---|---|")
    for adds in WORKS:
        plain, reporting, floor = times[adds]
        base = statistics.median(plain)
        cells = [f"{base:.2f} s ({min(plain):.2f}–{max(plain):.2f})"]
        for kept in (reporting, floor):
            median = statistics.median(kept)
            cells += [f"{median:.2f} s ({min(kept):.2f}–{max(kept):.2f})", f"{100 * (median - base) / median:.1f} %"]
        print(f"| {adds} multiply-adds each | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
