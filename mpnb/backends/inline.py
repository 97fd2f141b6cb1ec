"""Engines whose tasks run on threads of this process: the inline engine, and
the base it shares with the thread engine (:mod:`mpnb.backends.threads`).

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

:class:`InProcessEngine` is that machinery for any number of slots: each
slot runs one chunk at a time on a thread of its own, which serves the
slot's chunks until one of them is abandoned (cancelled or timed out): the
slot then gets a new thread, and the old one ends when its task returns.
"""

from __future__ import annotations

import os
import threading
import time
from queue import Empty, SimpleQueue
from typing import Any, Callable, Iterable, Iterator

from mpnb import errors
from mpnb.backends.base import EngineBase
from mpnb.calls import Call, Chunk, arguments, describe
from mpnb.monitor import Monitor

__all__ = ["InProcessEngine", "InlineEngine"]

# how often the engine looks at timeouts while a task runs
_TICK = 0.05
# how long shutdown waits for the thread of a chunk that ended to return
_JOIN = 5.0


class _Running:
    """The chunk a runner thread works on, in slot ``slot``."""

    __slots__ = ("chunk", "slot", "position", "started", "abandoned", "done", "lock")

    def __init__(self, chunk: Chunk, slot: int):
        self.chunk = chunk
        self.slot = slot
        self.position = 0  # of the task running now (set by the runner)
        self.started = time.monotonic()  # of the task running now (set by the runner)
        self.abandoned = False  # cancelled or timed out: what it still returns is dropped
        self.done = 0  # tasks delivered
        self.lock = threading.Lock()


class _Runner:
    """A slot's thread and the chunks given to it (None: end)."""

    __slots__ = ("thread", "work")

    def __init__(self, engine: "InProcessEngine", slot: int):
        self.work: SimpleQueue = SimpleQueue()
        self.thread = threading.Thread(target=engine._serve, args=(self.work,),
                                       name=f"{engine.name}-task-{slot}", daemon=True)
        self.thread.start()


class _Ended:
    """A runner thread finished its chunk."""

    __slots__ = ("running",)

    def __init__(self, running: _Running):
        self.running = running


