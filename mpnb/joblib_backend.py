"""The joblib backend ``"mpnb"``: joblib's batches on an :class:`mpnb.Pool`.

::

    joblib.Parallel (the cell)            MpnbBackend                 mpnb.Pool workers
    --------------------------            -----------                 -----------------
    configure(n_jobs) ------------------> Pool(n_jobs) (live view)
    submit(batch, callback) ------------> pool.submit(_run_batch, _Batch)
                                                  hard limit: timeout x tasks + grace
                                                            ------->  each task under a
                                                                      SIGALRM of `timeout`:
                                                                      TaskTimeoutError raised
                                                                      inside the task
    callback(future) <------------------- future done (engine thread)
    abort_everything / Ctrl-C ----------> pool.cancel(): running batches' workers killed
    terminate ---------------------------> pool.shutdown()

Use it with ``joblib.parallel_config(backend="mpnb", n_jobs=2, timeout=60)``;
the backend's keyword options (``timeout``, and ``mpnb.Pool``'s ``context``,
``initializer``, ``initargs``, ``env``, ``live``) are given there.  ``import
mpnb`` registers the name with joblib: at once when joblib is already imported,
else when joblib is first imported (see ``mpnb.__init__``); :func:`register`
does it by hand.

``timeout`` is per joblib task (one ``delayed`` call), not per batch: a task
running longer gets a ``TaskTimeoutError`` raised inside it, so a caller that
catches errors of its tasks goes on (scikit-learn's search scores that fit with
``error_score``).  A task that cannot be interrupted (stuck in C code that does
not check signals) is stopped by killing its worker once the whole batch has
overrun; that batch then fails, and joblib aborts the call, as it does for any
failure.

``n_jobs=1`` runs in the kernel, as every joblib backend does.  Inside an mpnb
worker, mpnb's nesting guard (``MPNB_MAX_DEPTH``, :mod:`mpnb.limits`) decides:
at the limit, nested ``Parallel`` calls (a scikit-learn estimator's own
``n_jobs``) run sequentially in that worker instead of starting processes.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from joblib import register_parallel_backend  # type: ignore[import-untyped]
from joblib._parallel_backends import (  # type: ignore[import-untyped]
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from mpnb import limits
from mpnb._repr import short_repr
from mpnb.errors import TaskTimeoutError
from mpnb.pool import Pool

__all__ = ["MpnbBackend", "register"]

#: seconds a batch may overrun ``timeout x its tasks`` before its worker is killed
HARD_GRACE = 10.0
#: mpnb.Pool options a backend passes on; the pool's size comes from n_jobs
POOL_OPTIONS = ("context", "initializer", "initargs", "env", "live")


def register() -> None:
    """Register the backend with joblib as ``"mpnb"`` (``import mpnb`` does this)."""
    register_parallel_backend("mpnb", MpnbBackend)


class MpnbBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's batches on an ``mpnb.Pool``; see the module docstring."""

    supports_retrieve_callback = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None,
                 timeout: float | None = None, **pool_options: Any):
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        unknown = sorted(set(pool_options) - set(POOL_OPTIONS))
        if unknown:
            raise TypeError(f"joblib backend 'mpnb' has no option {', '.join(unknown)}; it takes timeout= and "
                            f"mpnb.Pool's {', '.join(POOL_OPTIONS)}, as in "
                            "parallel_config(backend='mpnb', timeout=60)")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"joblib backend 'mpnb': timeout={timeout!r}; give a number of seconds "
                             "above 0, or None for no limit")
        self.timeout = timeout
        self.pool_options = pool_options
        self._pool: Pool | None = None
        self._submitting = threading.Lock()

    def __reduce__(self):
        # sent to the workers inside each batch, as the backend of nested calls
        return (_nested, (self.nesting_level, self.timeout, self.pool_options))

    @property
    def pool(self) -> Pool | None:
        """The ``mpnb.Pool`` of the current ``Parallel`` call, if one runs."""
        return self._pool

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or limits.runs_inline():
            return 1  # in a worker at the nesting limit: no processes of its own
        if n_jobs < 0:
            return max(limits.cpu_count() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, prefer: Any = None,
                  require: Any = None, **ignored: Any) -> int:
        """Start the pool of this ``Parallel`` call (joblib's memmapping options do not apply)."""
        n = self.effective_n_jobs(n_jobs)
        if n == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        if self._pool is None or self._pool.closed or self._pool.workers != n:
            self._shut()
            self._pool = Pool(n, **self.pool_options)
        self.parallel = parallel
        return n

    def submit(self, func: Any, callback: Any = None) -> Any:
        """Run one batch on the pool; ``callback(future)`` when it ends."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("joblib backend 'mpnb' was not configured: use it through joblib.Parallel")
        batch = _Batch(func, self.timeout)
        with self._submitting:  # the hard limit of this batch, read as it is submitted
            pool.timeout = None if self.timeout is None else self.timeout * len(batch.tasks) + HARD_GRACE
            future: Any = pool.submit(_run_batch, batch)
        future.mpnb_batch = batch
        if callback is not None:
            future.add_done_callback(callback)
        return future

    apply_async = submit  # the name joblib before 1.5 calls

    def retrieve_result_callback(self, future: Any) -> Any:
        try:
            return future.result()
        except BaseException as exc:
            batch = getattr(future, "mpnb_batch", None)
            if batch is not None:
                held = "task was" if len(batch.tasks) == 1 else f"batch held {len(batch.tasks)} tasks:"
                exc.add_note(f"mpnb: the joblib {held} {batch.describe()}")
            raise

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Stop the running batches (their workers are killed) and drop the queued ones."""
        pool = self._pool
        if pool is None:
            return
        pool.cancel()
        if not ensure_ready:
            self._shut()

    def terminate(self) -> None:
        self._shut()
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[ParallelBackendBase, None]:
        return _nested((self.nesting_level or 0) + 1, self.timeout, self.pool_options), None

    def _shut(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _nested(nesting_level: int | None, timeout: float | None, pool_options: dict) -> MpnbBackend:
    return MpnbBackend(nesting_level=nesting_level, timeout=timeout, **pool_options)


# ------------------------------------------------------------------ batches


class _Batch:
    """A joblib batch as mpnb runs it; its repr names its tasks in the live view and in errors."""

    def __init__(self, batch: Any, timeout: float | None):
        self.batch = batch
        self.tasks: list = list(getattr(batch, "items", ())) or [(batch, (), {})]
        if timeout is not None and hasattr(batch, "items"):
            batch.items = [(_Timed(func, timeout), args, kwargs) for func, args, kwargs in batch.items]

    def describe(self) -> str:
        return "; ".join(_task_label(func, args, kwargs) for func, args, kwargs in self.tasks[:4]) + (
            f"; and {len(self.tasks) - 4} more" if len(self.tasks) > 4 else "")

    def __repr__(self) -> str:
        func = self.tasks[0][0]
        more = f" and {len(self.tasks) - 1} more" if len(self.tasks) > 1 else ""
        return f"joblib {_name(func)}{more}"


def _run_batch(batch: _Batch) -> Any:
    return batch.batch()


class _Timed:
    """A joblib task with a time limit: ``TaskTimeoutError`` is raised inside it when it overruns."""

    def __init__(self, func: Any, timeout: float):
        self.func, self.timeout = func, timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return self.func(*args, **kwargs)  # signals reach the main thread only

        def expired(signum: int, frame: Any) -> None:
            raise TaskTimeoutError(
                f"joblib task {_task_label(self.func, args, kwargs)} ran longer than timeout={self.timeout} s "
                "and was stopped; give a larger timeout in parallel_config(backend='mpnb', timeout=...)")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            return self.func(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _name(func: Any) -> str:
    func = getattr(func, "func", func)  # _Timed, and scikit-learn's _FuncWrapper
    func = getattr(func, "function", func)
    return getattr(func, "__qualname__", None) or type(func).__qualname__


def _task_label(func: Any, args: tuple, kwargs: dict) -> str:
    shown = [short_repr(a) for a in args[:3]] + [f"{k}={short_repr(v)}" for k, v in list(kwargs.items())[:3]]
    if len(args) > 3 or len(kwargs) > 3:
        shown.append("...")
    return f"{_name(func)}({', '.join(shown)})"

