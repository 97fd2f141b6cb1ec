"""One small adapter per pool library, all with the same three methods.

``start()`` creates the pool (its workers may start lazily, as most do);
``map(fn, items, chunksize)`` returns ``[fn(x) for x in items]`` as a list,
with ``chunksize=None`` meaning the library's own default (automatic
chunking where it has one: mpnb, multiprocessing, joblib, mpire; one task
per message for ProcessPoolExecutor, loky and pebble, which have none);
``close()`` stops the workers and waits for them.

Start methods: the stdlib pools run under each of spawn, forkserver and
fork; ProcessPoolExecutor, mpire and pebble under spawn, which is what
works from a notebook on every platform; loky and joblib use loky's own
launcher; mpnb runs with ``context="exec"`` (its own launcher, the
reference of the ratios) and with ``context="loky"``.  The thread engine,
``mpnb.Pool(backend="threads")``, runs beside ``ThreadPoolExecutor``, its
peer: on a build with the GIL their CPU-bound speed-up is 1, on a
free-threaded build (``python3.13t``) it is what threads can give.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from abc import ABC, abstractmethod
from typing import Callable

WORKERS = 2


class Contender(ABC):
    """A pool library under test."""

    name = ""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def map(self, fn: Callable, items: list, chunksize: int | None) -> list: ...

    @abstractmethod
    def close(self) -> None: ...

    def forget(self) -> None:
        """Drop what a pool closed earlier left ready for the next one (untimed),
        so that a cold start is cold."""


def end_spares() -> None:
    """End mpnb's spare workers, where this mpnb has them (an earlier
    revision, run by :mod:`benchmarks.baseline`, may not)."""
    try:
        from mpnb.backends.launcher import end_spares as end
    except ImportError:
        return
    end()


class Mpnb(Contender):
    """``mpnb.Pool`` with a start method (``"exec"``, ``"loky"``), or on
    ``"threads"``: its thread engine."""

    def __init__(self, context: str):
        self.context = context
        self.name = f"mpnb.Pool ({context})"

    def start(self) -> None:
        import mpnb

        if self.context == "threads":
            self.pool = mpnb.Pool(WORKERS, backend="threads")
        else:
            self.pool = mpnb.Pool(WORKERS, context=self.context)

    def map(self, fn, items, chunksize):
        return self.pool.map(fn, items, chunksize=chunksize)

    def close(self) -> None:
        self.pool.shutdown()

    def forget(self) -> None:
        end_spares()


class Stdlib(Contender):
    def __init__(self, method: str):
        self.method = method
        self.name = f"multiprocessing.Pool ({method})"

    def start(self) -> None:
        self.pool = multiprocessing.get_context(self.method).Pool(WORKERS)

    def map(self, fn, items, chunksize):
        return self.pool.map(fn, items, chunksize=chunksize)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()

    def forget(self) -> None:
        if self.method == "forkserver":  # its server process, which forks the next pool's workers
            from multiprocessing import forkserver

            forkserver._forkserver._stop()  # type: ignore[attr-defined]


class Executor(Contender):
    name = "ProcessPoolExecutor (spawn)"

    def start(self) -> None:
        self.pool = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))

    def map(self, fn, items, chunksize):
        return list(self.pool.map(fn, items, chunksize=chunksize or 1))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class ThreadExecutor(Contender):
    name = "ThreadPoolExecutor"

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(WORKERS)

    def map(self, fn, items, chunksize):
        return list(self.pool.map(fn, items))  # it takes chunksize and ignores it

    def close(self) -> None:
        self.pool.shutdown(wait=True)


#: pools of threads: the thread engine's peers, not the process pools'; a
#: thread pool starts no process and sends nothing, so it would otherwise be
#: the best peer of most columns, and every ratio to a process pool would be
#: to it
THREAD_POOLS = frozenset({"mpnb.Pool (threads)", ThreadExecutor.name})


class Loky(Contender):
    name = "loky"

    def start(self) -> None:
        import loky

        self.pool = loky.ProcessPoolExecutor(WORKERS)

    def map(self, fn, items, chunksize):
        return list(self.pool.map(fn, items, chunksize=chunksize or 1))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class Joblib(Contender):
    name = "joblib"

    def start(self) -> None:
        pass  # joblib starts loky's reusable executor on its first call

    def map(self, fn, items, chunksize):
        from joblib import Parallel, delayed

        return Parallel(n_jobs=WORKERS, batch_size=chunksize or "auto")(delayed(fn)(x) for x in items)

    def close(self) -> None:
        from joblib.externals.loky import reusable_executor

        executor = reusable_executor._executor
        if executor is not None:
            executor.shutdown(wait=True)
            reusable_executor._executor = None


class Mpire(Contender):
    name = "mpire (spawn)"

    def start(self) -> None:
        from mpire import WorkerPool

        # keep_alive: without it mpire starts new workers for every call
        self.pool = WorkerPool(n_jobs=WORKERS, start_method="spawn", keep_alive=True)

    def map(self, fn, items, chunksize):
        # mpire unpacks tuple items into arguments; a 1-tuple passes the item whole;
        # without concatenate_numpy_output=False it joins numpy results into one array
        return self.pool.map(fn, [(x,) for x in items], chunk_size=chunksize, concatenate_numpy_output=False)

    def close(self) -> None:
        self.pool.stop_and_join()
        self.pool.terminate()


class Pebble(Contender):
    name = "pebble (spawn)"

    def start(self) -> None:
        from pebble import ProcessPool

        self.pool = ProcessPool(max_workers=WORKERS, context=multiprocessing.get_context("spawn"))

    def map(self, fn, items, chunksize):
        return list(self.pool.map(fn, items, chunksize=chunksize or 1).result())

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


#: the libraries a contender imports, by the class that needs them
_LIBRARIES = {"Joblib": "joblib", "Mpire": "mpire", "Pebble": "pebble"}


def import_all(contenders: list) -> None:
    """Import every library of ``contenders`` now, so no cold start pays for
    an import; only theirs, so that ``--only thread`` runs where mpire and
    pebble do not install (a free-threaded build)."""
    import importlib

    import cloudpickle  # noqa: F401
    import loky  # noqa: F401

    import mpnb.pool  # noqa: F401

    for contender in contenders:
        library = _LIBRARIES.get(type(contender).__name__)
        if library is not None:
            importlib.import_module(library)


def all_contenders() -> list[Contender]:
    """Every contender, mpnb first; fork only where the platform has it."""
    methods = [m for m in ("spawn", "forkserver", "fork") if m in multiprocessing.get_all_start_methods()]
    return [Mpnb("exec"), Mpnb("loky"), *(Stdlib(m) for m in methods), Executor(), Loky(), Joblib(), Mpire(), Pebble(),
            Mpnb("threads"), ThreadExecutor()]
