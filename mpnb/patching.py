"""``mpnb.patch()``: the stdlib's pool names create ``mpnb.Pool``s.

Existing notebook code that calls ``multiprocessing.Pool(...)``,
``multiprocessing.get_context(method).Pool(...)`` or
``concurrent.futures.ProcessPoolExecutor(...)`` then gets an :class:`mpnb.Pool`
built from the same arguments, with mpnb's timeouts, crash reports, Ctrl-C and
live view, without an edit::

    name looked up after patch()                  what it returns
    ---------------------------------------------  -------------------------------
    multiprocessing.Pool(4, init, args, 10)        mpnb.Pool(workers=4, initializer=init,
    multiprocessing.get_context("spawn").Pool(4)    ..., context="spawn")
    concurrent.futures.ProcessPoolExecutor(4, ctx)  mpnb.Pool(workers=4, context=<ctx's method>)

Only calls of those three names are redirected.  The classes themselves are
left alone: ``multiprocessing.pool.Pool`` and
``concurrent.futures.process.ProcessPoolExecutor`` still build real stdlib
pools, so code that subclasses them (joblib's ``MemmappingPool``) or imports
them from their modules (loky, dask, mpnb itself) keeps working.  The patched
``concurrent.futures.ProcessPoolExecutor`` is a subclass of the real class: a
class that derives from it after the patch is a real executor, and
``isinstance(x, concurrent.futures.ProcessPoolExecutor)`` holds for the real
executors and for the ``mpnb.Pool``s the patch made.  ``isinstance(p,
multiprocessing.pool.Pool)`` is false for an ``mpnb.Pool``.

A name bound before the patch (``from multiprocessing import Pool`` run
earlier) keeps the original.  What cannot be honoured is refused with the
reason: a ``fork`` context asked for by name (``get_context("fork")``; mpnb
starts fresh interpreters and never forks the kernel) and an option this
``mpnb.Pool`` lacks.  ``multiprocessing.Pool(...)`` on the default context uses
mpnb's default start method where the default is ``fork`` (Linux up to 3.13),
and ``spawn`` or ``forkserver`` where ``set_start_method`` chose one.  ``unpatch()`` puts back
exactly what was there; patching twice is harmless.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import inspect
import multiprocessing
import multiprocessing.context
import threading
from typing import Any, Callable

__all__ = ["patch", "unpatch", "patched"]

# start methods mpnb runs as asked (it never forks: see mpnb.Pool's ``context``)
_METHODS = ("spawn", "forkserver", "loky")

_lock = threading.Lock()
# what patch() replaced: (owner, attribute name, the previous value or _ABSENT)
_saved: list[tuple[Any, str, Any]] = []
# keyword options given to patch(), used for every pool it creates
_defaults: dict[str, Any] = {}
_ABSENT = object()


def patched() -> bool:
    """True while :func:`patch` is in effect."""
    return bool(_saved)


def patch(**pool_options: Any) -> None:
    """Make the stdlib's pool names create ``mpnb.Pool``s in this process.

    ``pool_options`` (such as ``timeout=60`` or ``live=False``) are given to
    every ``mpnb.Pool`` the patch creates.  Calling ``patch()`` again only
    replaces those options.  :func:`unpatch` undoes it.
    """
    from mpnb.pool import Pool

    accepted = inspect.signature(Pool).parameters
    unknown = sorted(set(pool_options) - set(accepted))
    if unknown:
        raise TypeError(f"mpnb.patch({', '.join(f'{name}=...' for name in unknown)}): mpnb.Pool has no such "
                        f"option; give options of mpnb.Pool, such as timeout= or live=")
    with _lock:
        _defaults.clear()
        _defaults.update(pool_options)
        if _saved:
            return
        _replace(multiprocessing, "Pool", _module_pool)
        _replace(multiprocessing.context.BaseContext, "Pool", _context_pool)
        _replace(concurrent.futures, "ProcessPoolExecutor", _executor_class())


def unpatch() -> None:
    """Put back exactly what :func:`patch` replaced; nothing happens when not patched."""
    with _lock:
        while _saved:
            owner, name, previous = _saved.pop()
            if previous is _ABSENT:
                # concurrent.futures imports ProcessPoolExecutor on first access:
                # without it, the module's __getattr__ does that again
                delattr(owner, name)
            else:
                setattr(owner, name, previous)
        _defaults.clear()


def _replace(owner: Any, name: str, value: Any) -> None:
    _saved.append((owner, name, vars(owner).get(name, _ABSENT)))
    setattr(owner, name, value)


# ------------------------------------------------------------------ the stand-ins


def _module_pool(processes=None, initializer=None, initargs=(), maxtasksperchild=None):
    """``multiprocessing.Pool`` under ``mpnb.patch()``: an ``mpnb.Pool``."""
    # the default context: fork there is the platform's default (Linux up to
    # 3.13), which libraries fix on first use, not a choice of the caller
    context: Any = multiprocessing.context._default_context
    if _method(context) == "fork":
        context = None
    return _pool("multiprocessing.Pool", processes, initializer, initargs, maxtasksperchild, context)


def _context_pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None):
    """``context.Pool`` under ``mpnb.patch()``: an ``mpnb.Pool`` with the context's start method."""
    where = f"multiprocessing.get_context({_method(self)!r}).Pool"
    return _pool(where, processes, initializer, initargs, maxtasksperchild, self)


