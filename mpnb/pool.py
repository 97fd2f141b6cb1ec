"""mpnb.Pool: a process pool that behaves in a notebook.

The pool is policy: it turns calls into chunks, waits for their outcomes in
short steps (so that Ctrl-C is seen at once), replays what tasks printed in
task order, and decides what the caller gets.  Where the tasks run is an
engine's business (:mod:`mpnb.backends`)::

    caller thread (the cell)                  engine (its own thread)
    ------------------------                  -----------------------
    map / imap / submit / apply (*_async: mpcompat)
      | Call (fn pickled once)
      | Chunks --------- engine.submit ------> run them: worker processes,
      |                                        a dask cluster, or inline
      | <---- Call.deliver (values, errors, -- for every task, whatever happens
      |       output) under Call.cond
      | replay output in task order
      | Ctrl-C / Cancel -- engine.cancel ----> stop the call's tasks
      | shutdown --------- engine.shutdown --> finish or drop, then stopped
"""

from __future__ import annotations

import functools
import os
import pickle
import weakref
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from mpnb import backends, exits, serialize, view
from mpnb._protocol import Mode
from mpnb.calls import (WAIT_TIMEOUT, Call, Chunk, arguments, as_list, batches, chunk_sizes, describe, dump_items,
                        in_batches)
from mpnb.mpcompat import (
    AsyncResult,
    ClosedPoolError,
    MapCall,
    MultiprocessingAPI,
    TaskFuture,
    apply_arguments,
    check_chunksize,
    check_on_error,
    check_timeout,
    map_arguments,
    pool_arguments,
    replay,
)
from mpnb.errors import (
    RemoteTaskError,
    RemoteTraceback,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerMemoryError,
    forked_copy_error,
    function_error,
    pickling_error,
)

if TYPE_CHECKING:  # pragma: no cover
    from mpnb.timeline import Timeline

__all__ = [
    "AsyncResult",
    "ClosedPoolError",
    "Pool",
    "RemoteTaskError",
    "RemoteTraceback",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerMemoryError",
]

# how often a waiting caller wakes to handle clicks on its live view (else its call wakes it)
_POLL = 0.05
# how long an interrupted call waits for its running tasks to be stopped
_CANCEL_WAIT = 1.5


