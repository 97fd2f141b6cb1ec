"""The functions the benchmark's workers run.

They live in an importable module because the spawn and forkserver start
methods send functions by name.  Each is small on purpose: the workloads
measure the pools, not the tasks.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing would add 5 ms to every contender's cold start: a worker imports this module
    from typing import Any


def identity(x: Any) -> Any:
    """A trivial task: the cost measured is the pool's own."""
    return x


def burn(seconds: float) -> float:
    """Use ``seconds`` of this process's CPU time, spinning in Python."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        n += 1
    return seconds


def array_sum(args: tuple) -> float:
    """Read a large array (every 8th row from row ``i``): it must reach the worker."""
    array, i = args
    return float(array[i::8].sum())


def mpnb_file(_: Any) -> str:
    """Where this worker's mpnb comes from: a baseline's workers must run the baseline."""
    import mpnb

    return mpnb.__file__


def burn_returning(args: tuple) -> Any:
    """Use ``seconds`` of CPU, then return ``megabytes`` of float64 numpy array filled with ``i``."""
    import numpy as np

    seconds, megabytes, i = args
    burn(seconds)
    return np.full(megabytes * 2**20 // 8, float(i))


def make_array(args: tuple) -> Any:
    """A new ``megabytes`` float64 numpy array filled with ``i``: a large result to send back."""
    import numpy as np

    megabytes, i = args
    return np.full(megabytes * 2**20 // 8, float(i))


def group_stats(frame: Any) -> Any:
    """Aggregate one part of a pandas frame by its ``key`` column (every group is whole in one part)."""
    return frame.groupby("key").agg(x_sum=("x", "sum"), y_mean=("y", "mean"), n=("x", "size"))


def import_module(args: tuple) -> bool:
    """Import module ``name`` in this worker, then hold it ``seconds`` so that the next task goes to another."""
    name, seconds = args
    __import__(name)
    time.sleep(seconds)
    return True
