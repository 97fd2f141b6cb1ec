"""The engine contract, and what every engine does the same way.

An engine runs a pool's chunks somewhere (worker processes on this machine,
a dask cluster, this very process) and delivers each task's outcome into its
call.  :class:`mpnb.Pool` talks to engines only through :class:`Engine`.

:class:`EngineBase` is the shared part of the engines that run a thread of
their own: the commands reach that thread through one inbox; the thread
delivers outcomes, fails chunk positions with errors that name their tasks,
fails everything it holds if it breaks (so nobody waits forever), answers
work that arrives after it stopped, and is listed in the registry of live
engines that ``%mpstatus`` and interpreter exit read.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from mpnb.calls import Call, Chunk, task_errors
from mpnb import errors, exits
from mpnb.errors import broken, not_run
from mpnb.monitor import Monitor

__all__ = ["Engine", "EngineBase", "kill_all", "live_engines"]

# how often a thread waiting for engines to stop looks for Ctrl-C
_POLL = 0.05


class Engine(Protocol):
    """What a pool needs of an engine.

    ``submit``, ``cancel``, ``shutdown`` and ``kill_now`` may be called from
    any thread and never block.  Outcomes reach the calls through
    :meth:`mpnb.calls.Call.deliver`; an engine delivers an outcome for every
    position of every chunk it was given, whatever happens (a failure, a
    cancellation, its own end), so that no caller waits forever.
    """

    #: events and worker rows for views, ``%mpstatus`` and ``pool.timeline()``
    monitor: Monitor
    #: how many tasks it runs at once
    size: int
    #: labels for views and reprs: the engine's name and how its workers start
    backend: str
    method: str
    #: a dask scheduler's address, else None
    address: str | None
    #: large numpy arguments may travel as files in shared memory (same machine)
    shares_memory: bool
    #: tasks get the very objects, in this process: nothing needs pickling (the
    #: interpreters engine runs tasks in this process too, but in subinterpreters,
    #: which share no objects: it pickles, as a process engine does)
    in_process: bool
    #: set once the engine has ended; ``error`` says why, if it broke
    stopped: threading.Event
    error: BaseException | None

    def submit(self, chunks: list[Chunk]) -> None:
        """Run these chunks (of one call or several)."""

    def cancel(self, call: Call) -> threading.Event:
        """Stop ``call``: its queued tasks never run and its running ones are
        stopped where the engine can stop them; each ends with a
        ``CancelledError``.  The event is set once its running tasks ended."""

    def shutdown(self, cancel_pending: bool) -> None:
        """End once the work given so far is done, or at once for the work not
        started yet (``cancel_pending``); ``stopped`` is set at the end."""

    def kill_now(self) -> None:
        """Interpreter exit: stop everything at once, waiting for nothing."""

    def worker_pids(self) -> list[int]:
        """Processes on this machine that this engine started and owns."""

    def tiny(self, call: Call, n: int) -> bool:
        """Whether ``n`` tasks of ``call`` are so little work all together
        that they are best sent as one chunk (the pool's automatic chunking
        asks)."""

    def pace(self, call: Call) -> float | None:
        """The seconds a task of ``call``'s function took lately, if known:
        the pool's automatic chunks near a map's end are sized by it."""


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class Submit:
    chunks: list[Chunk]


@dataclass(frozen=True)
class Cancel:
    call: Call
    done: threading.Event


@dataclass(frozen=True)
class Shutdown:
    cancel_pending: bool


class EngineBase(threading.Thread):
    """An engine that decides in one thread of its own (see the module docstring).

    A subclass implements :meth:`_loop` (until ``stopping`` and nothing is
    held), :meth:`_on_submit`, :meth:`_on_cancel`, :meth:`_on_shutdown`,
    :meth:`_held` (the positions not yet delivered) and :meth:`_close`; and
    :meth:`_wake` if its loop sleeps on something else than the inbox.
    """

    backend = ""
    method = ""
    address: str | None = None
    shares_memory = False
    in_process = False

    def __init__(self, name: str, monitor: Monitor, size: int):
        super().__init__(name=name, daemon=True)
        self.monitor = monitor
        self.size = size
        self.inbox: SimpleQueue = SimpleQueue()
        self.stopping = False
        self.stopped = threading.Event()
        self.error: BaseException | None = None

    # -- the contract, from any thread

    def start(self) -> None:
        _register(self)
        super().start()

    def submit(self, chunks: list[Chunk]) -> None:
        self._post(Submit(chunks))

    def cancel(self, call: Call) -> threading.Event:
        done = threading.Event()
        self._post(Cancel(call, done))
        return done

    def shutdown(self, cancel_pending: bool) -> None:
        self._post(Shutdown(cancel_pending))

    def kill_now(self) -> None:
        self.shutdown(True)

    def worker_pids(self) -> list[int]:
        return []

    def tiny(self, call: Call, n: int) -> bool:
        return False

    def pace(self, call: Call) -> float | None:
        return None

    def _post(self, message: Any) -> None:
        self.inbox.put(message)
        if self.stopped.is_set():  # nobody will read it: answer it here
            self._refuse_after_stop()
            return
        self._wake()

    def _wake(self) -> None:
        """Wake the loop to read the inbox (it sleeps on the inbox itself by default)."""

    # -- the thread

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            self.error = exc
            traceback.print_exc(file=sys.__stderr__)
            self._fail_everything(f"the mpnb pool stopped working: {exc!r}")
        finally:
            try:
                self._close()
            finally:  # whatever happened, nobody may wait on this engine forever
                self.stopped.set()
                self._refuse_after_stop()

    def _loop(self) -> None:
        raise NotImplementedError

    def _take(self, message: Any) -> None:
        """Act on one message of the inbox."""
        if isinstance(message, Submit):
            self._on_submit(message.chunks)
        elif isinstance(message, Cancel):
            message.call.cancelled = True
            self._on_cancel(message.call, message.done)
        elif isinstance(message, Shutdown):
            self.stopping = True
            self._on_shutdown(message.cancel_pending)
        else:
            self._on_message(message)

    def _take_waiting(self) -> None:
        """Act on every message in the inbox now (its one reader: no other
        takes a message between ``empty`` and ``get``; an empty inbox, the
        usual case, costs no exception)."""
        inbox = self.inbox
        while not inbox.empty():
            self._take(inbox.get_nowait())

    def _on_submit(self, chunks: list[Chunk]) -> None:
        raise NotImplementedError

    def _on_cancel(self, call: Call, done: threading.Event) -> None:
        raise NotImplementedError

    def _on_shutdown(self, cancel_pending: bool) -> None:
        raise NotImplementedError

    def _on_message(self, message: Any) -> None:
        raise TypeError(f"{type(self).__name__} got an unknown message {message!r}")

    def _held(self) -> Iterator[tuple[Chunk, Iterable[int]]]:
        """Every chunk given and not finished, with its positions not yet delivered."""
        raise NotImplementedError

    def _close(self) -> None:
        """Let go of what the engine holds (workers, connections); once, at the end."""

    # -- delivering failures

    def _fail(self, chunk: Chunk, positions: Iterable[int], make_error: Callable[[str], BaseException],
              place: str = "", worker: Any = None) -> None:
        """Fail the tasks of ``chunk`` at ``positions`` with ``make_error(task)``;
        ``place`` says where they ran, ``worker`` which worker ran them, for
        the monitor (None when they never started)."""
        indices, values, errors = task_errors(chunk, positions, make_error, place)
        if not indices:
            return
        if worker is not None:
            self._record_failures(chunk, indices, errors, worker)
        chunk.call.deliver(indices, values, indices, {})

    def _record_failures(self, chunk: Chunk, indices: Sequence[int], errors: dict[int, str], worker: Any) -> None:
        """Tell the monitor that these tasks ended with these errors on
        ``worker``, here a ``(worker id, pid)`` pair."""
        now = time.monotonic()
        self.monitor.tasks_ended(worker[0], worker[1], chunk.call.id, indices, [now] * len(indices), now, errors)

    def _drop(self, chunk: Chunk) -> None:
        """A chunk of a cancelled call that has not started: it never runs,
        and each of its tasks ends with a ``CancelledError`` (a future
        cancelled by its owner keeps that state)."""
        self._fail(chunk, range(len(chunk.indices)), errors.cancelled)

    def _fail_everything(self, why: str) -> None:
        """The engine broke: every task it holds fails, and so does all later work."""
        try:
            for chunk, positions in list(self._held()):
                self._fail(chunk, positions, broken(why))
        except BaseException:  # the state may be what broke: the inbox still gets answered
            traceback.print_exc(file=sys.__stderr__)

    def _refuse_after_stop(self) -> None:
        """Answer the commands that arrived after the loop ended: their work
        fails at once, so nobody waits on an engine that no longer runs."""
        why = f"the pool's engine stopped ({self.error!r})" if self.error else "the pool was shut down"
        while True:
            try:
                message = self.inbox.get_nowait()
            except Empty:
                return
            if isinstance(message, Submit):
                for chunk in message.chunks:
                    self._fail(chunk, range(len(chunk.indices)), not_run(why))
            elif isinstance(message, Cancel):
                message.done.set()




# ---------------------------------------------------------------- registry

_live: "weakref.WeakSet[Any]" = weakref.WeakSet()
_atexit_registered = False


def live_engines() -> list[Any]:
    """The engines of this process that have not stopped."""
    return [engine for engine in list(_live) if not engine.stopped.is_set()]


def _register(engine: Any) -> None:
    global _atexit_registered
    _live.add(engine)
    if not _atexit_registered:
        # registered after multiprocessing's own handler, so it runs first and
        # that handler's join() of our (killed) workers returns at once
        exits.at_exit(kill_all)
        exits.before_threads_join(_finish_at_exit)
        _atexit_registered = True


def kill_all() -> None:
    """Kill every engine of this process and wait (2 s at most each) for it
    to stop: at exit, and when a kernel shuts down (:mod:`mpnb.shutdown`)."""
    engines = list(_live)
    for engine in engines:
        engine.kill_now()
    for engine in engines:
        engine.stopped.wait(2.0)


def _finish_at_exit() -> None:
    """At interpreter exit, before threads are joined: in a script, let the
    engines finish the work already submitted, as ``concurrent.futures`` does
    (Ctrl-C while waiting stops it); in a kernel, which exits to shut down or
    restart, stop everything at once."""
    if _in_kernel():
        kill_all()
        return
    engines = list(_live)
    for engine in engines:
        engine.shutdown(False)
    try:
        for engine in engines:
            while not engine.stopped.wait(_POLL):
                pass
    except KeyboardInterrupt:
        kill_all()


def _in_kernel() -> bool:
    """True in a running IPython kernel (not in a script that imported ipykernel)."""
    for module, name in (("ipykernel.kernelapp", "IPKernelApp"), ("ipykernel.zmqshell", "ZMQInteractiveShell")):
        cls = getattr(sys.modules.get(module), name, None)
        try:
            if cls is not None and cls.initialized():
                return True
        except Exception:  # an ipykernel that differs: judge by the other one
            continue
    return False
