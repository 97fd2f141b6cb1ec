"""The inline engine: a pool inside a worker runs its tasks here, one after the other.

A pool created in a worker at the nesting limit (``MPNB_MAX_DEPTH``, see
:mod:`mpnb.limits`) must not start processes of its own, or nested pools
would multiply them.  It runs each chunk in the calling thread when it is
submitted, so the pool's methods behave as they do elsewhere (results,
``on_error``, futures, cancel) without a process or a pickle.  What tasks
print goes straight to this process's streams; there are no timeouts: a
task cannot be stopped in the thread that runs it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from mpnb.calls import Call, Chunk, arguments, describe
from mpnb.errors import note
from mpnb.monitor import Monitor

__all__ = ["InlineEngine"]


class InlineEngine:
    """Runs chunks in the thread that submits them (see the module docstring)."""

    backend = "inline"
    method = ""
    address: str | None = None
    shares_memory = False
    in_process = True

    def __init__(self, size: int, initializer: Callable[..., Any] | None, initargs: tuple):
        self.monitor = Monitor()
        self.size = size
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        if initializer is not None:
            initializer(*initargs)

    def submit(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            call = chunk.call
            if call.cancelled or self.stopped.is_set():
                self._cancel_chunk(chunk)
            elif call.future is None or call.future.set_running_or_notify_cancel():
                self._run(chunk)

    def _run(self, chunk: Chunk) -> None:
        call = chunk.call
        values: list[Any] = []
        failed, errors = [], {}
        starts = []
        for index, item in zip(chunk.indices, chunk.items):
            args, kwargs = arguments(call.mode, item)
            starts.append(time.monotonic())
            try:
                values.append(call.fn(*args, **kwargs))
            except Exception as exc:  # as in a worker; Ctrl-C and exit go on up
                values.append(note(exc, describe(call, index, item)))
                failed.append(index)
                errors[index] = f"{type(exc).__name__}: {exc}"
        self.monitor.tasks_ended(0, os.getpid(), call.id, chunk.indices, starts, time.monotonic(), errors)
        call.deliver(chunk.indices, values, failed, {})

    def _cancel_chunk(self, chunk: Chunk) -> None:
        from mpnb.errors import cancelled

        if chunk.call.future is not None and chunk.call.future.cancel():
            return
        values = [cancelled(describe(chunk.call, i, item)) for i, item in zip(chunk.indices, chunk.items)]
        chunk.call.deliver(chunk.indices, values, chunk.indices, {})

    def cancel(self, call: Call) -> threading.Event:
        call.cancelled = True  # nothing runs in the background: only later chunks see it
        done = threading.Event()
        done.set()
        return done

    def shutdown(self, cancel_pending: bool) -> None:
        self.stopped.set()

    def kill_now(self) -> None:
        self.stopped.set()

    def worker_pids(self) -> list[int]:
        return []