class Pool(MultiprocessingAPI, Executor):
    """A process pool that works from notebooks.

    ``Pool(workers=None, *, timeout=None, on_error="raise")`` starts
    ``workers`` processes (default: the usable CPUs, cgroup-aware) in the
    background and returns at once.  It is a ``concurrent.futures.Executor``
    (``submit``, ``map``, ``shutdown``, ``with``) and also has the
    ``multiprocessing.Pool`` methods (``imap``, ``imap_unordered``,
    ``starmap``, ``apply``, the ``*_async`` ones, ``close``, ``join``,
    ``terminate``: :mod:`mpnb.mpcompat`), and takes both pools' arguments
    (``processes``, ``max_workers``, ``mp_context``, ``maxtasksperchild``,
    ``max_tasks_per_child``, positional as they take them).

    Functions defined in notebook cells travel by value (cloudpickle);
    functions from modules travel by reference.  ``timeout`` is per task: a
    task running longer is stopped by killing its worker and fails alone
    with :class:`TaskTimeoutError`.  A worker that crashes fails only its
    task, with :class:`WorkerCrashedError`.  ``on_error="collect"`` returns
    exceptions in place of results instead of raising.  What tasks print is
    shown in the cell that runs the call, in task order.

    ``initializer(*initargs)`` runs in each worker as it starts; ``env`` adds
    environment variables to the workers.  ``context`` is how workers start,
    always as fresh interpreters: ``"exec"`` (default on POSIX: mpnb's own
    launcher, the fastest), ``"loky"`` (loky's launcher), ``"spawn"`` or
    ``"forkserver"``; never ``fork``.  ``backend="dask"`` with ``address``
    runs the tasks on a dask.distributed cluster instead; ``backend="threads"``
    on threads of this process (:mod:`mpnb.backends.threads`);
    ``backend="interpreters"`` in subinterpreters of this process, Python 3.14
    (:mod:`mpnb.backends.interpreters`).  A worker is
    replaced after ``max_tasks_per_child`` tasks (a chunk is not split).

    Per worker slot (local backend, :mod:`mpnb.resources`): ``worker_env(rank)``
    adds variables, ``gpus`` (``"auto"``, ids, or a count) sets
    ``CUDA_VISIBLE_DEVICES`` and its kin round-robin, ``pin=True`` gives each
    worker its own CPUs.  ``max_memory`` (``"2GiB"``) kills a worker that holds
    more and fails its task with :class:`WorkerMemoryError`; ``soft_memory``
    replaces a worker between tasks once it holds more.
    ``cache=True`` (or a directory) keeps each task's result across kernels
    and takes stored results instead of running their tasks; ``map`` and the
    other calls take ``cache=`` too (:mod:`mpnb.cache`); ``cache_errors=True``
    stores failures as well.

    Inside a worker, a new ``Pool`` starts no processes: it runs its tasks
    inline (see :mod:`mpnb.limits`, ``MPNB_MAX_DEPTH``).
    """

    def __init__(
        self,
        workers: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        *,
        processes: int | None = None,
        max_workers: int | None = None,
        mp_context: Any = None,
        max_tasks_per_child: int | None = None,
        timeout: float | None = None,
        on_error: str = "raise",
        env: dict[str, str] | None = None,
        backend: str = "local",
        address: Any = None,
        live: bool | None = None,
        worker_env: Callable[[int], dict[str, str]] | None = None,
        gpus: Any = None,
        pin: bool = False,
        max_memory: int | str | None = None,
        soft_memory: int | str | None = None,
        cache: Any = False,
        cache_errors: bool = False,
    ):
        given = pool_arguments(workers, initializer, initargs, maxtasksperchild, context, processes=processes,
                               max_workers=max_workers, mp_context=mp_context, max_tasks_per_child=max_tasks_per_child)
        self.backend = backends.check(backend, address)
        self.timeout = check_timeout(timeout)
        self.on_error = check_on_error(on_error)
        #: show a live status view while work runs: None decides by where it
        #: runs (see mpnb.view.choose_mode), False never, True always
        self.live = view.check_live(live)
        #: results of the last ``map``/``starmap``, in input order, kept even
        #: when it raised or was interrupted: a value, the exception of a
        #: failed task, or a ``CancelledError`` for a task that did not finish
        self.last_results: list[Any] | None = None
        self._closed, self._owner = False, os.getpid()  # a forked copy refuses work: see _check_open
        self._running: dict[int, Call] = {}  # calls under way, for cancel()
        self._interrupts: set[int] = set()  # blocking calls that cancel() stopped
        self._last_call: int | None = None
        #: where finished tasks' results are kept across kernels (mpnb.cache), or None
        self.cache = cache_store(cache)
        self.cache_errors = bool(cache_errors)
        engine = backends.create(backends.Options(
            backend=backend, address=address, workers=given.workers, initializer=given.initializer,
            initargs=given.initargs, env=dict(env or {}), context=given.context,
            max_tasks_per_child=given.max_tasks_per_child,
            resources=dict(worker_env=worker_env, gpus=gpus, pin=pin, max_memory=max_memory, soft_memory=soft_memory)))
        self._engine = engine
        self.workers = engine.size
        self.monitor = engine.monitor
        #: the dask scheduler's address (``backend="dask"``), else None
        self.address: str | None = engine.address
        # a pool dropped without shutdown() must not leave workers behind
        self._finalizer = exits.finalize(self, engine.shutdown, True)

    def __repr__(self) -> str:
        engine = self._engine
        state = "closed" if self._closed else ("inline" if engine.backend == "inline" else "running")
        where = f"backend={engine.backend!r} " if engine.backend in ("dask", "threads") else ""
        where += f"address={self.address!r} " if self.address else ""
        return f"<mpnb.Pool {where}workers={self.workers} timeout={self.timeout} on_error={self.on_error!r} {state}>"

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers (none where tasks run in this process)."""
        if self._engine.in_process:
            return []
        here = os.getpid()  # subinterpreters' rows name this process: it is no worker
        return [row.pid for row in self.monitor.snapshot() if row.pid is not None and row.pid != here]

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown`, :meth:`close` or :meth:`terminate` was called; a closed pool takes no work."""
        return self._closed

    # ---------------------------------------------------------- calls and chunks

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedPoolError("this mpnb.Pool was closed or shut down; create a new mpnb.Pool to run more tasks")
        if os.getpid() != self._owner:
            raise forked_copy_error(self._owner, os.getpid())
        engine = self._engine
        if engine.error is not None:
            raise BrokenProcessPool(f"this mpnb.Pool stopped working ({engine.error!r}); create a new mpnb.Pool")
        if engine.stopped.is_set():  # not by shutdown(): at interpreter exit
            raise RuntimeError("cannot schedule new futures after interpreter shutdown: this mpnb.Pool's "
                               "workers were stopped as the interpreter exits")

    def _new_call(self, fn: Callable, timeout: float | None, mode: int, future: Future | None = None,
                  kind: type[Call] = Call, cache: Any = None) -> Call:
        if not callable(fn):
            raise TypeError(f"the pool needs a callable, not a {type(fn).__name__}")
        fn_bytes = None
        if not self._engine.in_process:
            try:
                fn_bytes = serialize.dumps_function(fn)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # SystemExit from a __reduce__ too
                raise function_error(fn, exc) from exc
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        # the function itself is kept only where tasks run in this process: a
        # future kept by its caller must not keep the function's objects alive
        call = kind(fn if self._engine.in_process else None, fn_bytes, timeout, mode, future)
        store = self.cache if cache is None else cache_store(cache)
        if store is not None:
            from mpnb import cache as task_cache

            call.cache = task_cache.for_call(store, fn, functools.partial(arguments, mode), self.cache_errors)
        return call

    def _chunks(self, call: Call, items: Iterable[Any], sizes: int | Iterator[int]) -> Iterator[tuple[int, Chunk]]:
        """``(tasks so far, chunk)`` pairs, of a chunksize or of ``sizes``; a chunk may
        be empty when its only task failed to pickle (that task's outcome is then delivered)."""
        index = 0
        for batch in batches(items, sizes):
            indices: Sequence[int] = range(index, index + len(batch))  # a range: no list of ints to build
            index += len(batch)
            if call.cache is not None:  # stored results are delivered, the rest run
                indices, batch = call.cache.take(indices, batch, functools.partial(_cached, self.monitor, call))
                if not batch:
                    yield index, Chunk(call, [], [], b"")
                    continue
            try:
                data = self._dump(call, batch)
            except KeyboardInterrupt:
                raise
            except BaseException:  # SystemExit from a __reduce__ too: it is the task's failure
                # find out which argument does not pickle, fail that task alone
                for i, item in zip(indices, batch):
                    yield max(i + 1, index if i == indices[-1] else 0), self._single_chunk(call, i, item)
                continue
            yield index, Chunk(call, indices, batch, data)

    def _dump(self, call: Call, items: list) -> bytes | None:
        """A chunk's items pickled for the engine (large arrays through shared
        memory where it shares this machine's); nothing for an in-process one."""
        engine = self._engine
        if engine.in_process:
            return None
        return dump_items(items, call if engine.shares_memory else None)

    def _single_chunk(self, call: Call, index: int, item: Any) -> Chunk:
        try:
            return Chunk(call, [index], [item], self._dump(call, [item]))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            where = describe(call, index, item)
            error = pickling_error(exc, where, *arguments(call.mode, item))
            error.add_note(f"mpnb: raised by {where}")
            call.deliver([index], [error], [index], {})
            return Chunk(call, [], [], b"")  # nothing to run

    def _send(self, chunks: Iterable[tuple[int, Chunk]]) -> None:
        """Give the engine the chunks of :meth:`_chunks`, pickled as they go (:func:`in_batches`)."""
        for batch in in_batches(chunks):
            self._engine.submit(batch)

    def _cancel(self, call: Call) -> None:
        self._engine.cancel(call).wait(_CANCEL_WAIT)

    def _auto_chunksize(self, call: Call, n: int) -> int | Iterator[int]:
        if n > 1 and self._engine.tiny(call, n):
            # one chunk: its worker runs and reports it once (a second chunk
            # cost a new pool's map of 2 trivial tasks some 0.09 ms of 0.72)
            return n
        return chunk_sizes(n, self.workers, self._engine.pace(call))

    # ---------------------------------------------------------- Executor

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` in a worker; returns a ``Future``.

        What the task prints is shown when its result is fetched with
        ``future.result()`` or ``future.exception()``.
        """
        __tracebackhide__ = True  # IPython shows the caller's line, not mpnb's frames
        return self._submit(fn, args, kwargs)

    def _submit(self, fn: Callable, args: tuple, kwargs: dict, cache: Any = None) -> Future:
        """``submit``, with a ``cache=`` of the call (``apply_async`` has a place for one)."""
        __tracebackhide__ = True
        self._check_open()
        future = TaskFuture()
        try:
            call = self._new_call(fn, None, Mode.KWARGS, future, cache=cache)
        except pickle.PicklingError as exc:  # the pickle doctor's PicklingProblem too
            # as concurrent.futures: what cannot be sent fails the task's future, not submit()
            future.set_exception(exc)
            return future
        future._mpnb_stop = functools.partial(_stop_submitted, self._engine, call)
        self.monitor.call_started(call.id, 1)
        self._running[call.id] = call
        future.add_done_callback(functools.partial(_submitted_done, self._running, self._engine, call))
        self._watch_background(call, [(args, kwargs)], future.done)
        self._send(self._chunks(call, [(args, kwargs)], 1))
        return future

    def _watch_background(self, call: Call, items: list, done: Callable[[], bool]) -> None:
        view.watch_background(_watched(self, call, items), call.id, self.live, done)

    def map(  # type: ignore[override]
        self,
        fn: Callable,
        *iterables: Iterable,
        chunksize: int | None = None,
        timeout: float | None = None,
        on_error: str | None = None,
        cache: Any = None,
    ) -> list[Any]:
        """``[fn(x) for x in iterable]`` on the workers; a list in input order.

        With several iterables, ``fn`` gets one item of each (like ``zip``).
        ``chunksize`` tasks travel together (automatic when ``None``); an int
        third, ``map(fn, xs, 4)``, is the chunksize, as in multiprocessing.
        ``timeout`` (seconds, per task) and ``on_error`` override the pool's.
        The outcome stays in ``pool.last_results`` even when the call raises
        or is interrupted.
        """
        __tracebackhide__ = True
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        iterables, chunksize = map_arguments(iterables, chunksize)
        if len(iterables) == 1:
            return self._map(fn, as_list(iterables[0]), Mode.ARG, chunksize, timeout, on_error, cache)
        return self._map(fn, list(zip(*iterables)), Mode.STAR, chunksize, timeout, on_error, cache)

    def starmap(
        self,
        fn: Callable,
        iterable: Iterable[Iterable],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        on_error: str | None = None,
        cache: Any = None,
    ) -> list[Any]:
        """``[fn(*args) for args in iterable]`` on the workers, in input order."""
        __tracebackhide__ = True
        return self._map(fn, [tuple(args) for args in iterable], Mode.STAR, chunksize, timeout, on_error, cache)

    def apply(self, func: Callable, args: Iterable = (), kwds: dict | None = None, *, cache: Any = None) -> Any:
        """Run ``func(*args, **kwds)`` in a worker and wait for its value
        (as ``multiprocessing.Pool.apply``; ``submit`` takes ``*args``)."""
        __tracebackhide__ = True
        args, kwds = apply_arguments(args, kwds)
        results = self._map(func, [(args, kwds)], Mode.KWARGS, 1, None, "raise", cache)
        return results[0]

    def _map(self, fn, items, mode, chunksize, timeout, on_error, cache=None) -> list[Any]:
        __tracebackhide__ = True
        on_error = self.on_error if on_error is None else check_on_error(on_error)
        self._check_open()
        call = self._new_call(fn, timeout, mode, cache=cache)
        n = call.total = len(items)
        chunksize = self._auto_chunksize(call, n) if chunksize is None else check_chunksize(chunksize)
        self.last_results = None
        self.monitor.call_started(call.id, n)
        self._running[call.id], self._last_call = call, call.id
        live, interrupted = None, False
        try:
            self._send(self._chunks(call, items, chunksize))
            live = view.watch(_watched(self, call, items), call.id, self.live, polled=True)  # not delaying them
            self._wait_all(call, n, on_error, live)
        except KeyboardInterrupt as interrupt:
            interrupted = True
            self._cancel(call)
            finished = len(call.results) - len(call.failed)
            interrupt.add_note(
                f"mpnb: interrupted; {finished} of {n} results finished and are kept in "
                "pool.last_results (unfinished tasks hold a CancelledError)"
            )
            raise
        finally:
            self._end_call(call, live, interrupted)
            self.last_results = call.snapshot(n)
            for index in sorted(call.output):
                replay(call.output.pop(index, None))
        return self.last_results

    def _wait_all(self, call: Call, n: int, on_error: str, live: view.Session | None) -> None:
        """Wait until the call's ``n`` tasks ended, replaying output in task
        order; with ``on_error="raise"``, raise the first failure at once."""
        __tracebackhide__ = True
        shown = 0
        while shown < n:
            with call.cond:
                if call.contiguous < n and not (call.failed and on_error == "raise"):
                    call.cond.wait(_POLL if live is not None else WAIT_TIMEOUT)  # see Call.wake
                upto = call.contiguous
                failed = call.first_failure()
            self._between_waits(call, live)
            if call.output:
                for index in range(shown, upto):
                    replay(call.output.pop(index, None))
            shown = upto
            if failed is not None and on_error == "raise":
                # its other tasks are stopped: nobody will see them, and a
                # later shutdown() must not wait for them
                self._engine.cancel(call)
                raise call.results[failed]

    def _between_waits(self, call: Call, live: view.Session | None) -> None:
        """What a waiting caller does each time it wakes: clicks on the view, cancel()."""
        if live is not None:
            live.poll()
        if call.id in self._interrupts:
            raise KeyboardInterrupt

    def _end_call(self, call: Call, live: view.Session | None, interrupted: bool) -> None:
        self._running.pop(call.id, None)
        self._interrupts.discard(call.id)
        call.release()
        if call.cache is not None:  # what the call computed is stored before the cell ends
            call.cache.store.flush()
        self.monitor.call_finished(call.id)
        if live is not None:
            live.finish(interrupted)

    def imap(
        self,
        fn: Callable,
        iterable: Iterable,
        chunksize: int = 1,
        *,
        timeout: float | None = None,
        on_error: str | None = None,
        cache: Any = None,
    ) -> Iterator[Any]:
        """Lazy ``map``: yields results in input order as they are ready.

        Reads the input only a few chunks ahead of the results, so it suits
        long or endless iterables.  A failed task raises when its turn comes
        (or is yielded, with ``on_error="collect"``).
        """
        __tracebackhide__ = True
        return self._imap(fn, iterable, chunksize, timeout, on_error, True, cache)

    def imap_unordered(
        self,
        fn: Callable,
        iterable: Iterable,
        chunksize: int = 1,
        *,
        timeout: float | None = None,
        on_error: str | None = None,
        cache: Any = None,
    ) -> Iterator[Any]:
        """Like :meth:`imap`, but yields each result as soon as it is ready."""
        __tracebackhide__ = True
        return self._imap(fn, iterable, chunksize, timeout, on_error, False, cache)

    def _imap(self, fn, iterable, chunksize, timeout, on_error, ordered, cache=None) -> Iterator[Any]:
        __tracebackhide__ = True
        on_error = self.on_error if on_error is None else check_on_error(on_error)
        self._check_open()
        chunksize = check_chunksize(chunksize)
        call = self._new_call(fn, timeout, Mode.ARG, cache=cache)
        return self._imap_results(call, iterable, chunksize, on_error, ordered)

    def _imap_results(self, call, iterable, chunksize, on_error, ordered) -> Iterator[Any]:
        __tracebackhide__ = True
        self.monitor.call_started(call.id, None)
        self._running[call.id], self._last_call = call, call.id
        live = view.watch(_watched(self, call, None), call.id, self.live)
        # an error of the input iterator is raised after the results of the
        # items before it, as the builtin map would reach it
        input_error: list[Exception] = []
        feed = _Feed(self, call, self._chunks(call, _until_error(iterable, input_error), chunksize),
                     2 * self.workers * chunksize)
        interrupted = False
        try:
            while True:
                feed.top_up()
                if feed.exhausted and feed.yielded >= feed.submitted:
                    if input_error:
                        raise input_error[0]
                    return
                for value, failed, output in self._ready(call, feed, ordered, live):
                    replay(output)
                    if failed and on_error == "raise":
                        raise value
                    yield value
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            self._cancel(call)
            raise
        finally:
            call.cancelled = True
            self._end_call(call, live, interrupted)

    def _ready(self, call: Call, feed: "_Feed", ordered: bool, live: view.Session | None) -> list[tuple]:
        """``(value, failed, output)`` of the results an imap may yield now
        (waiting a moment for one)."""
        __tracebackhide__ = True
        with call.cond:
            if ordered:
                ready = [feed.yielded] if feed.yielded in call.results else []
            else:
                ready = list(call.results)
            if not ready:
                call.cond.wait(_POLL)
        # every pass, not only when waiting: a slow consumer always finds a result ready
        self._between_waits(call, live)
        with call.cond:
            taken = [(call.results.pop(i), i in call.failed, call.output.pop(i, None)) for i in ready]
        feed.yielded += len(taken)
        return taken

    def cancel(self) -> None:
        """Stop the work under way, as a kernel interrupt does.

        A waiting ``map``, ``starmap``, ``imap`` or ``apply`` raises
        ``KeyboardInterrupt`` (what finished stays in ``pool.last_results``);
        submitted futures that have not started are cancelled, and those
        running end with a ``CancelledError``: their workers are killed and
        replaced.  The pool stays usable.  Any thread may
        call this; the live view's Cancel button does.
        """
        for call in list(self._running.values()):
            if isinstance(call, MapCall):  # map_async: nobody waits in it
                self._stop_map(call)
            elif call.future is None:
                self._interrupts.add(call.id)
                call.wake()  # its caller waits in map() or apply()
            else:
                _stop_submitted(self._engine, call)

    def timeline(self, call: int | None = None) -> "Timeline":
        """A picture of which worker ran which task when, failures marked.

        For the last ``map``/``starmap``/``imap`` of this pool, or for call
        number ``call`` (see ``pool.monitor.calls()``).  Shown as SVG in a
        notebook; its text form summarises the same.
        """
        from mpnb.timeline import Timeline

        if call is None:
            call = self._last_call
        if call is None:
            raise ValueError(
                "pool.timeline(): this pool has not run a map or imap yet; run one first, "
                "or pass call=<number> from pool.monitor.calls()"
            )
        return Timeline.from_monitor(self.monitor, call)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers once queued tasks are done (or dropped, with
        ``cancel_futures=True``).  With ``wait=True``, return when they have
        exited.  A pool cannot be used after this."""
        if not self._closed or cancel_futures:
            self._closed = True
            self._finalizer.detach()
            self._engine.shutdown(cancel_futures)
        if wait:
            self._wait_stopped()

    def _wait_stopped(self) -> None:
        engine = self._engine
        try:
            while not engine.stopped.wait(_POLL):
                pass
        except KeyboardInterrupt:
            engine.kill_now()
            raise

    def __exit__(self, exc_type, exc, tb):
        # as concurrent.futures does, not multiprocessing.Pool (whose exit
        # terminates): the work given is finished; but leaving by an error or
        # Ctrl-C must not wait for the queue
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


class _Feed:
    """An imap's input side: chunks submitted a bounded distance ahead of the results yielded."""

    def __init__(self, pool: Pool, call: Call, chunks: Iterator[tuple[int, Chunk]], ahead: int):
        self.pool, self.call, self.chunks, self.ahead = pool, call, chunks, ahead
        self.submitted = self.yielded = 0
        self.exhausted = False

    def top_up(self) -> None:
        while not self.exhausted and self.submitted - self.yielded < self.ahead:
            pair = next(self.chunks, None)
            if pair is None:
                self.exhausted = True
                self.pool.monitor.call_total(self.call.id, self.submitted)
                return
            self.submitted = pair[0]
            self.pool._send([pair])


def _stop_submitted(engine: backends.Engine, call: Call) -> None:
    """Stop a submitted task: one that has not started never will; one
    running ends with a ``CancelledError`` (stopped where the engine can)."""
    future = call.future
    if future is not None and not future.done():
        future.cancel()
        engine.cancel(call)


def _submitted_done(running: dict[int, Call], engine: backends.Engine, call: Call, future: Future) -> None:
    running.pop(call.id, None)
    if future.cancelled() and not call.cancelled:
        # cancelled by its owner while pending: the engine drops it now
        # (one that holds it elsewhere, a cluster, would still run it)
        engine.cancel(call)


def _cached(monitor: Any, call: Call, indices: list[int], values: list[Any], failed: list[int],
            output: dict) -> None:
    """Deliver results taken from the cache, counted apart from computed ones."""
    monitor.tasks_cached(call.id, len(indices))
    call.deliver(indices, values, failed, output)


def _watched(pool: Pool, call: Call, items: list | None) -> view.Watched:
    """What the live view of ``call`` needs from ``pool``; the pool only weakly."""
    owner = weakref.ref(pool)
    engine = pool._engine

    def label(call_id: int, index: int) -> str:
        if items is None or not 0 <= index < len(items):
            return f"task {index}"
        label = describe(call, index, items[index])
        return label.replace("task 0", "submitted task", 1) if call.future is not None else label

    def worker_traceback(call_id: int, index: int) -> str:
        with call.cond:
            exc = call.results.get(index) if index in call.failed else None
        cause = exc.__cause__ if isinstance(exc, BaseException) else None
        return "" if cause is None else str(cause).strip("\n")

    def cancel() -> None:
        alive = owner()
        if alive is not None:
            alive.cancel()

    return view.Watched(pool.monitor, pool.workers, engine.backend, engine.method,
                        label, worker_traceback, cancel, owner=pool)


# -------------------------------------------------------------------- helpers


def _until_error(iterable: Iterable, error: list[Exception]) -> Iterator[Any]:
    """The items of ``iterable`` up to an error, which is put in ``error``."""
    try:
        yield from iterable
    except Exception as exc:
        error.append(exc)


def cache_store(where: Any) -> Any:
    """The task cache's store that ``cache=`` names (:func:`mpnb.cache.open_store`).
    mpnb.cache (sqlite3, importlib.metadata: about 25 ms) is imported only
    when a cache is asked for, not by every pool."""
    if where is None or where is False:
        return None
    from mpnb import cache as task_cache

    return task_cache.open_store(where)
