"""The subinterpreter engine: ``mpnb.Pool(backend="interpreters")`` runs tasks
in subinterpreters of this process (:mod:`concurrent.interpreters`, Python
3.14 and later), each with its own GIL, so CPU-bound Python code runs in
parallel without a process to start.

Each slot runs one chunk at a time on a thread of its own
(:class:`~mpnb.backends.inline.InProcessEngine`, shared with the thread
engine), and that thread makes a subinterpreter of its own, once, for the
chunks it runs (the pool's initializer runs there then).  The function and
the items travel as the other engines' do, pickled (``in_process`` is False:
a cell's functions need ``%%mppool``, a subinterpreter has a ``__main__`` of
its own), but as ``bytes``, which a subinterpreter reads without a copy; the
chunk runs there with the same pieces as every worker
(:mod:`mpnb._interp_worker`), output captured per task, and its
record comes back as bytes.

What a subinterpreter cannot do sets its limits (the README says them):
extension modules that refuse subinterpreters (numpy, today) cannot be
imported there; a task cannot be stopped, so a task that is cancelled or
times out fails at once in the notebook while its thread and subinterpreter
run on until it returns (a new one takes the slot); a crash in native code
ends this process.  Calls with a timeout run one task per chunk, so that
each task is timed.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from typing import Any, Callable

from mpnb import limits, serialize
from mpnb._protocol import Record
from mpnb._task import load_failure, loads
from mpnb.backends.inline import InProcessEngine, _Ended, _Running
from mpnb.calls import Chunk, dump_items, read_record

__all__ = ["InterpreterEngine", "available"]


def available() -> str | None:
    """None where subinterpreters can run tasks; else why not, and the fix."""
    if sys.version_info < (3, 14):
        return (f"backend='interpreters' needs Python 3.14 or later (concurrent.interpreters); "
                f"this is {sys.version.split()[0]}. Use backend='local' (processes) or 'threads'.")
    try:
        importlib.import_module("concurrent.interpreters")
    except ImportError as exc:
        return f"backend='interpreters': this Python has no subinterpreters ({exc}). Use backend='local'."
    return None


class InterpreterEngine(InProcessEngine):
    """``size`` tasks at once, in subinterpreters of this process (see the module docstring)."""

    backend = "interpreters"
    method = "subinterpreters"
    in_process = False  # the pool pickles the function and the items: they enter as bytes
    rows = True

    def __init__(self, workers: int | None, initializer: Callable[..., Any] | None, initargs: tuple):
        size = limits.resolve_workers(workers)
        #: the pickled (initializer, initargs), run in each subinterpreter as it is made
        self.init_data = serialize.dumps((initializer, initargs)) if initializer is not None else None
        self._here = threading.local()  # .interp: the subinterpreter of the slot thread that runs
        super().__init__("mpnb-interpreters", size, size, None, ())
        self.start()

    # -- the engine's thread

    def _on_submit(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            if chunk.call.timeout is not None and len(chunk.indices) > 1:
                # each task times out on its own: one task a chunk
                self.queue.extend(chunk.rest([position]) for position in range(len(chunk.indices)))
            else:
                self.queue.append(chunk)

    # -- a slot's thread

    def _serve(self, work: Any) -> None:
        try:
            super()._serve(work)
        finally:
            interp = getattr(self._here, "interp", None)
            if interp is not None:
                self._here.interp = None
                interp.close()

    def _interpreter(self) -> Any:
        """This slot thread's subinterpreter, made (and initialized) on first use."""
        interp = getattr(self._here, "interp", None)
        if interp is None:
            from mpnb import _interp_worker

            interp = importlib.import_module("concurrent.interpreters").create()
            if self.init_data is not None:
                try:
                    interp.call(_interp_worker.initialize, self.init_data)
                except BaseException:
                    interp.close()
                    raise
            self._here.interp = interp
        return interp

    def _run(self, running: _Running) -> None:
        """A slot's thread: the chunk, in one call into the slot's subinterpreter."""
        chunk = running.chunk
        call = chunk.call
        count = len(chunk.indices)
        try:
            running.position, running.started = 0, time.monotonic()
            try:
                from mpnb import _interp_worker

                if chunk.data is None:  # a task of a chunk split for its timeout
                    chunk.data = dump_items(chunk.items)
                data = self._interpreter().call(_interp_worker.run_chunk, count, call.fn_bytes, chunk.data,
                                                int(call.mode))
                record = Record._make(loads(data))
            except BaseException as exc:  # the subinterpreter could not be made, or set up (the initializer)
                record = load_failure(0, count, _not_run(exc))
            outcomes = read_record(chunk, record, f"in subinterpreter {running.slot} (pid {os.getpid()})")
            for index in outcomes.failed:
                _explain(outcomes.values[outcomes.indices.index(index)])
            with running.lock:
                if running.abandoned:
                    return
                self.monitor.tasks_ended(running.slot, os.getpid(), call.id, outcomes.indices, record.starts,
                                         record.end, outcomes.errors)
                call.deliver(outcomes.indices, outcomes.values, outcomes.failed, outcomes.output)
                running.done = count
        finally:  # whatever happened, the slot is freed
            self.inbox.put(_Ended(running))


def _explain(error: BaseException) -> None:
    """Note on a task's error what a subinterpreter could not load, and the fix."""
    from mpnb.diagnostics import subinterpreter_import

    note = subinterpreter_import(f"{error} {error.__cause__ or ''}", "mpnb.Pool(backend='interpreters')")
    if note is not None:
        error.add_note(note)


def _not_run(exc: BaseException) -> BaseException:
    """What a chunk fails with when its subinterpreter could not run it."""
    error = RuntimeError(f"its subinterpreter could not be made or set up: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