class InProcessEngine(EngineBase):
    """Runs chunks on threads of this process, ``slots`` chunks at a time,
    a thread per slot (see the module docstring).

    A subclass may name its slots as worker rows of the monitor (``rows``),
    catch more than ``Exception`` in a task (``catches``) and wrap each
    task's call (:meth:`_call`), to capture its output."""

    in_process = True
    #: what a task may raise and still be its own failure; the rest goes on up
    catches: type[BaseException] = Exception
    #: each slot is a worker row of the monitor (the live view's table)
    rows = False

    def __init__(self, name: str, size: int, slots: int,
                 initializer: Callable[..., Any] | None, initargs: tuple):
        super().__init__(name, Monitor(), size)
        if initializer is not None:
            initializer(*initargs)
        self.slots = slots
        self.queue: list[Chunk] = []
        self.running: dict[int, _Running] = {}  # by slot
        self.runners: dict[int, _Runner] = {}  # by slot, started as needed
        if self.rows:
            now, pid = time.monotonic(), os.getpid()
            for slot in range(slots):
                self.monitor.worker_starting(slot, pid, self._current(slot))
                self.monitor.worker_started(slot, pid, now)

    def _current(self, slot: int) -> Callable[[], tuple[int, int, float]]:
        """What slot ``slot`` runs now, for the monitor: ``(chunk seq, position, start)``."""
        def current() -> tuple[int, int, float]:
            running = self.running.get(slot)
            if running is None:
                return -1, -1, 0.0
            return running.chunk.seq, running.position, running.started
        return current

    # -- the loop

    def _loop(self) -> None:
        while not (self.stopping and not self.running and not self.queue):
            timed = any(r.chunk.call.timeout for r in self.running.values())
            try:
                message = self.inbox.get(timeout=_TICK if timed else None)
            except Empty:  # time to look at the timeouts
                message = None
            if isinstance(message, _Ended):
                self._on_ended(message.running)
            elif message is not None:
                self._take(message)
            for running in list(self.running.values()):
                self._check_timeout(running)
            self._start_next()

    def _start_next(self) -> None:
        while len(self.running) < self.slots and self.queue:
            chunk = self.queue.pop(0)
            call = chunk.call
            if call.cancelled:
                self._drop(chunk)
                continue
            if call.future is not None and not call.future.set_running_or_notify_cancel():
                continue  # cancelled by its owner before it started: it never runs
            slot = min(set(range(self.slots)) - set(self.running))
            self.running[slot] = running = _Running(chunk, slot)
            if self.rows:
                self.monitor.chunk_sent(slot, chunk.seq, call.id, chunk.indices, running.started)
            runner = self.runners.get(slot)
            if runner is None:
                runner = self.runners[slot] = _Runner(self, slot)
            runner.work.put(running)

    def _serve(self, work: SimpleQueue) -> None:
        """A slot's thread: its chunks, until told to end or its chunk is
        abandoned (the slot has another thread by then)."""
        while True:
            running = work.get()
            if running is None:
                return
            self._run(running)
            if running.abandoned:
                return

    def _run(self, running: _Running) -> None:
        """A runner thread: the chunk's tasks, each outcome delivered as it ends."""
        chunk = running.chunk
        call = chunk.call
        fn = call.fn
        assert fn is not None, "an in-process engine's calls keep their function"
        pid = os.getpid()
        try:
            for position, (index, item) in enumerate(zip(chunk.indices, chunk.items)):
                running.position, running.started = position, time.monotonic()
                started = running.started
                value, failures, output = self._call(fn, call, index, item)
                with running.lock:
                    if running.abandoned:
                        break
                    self.monitor.tasks_ended(running.slot if self.rows else 0, pid, call.id, [index], [started],
                                             time.monotonic(), failures)
                    call.deliver([index], [value], failures, output)
                    running.done += 1
        finally:  # whatever the task raised, the slot is freed
            self.inbox.put(_Ended(running))

    def _call(self, fn: Callable, call: Call, index: int, item: Any) -> tuple[Any, dict[int, str], dict[int, list]]:
        """Task ``index`` of ``call``: its value (or its exception, noted with
        the task), its failure by index, its output by index."""
        args, kwargs = arguments(call.mode, item)
        try:
            return fn(*args, **kwargs), {}, {}
        except self.catches as exc:  # as in a worker
            return errors.note(exc, describe(call, index, item)), {index: f"{type(exc).__name__}: {exc}"}, {}

    def _on_ended(self, running: _Running) -> None:
        if self.running.get(running.slot) is running:
            self._free(running)
            if running.done == len(running.chunk.indices):
                return
            # a task raised what is not its own failure (SystemExit) and ended
            # the slot's thread: the chunk's tasks from it on fail, so nobody
            # waits for them, and the slot's next chunk gets a new thread
            self._retire(running.slot)
            self._fail(running.chunk, range(running.done, len(running.chunk.indices)), errors.broken(
                "its thread ended without finishing the task (it raised an exception that is not "
                "the task's failure, such as SystemExit)"))

    def _retire(self, slot: int) -> None:
        """The slot's thread serves no more chunks: it ends once its task
        returns (or at once, if it has just finished its chunk)."""
        runner = self.runners.pop(slot, None)
        if runner is not None:
            runner.work.put(None)

    def _free(self, running: _Running) -> None:
        del self.running[running.slot]
        if self.rows:
            self.monitor.chunk_ended(running.slot, running.chunk.seq)

    def _check_timeout(self, running: _Running) -> None:
        timeout = running.chunk.call.timeout
        if timeout is None:
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
        self._free(running)
        self._retire(running.slot)  # its thread runs on; the slot's next chunk gets a new one
        self._fail(running.chunk, range(first, len(running.chunk.indices)), make_error, " in this process",
                   (running.slot if self.rows else 0, os.getpid()))

    # -- commands

    def _on_submit(self, chunks: list[Chunk]) -> None:
        self.queue.extend(chunks)

    def _on_cancel(self, call: Call, done: threading.Event) -> None:
        for chunk in [c for c in self.queue if c.call is call]:
            self._drop(chunk)
        self.queue = [c for c in self.queue if c.call is not call]
        for running in [r for r in self.running.values() if r.chunk.call is call]:
            self._abandon(running, errors.cancelled)
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
        for running in list(self.running.values()):
            with running.lock:
                running.abandoned = True
                first = running.done
            yield running.chunk, range(first, len(running.chunk.indices))
            self._retire(running.slot)  # its thread runs on: nobody waits for it
        self.running.clear()

    def _close(self) -> None:
        # the slots' threads end with the engine (those of abandoned tasks
        # run on until their task returns)
        runners, self.runners = list(self.runners.values()), {}
        for runner in runners:
            runner.work.put(None)
        for runner in runners:
            runner.thread.join(_JOIN)
        if self.rows:
            for slot in range(self.slots):
                self.monitor.worker_stopped(slot, os.getpid(), None, "stopped")


class InlineEngine(InProcessEngine):
    """Runs chunks one at a time on a thread of this process (see the module docstring)."""

    backend = "inline"

    def __init__(self, workers: int, initializer: Callable[..., Any] | None, initargs: tuple):
        super().__init__("mpnb-inline-engine", workers, 1, initializer, initargs)
        self.start()
