"""The thread engine: ``mpnb.Pool(backend="threads")`` runs tasks on threads
of this process.

It is the pool for tasks that wait (downloads, files, databases, a
subprocess) on any Python, and for CPU-bound ones on a free-threaded build
(``python3.13t``), where threads run Python code in parallel.  With the
GIL, CPU-bound Python code runs one thread at a time: use processes for it.

Nothing is pickled (``in_process``): tasks get the very objects, a cell's
functions and classes need no ``%%mppool``, and results come back as they
are.  Each slot runs one chunk at a time on a thread started for it
(:class:`~mpnb.backends.inline.InProcessEngine`, shared with the inline
engine), and is a worker row of the live view.  What a task prints is
captured on its thread (:mod:`mpnb._capture`) and shown in the cell in
task order, as the other engines do.

A thread cannot be stopped: a task that is cancelled (Ctrl-C, the Cancel
button, ``pool.cancel()``) or times out fails at once in the notebook, but
its thread runs on until the task returns; what it returns or prints then is
dropped.  Tasks not started yet never run.  Shutdown waits for the threads
of the tasks that finished; a pool starts no process.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from mpnb import _capture as capture
from mpnb import limits
from mpnb.backends.inline import InProcessEngine
from mpnb.calls import Call

__all__ = ["ThreadEngine", "default_size", "gil_enabled"]

# more threads than CPUs, as concurrent.futures.ThreadPoolExecutor: tasks
# that wait leave their CPU to others, and four more threads cost little to
# CPU-bound tasks on a free-threaded build; 32 at most by default
_EXTRA = 4
_MOST = 32


def default_size() -> int:
    """Threads of ``Pool(backend="threads")`` when not given: the usable CPUs
    plus four, at most 32 and at most ``MPNB_MAX_WORKERS``."""
    return max(1, min(limits.cpu_count() + _EXTRA, _MOST, limits.max_workers()))


def gil_enabled() -> bool:
    """False on a free-threaded build running without the GIL (Python 3.13t and later)."""
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else bool(is_enabled())


class ThreadEngine(InProcessEngine):
    """``size`` tasks at once, on threads of this process (see the module docstring)."""

    backend = "threads"
    catches = BaseException  # SystemExit in a task is its own failure, as in ThreadPoolExecutor
    rows = True

    def __init__(self, workers: int | None, initializer: Callable[..., Any] | None, initargs: tuple):
        size = default_size() if workers is None else limits.resolve_workers(workers)
        super().__init__("mpnb-threads", size, size, initializer, initargs)
        #: the view's label: whether threads run Python code in parallel here
        self.method = "GIL" if gil_enabled() else "free-threaded"
        self.start()

    def _call(self, fn: Callable, call: Call, index: int, item: Any) -> tuple[Any, dict[int, str], dict[int, list]]:
        local = capture.install()  # again each task: a %%capture may have put its own stream there
        segments: list[tuple[str, str]] = []
        local.segments = segments
        try:
            value, failures, _ = super()._call(fn, call, index, item)
        finally:
            local.segments = None
        return value, failures, ({index: segments} if segments else {})
