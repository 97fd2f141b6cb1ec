"""Output captured per thread, for workers that run tasks on threads of a
process they share: a dask worker (:mod:`mpnb.backends._dask_worker`) and
the thread engine (:mod:`mpnb.backends.threads`).

:func:`install` puts a :class:`ThreadStream` in front of ``sys.stdout`` and
``sys.stderr`` (once; again if something put its own stream there since).
A thread that sets ``ThreadStream.local.segments`` to a list gets what it
writes appended there as ``(stream name, text)``, to be shown later in task
order; every other thread writes to the stream that was there before.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["ThreadStream", "install"]


class ThreadStream:
    """``sys.stdout``/``sys.stderr`` while tasks run on threads (see the module docstring)."""

    #: ``segments``: the list the current thread's writes go to, or None
    local = threading.local()

    def __init__(self, original: Any, name: str):
        self.original = original
        self.name = name

    def write(self, text: str) -> int:
        segments = getattr(self.local, "segments", None)
        if segments is None:
            return self.original.write(text)
        if text:
            segments.append((self.name, text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:  # through write: the original's own writelines would skip the capture
            self.write(line)

    def flush(self) -> None:
        if getattr(self.local, "segments", None) is None:
            self.original.flush()

    def __getattr__(self, name: str) -> Any:
        # everything else is the original's (ipykernel's set_parent, encoding, fileno)
        return getattr(self.original, name)


_lock = threading.Lock()


def install() -> Any:
    """Capture per thread from now on; returns the thread-local whose
    ``segments`` a task's thread sets."""
    with _lock:
        if not isinstance(sys.stdout, ThreadStream):
            sys.stdout = ThreadStream(sys.stdout, "stdout")
        if not isinstance(sys.stderr, ThreadStream):
            sys.stderr = ThreadStream(sys.stderr, "stderr")
    return ThreadStream.local
