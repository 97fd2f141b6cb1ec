"""Engines: where a pool's tasks run.

:func:`create` makes the engine a pool's options ask for; it is the only
place that chooses between them:

- ``local`` (:mod:`mpnb.backends.local`): worker processes on this machine,
  started by :mod:`mpnb.backends.launcher`;
- ``dask`` (:mod:`mpnb.backends.dask`): a dask.distributed cluster, imported
  only when asked for, since ``distributed`` is an optional extra;
- ``threads`` (:mod:`mpnb.backends.threads`): threads of this process;
- ``interpreters`` (:mod:`mpnb.backends.interpreters`): subinterpreters of
  this process, on threads (Python 3.14 and later);
- ``inline`` (:mod:`mpnb.backends.inline`): this process, for a pool
  created inside a worker at the nesting limit.

Every engine implements :class:`mpnb.backends.base.Engine`; see
``docs/architecture.md`` for how to add one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from mpnb import limits, resources
from mpnb.backends.base import Engine

__all__ = ["BACKENDS", "Engine", "Options", "create"]

BACKENDS = ("local", "dask", "threads", "interpreters")

# how long a worker may take to start (its initializer included), in seconds
_DEFAULT_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Options:
    """What a pool was asked for, as far as its engine is concerned."""

    backend: str = "local"
    address: Any = None
    workers: int | None = None
    initializer: Callable[..., Any] | None = None
    initargs: tuple = ()
    env: dict[str, str] = field(default_factory=dict)
    context: str | None = None
    #: a local worker is replaced after this many tasks (None: never); an
    #: inline engine ignores it (it has no worker process of its own to
    #: replace), a dask cluster refuses it (its workers are not the pool's)
    max_tasks_per_child: int | None = None
    #: worker_env, gpus, pin, max_memory, soft_memory as given (mpnb.resources);
    #: a dask cluster refuses them, an inline engine ignores them (its tasks
    #: run in a worker that already has its own)
    resources: dict[str, Any] = field(default_factory=dict)


def check(backend: str, address: Any) -> str:
    """Refuse a backend name or an address that does not fit it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use 'local' (processes on this machine), 'dask', "
                         "'threads' (threads of this process) or 'interpreters' (subinterpreters, Python 3.14)")
    if backend != "dask" and address is not None:
        raise ValueError(f"address={address!r} is for a dask cluster: pass backend='dask' with it")
    return backend


def create(options: Options) -> Engine:
    """The engine for ``options``, started."""
    check(options.backend, options.address)
    resources.check(options.resources, options.backend)
    if options.backend == "dask":
        from mpnb.backends.dask import connect

        return connect(options.address, workers=options.workers, initializer=options.initializer,
                       env=options.env, context=options.context, max_tasks_per_child=options.max_tasks_per_child)
    if options.backend in ("threads", "interpreters"):
        return _in_this_process(options)
    workers = limits.resolve_workers(options.workers)
    if limits.runs_inline():
        from mpnb.backends.inline import InlineEngine

        # max_tasks_per_child is ignored: the tasks run in this worker, which
        # has no worker of its own to replace (and the outer pool's limit holds)
        return InlineEngine(workers, options.initializer, options.initargs)
    return _local(options, workers)


def _in_this_process(options: Options) -> Engine:
    """The thread or subinterpreter engine, refusing the options about processes."""
    name = options.backend
    if name == "interpreters":
        from mpnb.backends.interpreters import available

        why = available()
        if why is not None:
            raise RuntimeError(why)
    given = [
        (bool(options.env), "env=", "its threads share this process's environment: set os.environ"),
        (options.context is not None, f"context={options.context!r}", "it starts no processes"),
        (options.max_tasks_per_child is not None, f"max_tasks_per_child={options.max_tasks_per_child!r}",
         "it has no worker processes to replace"),
    ]
    for wrong, option, reason in given:
        if wrong:
            raise ValueError(f"mpnb.Pool(backend={name!r}) does not take {option}: {reason}. Leave it out.")
    if name == "interpreters":
        from mpnb.backends.interpreters import InterpreterEngine

        return InterpreterEngine(options.workers, options.initializer, options.initargs)
    from mpnb.backends.threads import ThreadEngine

    return ThreadEngine(options.workers, options.initializer, options.initargs)


def _local(options: Options, workers: int) -> Engine:
    from mpnb.backends.launcher import DEFAULT_METHOD, Launcher
    from mpnb.backends.local import LocalEngine

    worker_env = limits.thread_env(workers)
    worker_env[limits.DEPTH_VAR] = str(limits.current_depth() + 1)
    worker_env.update(options.env)
    config = {
        "parent": os.getpid(),
        # pickled as each worker starts: queues and locks in initargs pickle only then
        "initializer": (options.initializer, options.initargs) if options.initializer is not None else None,
    }
    initializer = _qualified_name(options.initializer) if options.initializer is not None else None
    seconds = start_timeout()  # a bad setting is refused before anything starts
    slots = resources.resolve(options.resources, workers, options.env)
    launcher = Launcher(worker_env, config, options.context or DEFAULT_METHOD, slots)
    engine = LocalEngine(launcher, workers, initializer, seconds, options.max_tasks_per_child, slots)
    engine.start()
    return engine


def start_timeout() -> float:
    """Seconds a worker may take to start, from ``MPNB_START_TIMEOUT`` (default 60)."""
    from mpnb.errors import START_TIMEOUT_VAR

    raw = os.environ.get(START_TIMEOUT_VAR, "")
    if not raw.strip():
        return _DEFAULT_START_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{START_TIMEOUT_VAR}={raw!r}: give a number of seconds above 0, or unset it for 60")
    return seconds


def _qualified_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else name
