"""What the benchmark runs inside a real Jupyter kernel.

The live widget only exists in a kernel, so mpnb with and without it is
measured there, interleaved, on the same workloads as the other contenders.
The driver (:mod:`benchmarks.run`) calls :func:`pool_round` through
``jupyter_client`` and reads the JSON line it prints.
"""

from __future__ import annotations

import inspect
import json
import time

import mpnb
from benchmarks.tasks import identity
from benchmarks.workloads import NEXT_POOL_PAUSE, warm_call


def has_live_widget() -> bool:
    """Whether this mpnb's Pool takes ``live=`` (the live status widget)."""
    return "live" in inspect.signature(mpnb.Pool).parameters


def pool_round(live: bool, tasks: int, auto: int) -> None:
    """Time one pool's cold start, warm call, chunksize-1 and auto-chunked maps; print JSON."""
    from benchmarks.contenders import end_spares

    options = {"live": live} if has_live_widget() else {}
    figures = {}
    end_spares()  # a cold start: nothing left ready by the previous round's pool
    start = time.perf_counter()
    pool = mpnb.Pool(2, context="exec", **options)
    pool.map(identity, [0])
    figures["cold"] = time.perf_counter() - start
    figures["warm"] = warm_call(lambda: pool.map(identity, [1, 2]), "mpnb.Pool in a kernel")
    start = time.perf_counter()
    assert pool.map(identity, range(tasks), chunksize=1) == list(range(tasks))
    figures["cs1"] = tasks / (time.perf_counter() - start)
    start = time.perf_counter()
    assert pool.map(identity, range(auto)) == list(range(auto))
    figures["auto"] = auto / (time.perf_counter() - start)
    pool.shutdown()
    time.sleep(NEXT_POOL_PAUSE)
    start = time.perf_counter()  # the notebook's next pool, as one_round measures it
    pool = mpnb.Pool(2, context="exec", **options)
    pool.map(identity, [0])
    figures["next"] = time.perf_counter() - start
    pool.shutdown()
    end_spares()
    print(json.dumps(figures))