def _executor_class() -> type:
    real = concurrent.futures.process.ProcessPoolExecutor

    class _Redirect(type):
        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            if cls is stand_in:
                return _executor(*args, **kwargs)
            return super().__call__(*args, **kwargs)  # a subclass: a real executor

        def __instancecheck__(cls, obj: Any) -> bool:
            if cls is stand_in:
                from mpnb.pool import Pool

                return isinstance(obj, (real, Pool))
            return super().__instancecheck__(obj)

    stand_in = _Redirect("ProcessPoolExecutor", (real,), {
        "__module__": "concurrent.futures",
        "__doc__": "``concurrent.futures.ProcessPoolExecutor`` under ``mpnb.patch()``: calling it "
                   "returns an ``mpnb.Pool``; classes derived from it are real executors.",
    })
    return stand_in


def _executor(max_workers=None, mp_context=None, initializer=None, initargs=(), *, max_tasks_per_child=None):
    where = "concurrent.futures.ProcessPoolExecutor"
    return _pool(where, max_workers, initializer, initargs, max_tasks_per_child, mp_context,
                 tasks_option="max_tasks_per_child")


def _pool(where: str, workers: Any, initializer: Callable | None, initargs: Any, max_tasks: Any,
          context: Any, tasks_option: str = "maxtasksperchild") -> Any:
    """The ``mpnb.Pool`` that the stdlib call ``where`` stands for."""
    from mpnb.pool import Pool

    options = dict(_defaults)
    options["workers"] = workers
    if initializer is not None or initargs:
        options["initializer"], options["initargs"] = initializer, tuple(initargs)
    method = _start_method(where, context)
    if method is not None:
        options["context"] = method
    if max_tasks is not None:
        options[_tasks_option(where, tasks_option, Pool)] = max_tasks
    return Pool(**options)


def _method(context: Any) -> str | None:
    """The start method a context stands for; None when it was never chosen."""
    try:
        return context.get_start_method(allow_none=True)
    except TypeError:  # a context whose get_start_method takes no argument
        return context.get_start_method()


def _start_method(where: str, context: Any) -> str | None:
    """mpnb's ``context`` option for a stdlib context, or None for mpnb's default.

    A start method not chosen yet gets mpnb's default; one named is honoured
    or refused.
    """
    if context is None:
        return None
    method = _method(context)
    if method is None:
        return None
    if method in _METHODS:
        return method
    if method == "fork":
        raise ValueError(
            f"{where} under mpnb.patch() was asked for the 'fork' start method, which mpnb never uses: "
            "a forked child copies the kernel's threads and sockets and can deadlock. Use "
            "multiprocessing.get_context('spawn') or 'forkserver' (or leave the start method unset), "
            "or call mpnb.unpatch() to get the real fork pool."
        )
    raise ValueError(f"{where} under mpnb.patch(): the start method {method!r} is not one mpnb knows; "
                     f"use one of {', '.join(_METHODS)}, or call mpnb.unpatch()")


def _tasks_option(where: str, asked: str, pool: type) -> str:
    """The name under which this ``mpnb.Pool`` takes a worker's task limit."""
    accepted = inspect.signature(pool).parameters
    for name in (asked, "maxtasksperchild", "max_tasks_per_child"):
        if name in accepted:
            return name
    raise TypeError(f"{where}({asked}=...) under mpnb.patch(): this version of mpnb.Pool cannot replace "
                    f"workers after a number of tasks; leave out {asked}, or call mpnb.unpatch() to get "
                    "the stdlib pool")
