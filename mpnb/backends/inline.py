"""The inline engine: a pool inside a worker runs its tasks in that worker's process.

A pool created in a worker at the nesting limit (``MPNB_MAX_DEPTH``, see
:mod:`mpnb.limits`) must not start processes of its own, or nested pools
would multiply them.  Its tasks run one after the other on a thread of this
process, so nothing is pickled and the pool's methods behave as on the other
engines: ``submit`` returns at once, a future is pending until its task
starts and running while it runs, and cancel and timeouts follow the same
rules.  A thread cannot be stopped: a task that is cancelled or times out
fails at once for its caller, its thread runs on until the task returns, its
result is dropped, and the next task starts on a new thread (as on dask).
What tasks print goes straight to this process's streams.
"""

from __future__ import annotations

import os
import threading
import time
from queue import Empty
from typing import Any, Callable, Iterable, Iterator

from mpnb import errors
from mpnb.backends.base import EngineBase
from mpnb.calls import Call, Chunk, arguments, describe
from mpnb.monitor import Monitor

__all__ = ["InlineEngine"]

# how often the engine looks at timeouts while a task runs
_TICK = 0.05


class _Running:
    """The chunk a runner thread works on."""

    __slots__ = ("chunk", "started", "abandoned", "done", "lock")

    def __init__(self, chunk: Chunk):
        self.chunk = chunk
        self.started = time.monotonic()  # of the task running now (set by the runner)
        self.abandoned = False  # cancelled or timed out: what it still returns is dropped
        self.done = 0  # tasks delivered
        self.lock = threading.Lock()


class _Ended:
    """A runner thread finished its chunk."""

    __slots__ = ("running",)

    def __init__(self, running: _Running):
        self.running = running


class InlineEngine(EngineBase):
    """Runs chunks one at a time on a thread of this process (see the module docstring)."""

    backend = "inline"
    in_process = True

    def __init__(self, workers: int, initializer: Callable[..., Any] | None, initargs: tuple):
        super().__init__("mpnb-inline-engine", Monitor(), workers)
        if initializer is not None:
            initializer(*initargs)
        self.queue: list[Chunk] = []
        self.current: _Running | None = None
        self.start()

    # -- the loop

    def _loop(self) -> None:
        while not (self.stopping and self.current is None and not self.queue):
            timeout = _TICK if self.current is not None and self.current.chunk.call.timeout else None
            try:
                message = self.inbox.get(timeout=timeout)
            except Empty:  # time to look at the timeout
                message = None
            if isinstance(message, _Ended):
                self._on_ended(message.running)
            elif message is not None:
                self._take(message)
            self._check_timeout()
            self._start_next()

    def _start_next(self) -> None:
        while self.current is None and self.queue:
            chunk = self.queue.pop(0)
            call = chunk.call
            if call.cancelled:
                self._drop(chunk)
                continue
            if call.future is not None and not call.future.set_running_or_notify_cancel():
                continue  # cancelled by its owner before it started: it never runs
            self.current = running = _Running(chunk)
            threading.Thread(target=self._run, args=(running,), name="mpnb-inline-task", daemon=True).start()

    def _run(self, running: _Running) -> None:
        """A runner thread: the chunk's tasks, each outcome delivered as it ends."""
        chunk = running.chunk
        call = chunk.call
        fn = call.fn
        assert fn is not None, "an in-process engine's calls keep their function"
        for index, item in zip(chunk.indices, chunk.items):
            args, kwargs = arguments(call.mode, item)
            running.started = started = time.monotonic()
            failures = {}
            try:
                value = fn(*args, **kwargs)
            except Exception as exc:  # as in a worker; an exit or Ctrl-C goes on up
                value = errors.note(exc, describe(call, index, item))
                failures[index] = f"{type(exc).__name__}: {exc}"
            with running.lock:
                if running.abandoned:
                    break
                self.monitor.tasks_ended(0, os.getpid(), call.id, [index], [started], time.monotonic(), failures)
                call.deliver([index], [value], failures, {})
                running.done += 1
        self.inbox.put(_Ended(running))

    def _on_ended(self, running: _Running) -> None:
        if running is self.current:
            self.current = None

    def _check_timeout(self) -> None:
        running = self.current
        timeout = running.chunk.call.timeout if running is not None else None
        if running is None or timeout is None:
            return
        seconds = time.monotonic() - running.started
        if seconds > timeout:
            self._abandon(running, lambda where: errors.timeout_error(
                where, seconds, timeout, "a thread cannot be stopped, so it goes on until the task returns, "
                "and its result is dropped"))

    def _abandon(self, running: _Running, make_error: Callable[[str], BaseException]) -> None:
        """Fail the running chunk's tasks that have not ended; its thread's
        later outcomes are dropped."""
        with running.lock:
            running.abandoned = True
            first = running.done
        self.current = None
        self._fail(running.chunk, range(first, len(running.chunk.indices)), make_error, " in this process",
                   (0, os.getpid()))

    # -- commands

    def _on_submit(self, chunks: list[Chunk]) -> None:
        self.queue.extend(chunks)

    def _on_cancel(self, call: Call, done: threading.Event) -> None:
        for chunk in [c for c in self.queue if c.call is call]:
            self._drop(chunk)
        self.queue = [c for c in self.queue if c.call is not call]
        if self.current is not None and self.current.chunk.call is call:
            self._abandon(self.current, errors.cancelled)
        done.set()

    def _on_shutdown(self, cancel_pending: bool) -> None:
        if not cancel_pending:
            return
        queue, self.queue = self.queue, []
        for chunk in queue:
            future = chunk.call.future
            if future is None or not future.cancel():
                self._fail(chunk, range(len(chunk.indices)), lambda where: errors.cancelled(
                    where, ": the pool was shut down"))

    def _held(self) -> Iterator[tuple[Chunk, Iterable[int]]]:
        queue, self.queue = self.queue, []
        for chunk in queue:
            yield chunk, range(len(chunk.indices))
        running = self.current
        if running is not None:
            with running.lock:
                running.abandoned = True
                first = running.done
            yield running.chunk, range(first, len(running.chunk.indices))
            self.current = None
