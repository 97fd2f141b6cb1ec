"""How many processes and threads a pool may use.

Every limit is a named constant read from the environment once, so a user can
change it without touching code, and every error about a limit names the
variable that changes it.

- ``MPNB_MAX_WORKERS``: the most workers one pool may start (default: four
  times the usable CPUs, at least 8).
- ``MPNB_THREADS_PER_WORKER``: BLAS/OpenMP threads in each worker (default:
  usable CPUs divided by the number of workers, at least 1; a worker pinned
  to its own CPUs, ``Pool(pin=True)``, gets their number).
- ``MPNB_MAX_DEPTH``: how deep pools may nest (default 1: only the notebook's
  own process starts workers; a pool created inside a worker runs its tasks
  inline, in that worker, one after the other).
"""

from __future__ import annotations

import os

__all__ = [
    "DEPTH_VAR",
    "THREAD_VARS",
    "cpu_count",
    "current_depth",
    "max_depth",
    "max_workers",
    "resolve_workers",
    "runs_inline",
    "thread_env",
    "threads_per_worker",
]

# set in every worker's environment: how many pools deep the worker runs
DEPTH_VAR = "MPNB_DEPTH"

# read by OpenMP, OpenBLAS, MKL, Accelerate and numexpr when they load
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def cpu_count() -> int:
    """CPUs this process may use: affinity, cgroup quota and the host count.

    loky's ``cpu_count`` reads the cgroup CPU quota, so a container limited to
    2 CPUs on a 64-core host gets 2 workers, not 64.
    """
    from loky import cpu_count as loky_cpu_count

    return max(1, int(loky_cpu_count()))


def _int_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; unset it or give a whole number") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} is negative; give 0 or more")
    return value


def max_workers() -> int:
    """The most workers one pool may start (``MPNB_MAX_WORKERS``)."""
    return _int_from_env("MPNB_MAX_WORKERS", max(8, 4 * cpu_count()))


def resolve_workers(workers: int | None) -> int:
    """The worker count for ``Pool(workers)``: the CPU count when ``None``.

    Raises ``ValueError`` for a count below 1 or above ``MPNB_MAX_WORKERS``.
    """
    cap = max_workers()
    if workers is None:
        return max(1, min(cpu_count(), cap))
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be an int or None, not {type(workers).__name__}")
    if workers < 1:
        # the stdlib's words too, which code written for ProcessPoolExecutor may look for
        raise ValueError(f"workers={workers}: a pool needs at least 1 worker (max_workers must be greater than 0)")
    if workers > cap:
        raise ValueError(
            f"workers={workers} is more than the limit of {cap} workers per pool "
            f"({cpu_count()} CPUs usable here); set the environment variable "
            f"MPNB_MAX_WORKERS to raise the limit"
        )
    return workers


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """BLAS/OpenMP threads for each of ``workers`` workers.

    N workers each starting one thread per core would run N x cores threads
    on cores CPUs; dividing the CPUs among the workers avoids that.  A worker
    pinned to its own ``cpus`` CPUs (``Pool(pin=True)``) gets that many.
    """
    default = max(1, cpus if cpus is not None else cpu_count() // max(1, workers))
    return max(1, _int_from_env("MPNB_THREADS_PER_WORKER", default))


def thread_env(workers: int, cpus: int | None = None) -> dict[str, str]:
    """Environment variables that cap native thread pools in a worker."""
    n = str(threads_per_worker(workers, cpus))
    return {name: n for name in THREAD_VARS}


def current_depth() -> int:
    """0 in the notebook, 1 in a worker of a pool, 2 in a worker's worker."""
    return _int_from_env(DEPTH_VAR, 0)


def max_depth() -> int:
    """How many levels of pools may start processes (``MPNB_MAX_DEPTH``)."""
    return _int_from_env("MPNB_MAX_DEPTH", 1)


def runs_inline() -> bool:
    """True where a new pool must not start processes: inside a worker.

    A pool created inside a worker (a library that parallelises internally,
    called from a task) would otherwise multiply processes: 8 workers each
    starting 8 more.  Such a pool runs its tasks inline instead.
    """
    return current_depth() >= max_depth()
