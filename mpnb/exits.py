"""Exit hooks and finalizers that run only in the process that made them.

A process forked from this one (a fork ``multiprocessing.Pool`` or
``Process``, a PyTorch DataLoader worker, a library's ``os.fork()``) is a
copy that inherits every hook: ``atexit``'s, ``threading``'s (run before
threads are joined), each ``weakref.finalize`` still alive, the SIGTERM
handler.  Run there, mpnb's would wait for engine threads the fork did not
copy (the copy never ends), kill this process's workers and spares, and
remove its pool directories, shared arrays and cell modules.  Every hook mpnb
registers goes through here, and does nothing in any process but its own.
"""

from __future__ import annotations

import atexit
import functools
import os
import weakref
from typing import Any, Callable


def here_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, run only when called in the process calling this; elsewhere nothing."""
    owner = os.getpid()

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() == owner:
            return fn(*args, **kwargs)
        return None

    return run


def at_exit(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``fn(*args, **kwargs)`` at this process's exit, as ``atexit`` runs it."""
    atexit.register(here_only(fn), *args, **kwargs)


def before_threads_join(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``fn(*args, **kwargs)`` at this process's exit, before ``threading``
    joins its threads and before ``atexit`` runs, while the engines' threads
    still work (``concurrent.futures`` waits for its own work the same way).
    Nothing once the interpreter is already exiting."""
    import threading  # here: a worker that loads a shared array imports this module, not threading

    try:
        threading._register_atexit(here_only(fn), *args, **kwargs)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # interpreter already exiting
        pass


def finalize(obj: Any, fn: Callable[..., Any], *args: Any) -> weakref.finalize:
    """``weakref.finalize(obj, fn, *args)``: when ``obj`` is collected or at
    exit, in this process only."""
    return weakref.finalize(obj, here_only(fn), *args)
