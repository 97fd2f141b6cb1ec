"""What makes mpnb.Pool a drop-in for multiprocessing.Pool and ProcessPoolExecutor.

The handles a caller holds on work that runs in the background (futures and
``AsyncResult``), the ``multiprocessing.Pool`` methods built on the pool's
own calls and engine, and the names the two stdlib pools give to mpnb's
options::

    apply_async(f, args) ---- pool.submit ------------> TaskFuture --------+
    map_async(f, xs) -------- MapCall, its chunks ----> engine             |
                              (its last outcome, or first                  | done: on the engine's
                               failure, resolves a TaskFuture) ------------+ thread, callback or
                                                                           v error_callback, then
                                                                      AsyncResult.ready()
    close()      = shutdown(wait=False): queued work still runs
    join()       waits for the engine to stop (after close or terminate)
    terminate()  every call cancelled, the queue dropped, workers stopped

Nothing here starts a second way of running tasks: an ``AsyncResult`` is a
future of the pool's ``submit``, or of a call whose chunks go to the engine
like a ``map``'s.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import numbers
import sys
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from mpnb._protocol import Mode
from mpnb.calls import Call, Chunk
from mpnb.errors import cancelled

if TYPE_CHECKING:  # pragma: no cover
    from mpnb.backends import Engine
    from mpnb.monitor import Monitor

__all__ = ["AsyncResult", "ClosedPoolError", "MultiprocessingAPI", "TaskFuture", "pool_arguments"]

ON_ERROR = ("raise", "collect")

# how often a waiting caller wakes to notice Ctrl-C
_POLL = 0.05

_callback_log = logging.getLogger("concurrent.futures")


class ClosedPoolError(RuntimeError, ValueError):
    """Work given to a pool after ``close()``/``shutdown()``: a ``RuntimeError``
    as ``concurrent.futures`` raises, and a ``ValueError`` as ``multiprocessing.Pool`` does."""


# ------------------------------------------------------------------ futures


def replay(segments) -> None:
    """Write a task's captured output to this process's current streams."""
    if not segments:
        return
    streams = {"stdout": sys.stdout, "stderr": sys.stderr}
    for name, text in segments:
        stream = streams.get(name)
        if stream is not None:
            stream.write(text)
    for stream in streams.values():
        try:
            stream.flush()
        except Exception:
            pass


class TaskFuture(Future):
    """A Future that shows its task's output where its result is fetched."""

    _mpnb_output: Any = ()
    _mpnb_stop: Callable[[], None] | None = None

    def _show_output(self) -> None:
        output, self._mpnb_output = self._mpnb_output, ()
        replay(output)

    def _invoke_callbacks(self) -> None:
        # as concurrent.futures does, but for anything a callback raises
        # (SystemExit too): the engine's thread runs them and must live on
        for callback in getattr(self, "_done_callbacks"):  # Future's own list (checked by test_hangs)
            try:
                callback(self)
            except BaseException:
                _callback_log.exception("exception calling callback for %r", self)

    def _interrupted(self) -> None:
        """Ctrl-C while waiting: stop the task, as an interrupted map does."""
        stop = self._mpnb_stop
        if stop is not None:
            stop()

    def result(self, timeout: float | None = None) -> Any:
        __tracebackhide__ = True
        return self._fetch(super().result, timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        __tracebackhide__ = True
        return self._fetch(super().exception, timeout)

    def _fetch(self, wait: Callable[[float | None], Any], timeout: float | None) -> Any:
        """Wait as ``Future`` does; Ctrl-C stops the task, and the task's
        output is shown once it is done."""
        __tracebackhide__ = True
        try:
            return wait(timeout)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            if self.done():
                self._show_output()


class MapCall(Call):
    """The call of a ``map_async``/``starmap_async``: its last outcome (or,
    unless it collects errors, its first failure) runs ``ended`` once, on
    the thread that delivered it (the engine's)."""

    ended: Callable[[], None] | None = None
    collect = False

    def deliver(self, indices: Sequence[int], values: list[Any], failed: Iterable[int], output: dict[int, list]) -> None:
        super().deliver(indices, values, failed, output)
        with self.cond:
            over = self.total is not None and (len(self.results) >= self.total or bool(self.failed and not self.collect))
            ended = self.ended if over else None
            if over:
                self.ended = None
        if ended is not None:
            ended()


class AsyncResult:
    """The result of ``apply_async``, ``map_async`` or ``starmap_async``, as
    ``multiprocessing.pool.AsyncResult``: ``get``, ``wait``, ``ready``, ``successful``.

    ``callback(value)`` or ``error_callback(exception)`` runs on the pool's
    engine thread as the work ends, before ``ready()`` turns True (keep it
    short); what it raises is logged (logger ``concurrent.futures``) and
    changes nothing.  ``get()`` shows what the tasks printed.  Ctrl-C in
    ``get()`` or ``wait()`` stops the work, as an interrupted ``map`` does.
    """

    def __init__(self, future: TaskFuture, callback: Callable[[Any], Any] | None = None,
                 error_callback: Callable[[BaseException], Any] | None = None):
        self._future = future
        self._callback, self._error_callback = callback, error_callback
        self._ready = threading.Event()
        self._success = False
        future.add_done_callback(self._done)

    def __repr__(self) -> str:
        state = ("successful" if self._success else "failed") if self.ready() else "pending"
        return f"<mpnb AsyncResult {state}>"

    def _done(self, future: Future) -> None:
        try:
            error = Future.exception(future, 0)  # Future's own: get() shows the output, not this thread
        except CancelledError as exc:
            error = exc
        self._success = error is None
        try:
            if error is None and self._callback is not None:
                self._callback(Future.result(future, 0))
            elif error is not None and self._error_callback is not None:
                self._error_callback(error)
        except BaseException:
            _callback_log.exception("exception calling callback for %r", self)
        finally:
            self._ready.set()

    def ready(self) -> bool:
        """Whether the work has ended (its callback has run)."""
        return self._ready.is_set()

    def successful(self) -> bool:
        """Whether it ended without an exception; ``ValueError`` while it runs."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready: call successful() once ready() is True, or after wait()")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        """Wait until it is ready, or ``timeout`` seconds."""
        self._wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The value (a list for a map), or raise the task's exception;
        ``multiprocessing.TimeoutError`` if not ready within ``timeout`` seconds."""
        __tracebackhide__ = True
        if not self._wait(timeout):
            raise multiprocessing.TimeoutError(f"the result was not ready within {timeout} s; it still runs")
        return self._future.result()

    def _wait(self, timeout: float | None) -> bool:
        """Wait in short steps, so Ctrl-C is seen at once; it stops the work."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        try:
            while True:
                left = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
                if self._ready.wait(max(0.0, left)):
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
        except KeyboardInterrupt:
            self._future._interrupted()
            raise


def check_callbacks(callback: Any, error_callback: Any) -> None:
    for name, fn in (("callback", callback), ("error_callback", error_callback)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}={fn!r}: give a function (called with the {'value' if name == 'callback' else 'exception'}), "
                            "or None")


# ---------------------------------------------------------------- arguments


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: use 'raise' or 'collect'")
    return on_error


def check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout={timeout!r}: give a number of seconds above 0, or None")
    return timeout


def check_chunksize(chunksize: int) -> int:
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(f"chunksize={chunksize!r}: give a whole number of 1 or more, or None")
    return chunksize


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def map_arguments(iterables: tuple, chunksize: int | None) -> tuple[tuple, int | None]:
    """``map(fn, iterable, 4)`` is multiprocessing's chunksize: an int is
    never iterable, so it cannot be ``Executor.map``'s second iterable."""
    if len(iterables) == 2 and _is_int(iterables[1]):
        if chunksize is not None:
            raise TypeError(f"map() got chunksize twice: {iterables[1]!r} as the third argument and "
                            f"chunksize={chunksize!r}; give one")
        return iterables[:1], int(iterables[1])
    for n, iterable in enumerate(iterables[1:], start=3):
        if _is_int(iterable):
            raise TypeError(f"map(): argument {n} is {iterable!r}, not an iterable; a chunksize goes "
                            f"third, after a single iterable (map(fn, xs, {iterable!r})), or as chunksize=")
    return iterables, chunksize


def apply_arguments(args: Any, kwds: Any) -> tuple[tuple, dict]:
    """``apply(fn, args, kwds)`` as multiprocessing takes them, refused clearly when they are not."""
    try:
        args = tuple(args)
    except TypeError:
        raise TypeError(f"apply(fn, args=(), kwds={{}}): args={args!r} is not a tuple of arguments, as "
                        f"multiprocessing.Pool.apply takes them: apply(fn, ({args!r},)); "
                        "pool.submit(fn, *args, **kwargs) takes them one by one") from None
    if kwds is None:
        kwds = {}
    if not isinstance(kwds, dict):
        try:
            kwds = dict(kwds)
        except (TypeError, ValueError):
            raise TypeError(f"apply(fn, args=(), kwds={{}}): kwds={kwds!r} is not a dict of keyword "
                            "arguments; pool.submit(fn, *args, **kwargs) takes them one by one") from None
    return args, kwds


@dataclass(frozen=True)
class PoolArguments:
    """What ``mpnb.Pool`` was asked for, under mpnb's names."""

    workers: int | None
    initializer: Callable[..., Any] | None
    initargs: tuple
    context: str | None
    max_tasks_per_child: int | None


def pool_arguments(workers: Any, initializer: Any, initargs: Any, maxtasksperchild: Any, context: Any, *,
                   processes: Any = None, max_workers: Any = None, mp_context: Any = None,
                   max_tasks_per_child: Any = None) -> PoolArguments:
    """Read the arguments of ``multiprocessing.Pool`` (positional order
    ``processes, initializer, initargs, maxtasksperchild, context``) and of
    ``ProcessPoolExecutor`` (``max_workers, mp_context, initializer,
    initargs``: a context second means that order) as mpnb's options."""
    if isinstance(initializer, multiprocessing.context.BaseContext):
        # ProcessPoolExecutor's positional order: max_workers, mp_context, initializer, initargs
        if context is not None or mp_context is not None:
            raise TypeError(f"mpnb.Pool(): the context {initializer!r} is given second, as ProcessPoolExecutor "
                            "takes it, and again as context= or mp_context=; give it once")
        mp_context = initializer
        initializer = None if isinstance(initargs, tuple) and not initargs else initargs
        initargs, maxtasksperchild = (() if maxtasksperchild is None else maxtasksperchild), None
    count = _one("processes", processes, "max_workers", max_workers)
    count = _one("workers", workers, "processes" if processes is not None else "max_workers", count)
    limit = _one("maxtasksperchild", maxtasksperchild, "max_tasks_per_child", max_tasks_per_child)
    if initializer is not None and not callable(initializer):
        raise TypeError(f"mpnb.Pool(initializer={initializer!r}): initializer must be a function, run in each "
                        f"worker as it starts, or None (this {type(initializer).__name__} is not callable)")
    try:
        initargs = tuple(initargs)
    except TypeError:
        raise TypeError(f"mpnb.Pool(initargs={initargs!r}): give the initializer's arguments as a tuple") from None
    how = start_method(_one("context", context, "mp_context", mp_context),
                       "context" if context is not None else "mp_context")
    name = "maxtasksperchild" if maxtasksperchild is not None else "max_tasks_per_child"
    return PoolArguments(count, initializer, initargs, how, _check_max_tasks(limit, name))


def _one(name: str, value: Any, other: str, other_value: Any) -> Any:
    """The one of two names of an option that was given; both is an error."""
    if value is not None and other_value is not None:
        raise TypeError(f"mpnb.Pool({name}={value!r}, {other}={other_value!r}): these are two names of the same "
                        "option; give one")
    return value if value is not None else other_value


def _check_max_tasks(limit: Any, name: str) -> int | None:
    if limit is None:
        return None
    if not _is_int(limit) or limit < 1:  # a ValueError, as multiprocessing.Pool raises
        raise ValueError(f"mpnb.Pool({name}={limit!r}): a worker must run at least 1 task; "
                         "give 1 or more, or None to keep workers")
    return int(limit)


def start_method(context: Any, name_given: str = "context") -> str | None:
    """mpnb's start method for ``context``: its name, or a multiprocessing context."""
    if context is None:
        return None
    name = context
    if isinstance(context, multiprocessing.context.BaseContext):
        name = context.get_start_method()
    elif not isinstance(context, str):
        raise TypeError(f"mpnb.Pool({name_given}={context!r}): give a start method's name ('exec', 'loky', 'spawn', "
                        "'forkserver') or a multiprocessing context, such as multiprocessing.get_context('spawn')")
    if name == "fork":
        raise ValueError(
            f"mpnb.Pool({name_given}={context!r}): mpnb never forks the kernel. A forked worker copies the "
            "kernel's threads and sockets and can deadlock, which is why CPython moved away from 'fork'. "
            "Leave the context out (mpnb starts fresh interpreters, the fastest way), or pass "
            "multiprocessing.get_context('spawn') or 'forkserver'.")
    return name


# ------------------------------------------------------------- the methods


class MultiprocessingAPI:
    """The ``multiprocessing.Pool`` methods of ``mpnb.Pool`` that its own
    calls do not already give: ``apply_async``, ``map_async``,
    ``starmap_async``, ``close``, ``join``, ``terminate``, and ``with`` on a
    closed pool."""

    if TYPE_CHECKING:  # what mpnb.Pool provides
        _engine: Engine
        _running: dict[int, Call]
        _closed: bool
        monitor: Monitor
        on_error: str

        def _check_open(self) -> None: ...
        def _new_call(self, fn: Callable, timeout: float | None, mode: int, future: Future | None = None,
                      kind: type[Call] = Call, cache: Any = None) -> Call: ...
        def _chunks(self, call: Call, items: Iterable[Any], sizes: int | Iterator[int]) -> Iterator[tuple[int, Chunk]]: ...
        def _send(self, chunks: Iterable[tuple[int, Chunk]]) -> None: ...
        def _auto_chunksize(self, call: Call, n: int) -> int | Iterator[int]: ...
        def _end_call(self, call: Call, live: Any, interrupted: bool) -> None: ...
        def _watch_background(self, call: Call, items: list, done: Callable[[], bool]) -> None: ...
        def _wait_stopped(self) -> None: ...
        def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future: ...
        def _submit(self, fn: Callable, args: tuple, kwargs: dict, cache: Any = None) -> Future: ...
        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...

    def apply_async(self, func: Callable, args: Iterable = (), kwds: dict | None = None,
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None, *,
                    cache: Any = None) -> AsyncResult:
        """Run ``func(*args, **kwds)`` in a worker; an :class:`AsyncResult` at once.
        ``cache`` is ``apply``'s (:mod:`mpnb.cache`)."""
        __tracebackhide__ = True
        check_callbacks(callback, error_callback)
        args, kwds = apply_arguments(args, kwds)
        future = self._submit(func, tuple(args), kwds, cache)
        assert isinstance(future, TaskFuture)
        return AsyncResult(future, callback, error_callback)

    def map_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                  callback: Callable[[Any], Any] | None = None,
                  error_callback: Callable[[BaseException], Any] | None = None, *,
                  timeout: float | None = None, on_error: str | None = None, cache: Any = None) -> AsyncResult:
        """``map`` in the background: an :class:`AsyncResult` whose ``get()`` is the list.

        ``timeout`` (per task), ``on_error`` and ``cache`` are ``map``'s; with
        ``on_error="collect"`` the list holds the failed tasks' exceptions."""
        __tracebackhide__ = True
        return self._map_async(func, list(iterable), Mode.ARG, chunksize, callback, error_callback, timeout, on_error,
                               cache)

    def starmap_async(self, func: Callable, iterable: Iterable[Iterable], chunksize: int | None = None,
                      callback: Callable[[Any], Any] | None = None,
                      error_callback: Callable[[BaseException], Any] | None = None, *,
                      timeout: float | None = None, on_error: str | None = None, cache: Any = None) -> AsyncResult:
        """``starmap`` in the background: an :class:`AsyncResult` whose ``get()`` is the list."""
        __tracebackhide__ = True
        items = [tuple(args) for args in iterable]
        return self._map_async(func, items, Mode.STAR, chunksize, callback, error_callback, timeout, on_error, cache)

    def _map_async(self, fn, items, mode, chunksize, callback, error_callback, timeout, on_error,
                   cache=None) -> AsyncResult:
        __tracebackhide__ = True
        on_error = self.on_error if on_error is None else check_on_error(on_error)
        check_callbacks(callback, error_callback)
        self._check_open()
        call = self._new_call(fn, timeout, mode, kind=MapCall, cache=cache)
        assert isinstance(call, MapCall)
        n = call.total = len(items)
        chunksize = self._auto_chunksize(call, n) if chunksize is None else check_chunksize(chunksize)
        call.collect = on_error == "collect"
        future = TaskFuture()
        future._mpnb_stop = functools.partial(self._stop_map, call)
        result = AsyncResult(future, callback, error_callback)
        call.ended = functools.partial(self._map_ended, call, future)
        self.monitor.call_started(call.id, n)
        self._running[call.id] = call
        if n == 0:
            call.ended()
            return result
        self._watch_background(call, items, future.done)
        try:
            self._send(self._chunks(call, items, chunksize))
        except BaseException:  # Ctrl-C while pickling the items: what was sent is stopped
            call.ended = None
            self._stop_map(call)
            self._end_call(call, None, True)
            raise
        return result

    def _stop_map(self, call: Call) -> None:
        """Stop a background map: its tasks not finished end with a
        ``CancelledError`` now (an engine drops the queued ones without a
        word, and stops the running ones where it can)."""
        self._engine.cancel(call)
        with call.cond:
            missing = [i for i in range(call.total or 0) if i not in call.results]
        if missing:
            call.deliver(missing, [cancelled(f"task {i}") for i in missing], missing, {})

    def _map_ended(self, call: MapCall, future: TaskFuture) -> None:
        """A background map's outcome into its future (on the engine's thread, usually)."""
        with call.cond:
            failed = None if call.collect else call.first_failure()
            values = call.values() if failed is None else None
            future._mpnb_output = [segment for i in sorted(call.output) for segment in call.output[i]]
            call.output.clear()
        if failed is not None:
            # its other tasks are stopped: nobody will see them, and join() must not wait for them
            self._engine.cancel(call)
        self._end_call(call, None, False)
        if failed is None:
            future.set_result(values)
        else:
            future.set_exception(call.results[failed])

    def close(self) -> None:
        """Take no more work; what was given still runs, then the workers leave."""
        self.shutdown(wait=False)

    def join(self) -> None:
        """Wait for the workers to leave, after :meth:`close` or :meth:`terminate`."""
        if not self._closed:
            raise ValueError("mpnb.Pool.join(): the pool is still running; call pool.close() (or "
                             "pool.terminate()) before join()")
        self._wait_stopped()

    def terminate(self) -> None:
        """Stop now: unfinished work ends with ``CancelledError``, work not
        started never runs, the workers are stopped; returns when they are."""
        for call in list(self._running.values()):
            if isinstance(call, MapCall):
                self._stop_map(call)
                continue
            if call.future is not None:
                call.future.cancel()
            self._engine.cancel(call)
        self.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Any:
        if self._closed:
            raise ClosedPoolError("with mpnb.Pool: this pool was closed or shut down; create a new mpnb.Pool")
        return self
