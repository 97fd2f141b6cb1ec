"""The task cache's costs: ``python -m benchmarks.cache [--quick]``.

- **cache= off vs on**: a map of 1 ms tasks (CPU, distinct arguments) on 2
  workers, without a cache, then with an empty cache that stores every result
  as it arrives; the overhead is the ratio of the two times minus 1;
- **a hit**: the same map again, every result taken from the cache: the
  time per task.

Each round uses a new cache directory; the figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import mpnb
from benchmarks.tasks import burn

MS = 0.001


def ms_task(i: int) -> int:
    """1 ms of CPU; its argument makes each task's key its own."""
    burn(MS)
    return i


def one_round(pool: mpnb.Pool, n: int) -> tuple[float, float, float]:
    """Seconds for the map without a cache, with an empty one, and all hits."""
    with tempfile.TemporaryDirectory() as where:
        start = time.perf_counter()
        off = pool.map(ms_task, range(n))
        t_off = time.perf_counter() - start
        start = time.perf_counter()
        on = pool.map(ms_task, range(n), cache=where)
        t_on = time.perf_counter() - start  # includes writing every result (the call waits for it)
        start = time.perf_counter()
        hits = pool.map(ms_task, range(n), cache=where)
        t_hit = time.perf_counter() - start
        assert off == on == hits == list(range(n))
        assert pool.monitor.calls()[-1].cached == n
    return t_off, t_on, t_hit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 tasks, 3 rounds (default: 10,000, 5)")
    args = parser.parse_args(argv)
    n, rounds = (1000, 3) if args.quick else (10_000, 5)
    with mpnb.Pool(2, live=False) as pool:
        pool.map(ms_task, range(100))  # workers started and warm
        figures = [one_round(pool, n) for _ in range(rounds)]
    off, on, hit = (statistics.median(column) for column in zip(*figures))
    print(f"| workload ({n:,} tasks of 1 ms, 2 workers, median of {rounds}) | figure |")
    print("|---|---|")
    print(f"| map, cache= off | {off:.3f} s ({n / off:,.0f} tasks/s) |")
    print(f"| map, cache= on, empty cache (every result stored) | {on:.3f} s ({n / on:,.0f} tasks/s) |")
    print(f"| overhead of cache= on | {100 * (on / off - 1):+.1f} % |")
    print(f"| map, every result from the cache | {hit:.3f} s: {1e6 * hit / n:.1f} µs per task |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
