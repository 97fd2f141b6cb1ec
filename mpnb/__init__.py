"""mpnb: process pools that work from Jupyter notebooks.

``%load_ext mpnb`` registers the ``%%mppool`` cell magic, which turns a cell's
definitions into a real importable module so that any spawn- or
forkserver-based pool can pickle them by reference.  ``mpnb.Pool`` is a
notebook-safe process pool.

Importing this package is cheap: it imports neither IPython nor the pool
machinery, and starts no thread or process.  Those come when they are used.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing is not imported: workers import this package at start-up

__version__ = "0.1.0"

__all__ = [
    "Pool",
    "PicklingProblem",
    "diagnose",
    "doctor",
    "patch",
    "unpatch",
    "shared_array",
    "WorkerMemoryError",
    "progress",
    "report",
    "__version__",
    "load_ipython_extension",
    "unload_ipython_extension",
]

# public name -> module that defines it; imported on first access (PEP 562)
_LAZY = {
    "Pool": "mpnb.pool",
    "PicklingProblem": "mpnb.pickling",
    "diagnose": "mpnb.pickling",
    "doctor": "mpnb.doctor",
    # mpnb.patching, not mpnb.patch: importing a submodule named ``patch``
    # would replace the function mpnb.patch with the module
    "patch": "mpnb.patching",
    "unpatch": "mpnb.patching",
    "shared_array": "mpnb.shared",
    "WorkerMemoryError": "mpnb.errors",
    # mpnb.reporting, not mpnb.progress: a submodule named ``progress`` would
    # replace the function mpnb.progress with the module
    "progress": "mpnb.reporting",
    "report": "mpnb.reporting",
}

if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

    from mpnb.doctor import doctor
    from mpnb.errors import WorkerMemoryError
    from mpnb.patching import patch, unpatch
    from mpnb.pickling import PicklingProblem, diagnose
    from mpnb.pool import Pool
    from mpnb.reporting import progress, report
    from mpnb.shared import shared_array


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None and name != "cache":  # mpnb.cache, the task cache, is a submodule
        raise AttributeError(f"module 'mpnb' has no attribute {name!r}")
    import importlib  # here: a worker imports this package at start-up

    if module is None:
        return importlib.import_module("mpnb.cache")

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _RegisterWithJoblib:
    """An import hook: once joblib is imported, register mpnb's joblib backend.

    ``import mpnb`` must not import joblib (it is heavy, and optional); this
    finder waits on ``sys.meta_path`` for joblib's import, lets it run, then
    registers ``"mpnb"`` and removes itself.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "joblib":
            return None
        _forget_hook()
        import importlib.util

        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _register_joblib_backend()

        loader.exec_module = exec_module
        return spec


def _forget_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterWithJoblib)]


def _register_joblib_backend() -> None:
    from joblib import register_parallel_backend  # type: ignore[import-untyped]

    register_parallel_backend("mpnb", _joblib_backend)


def _joblib_backend(**options: Any) -> Any:
    """joblib's factory for ``backend="mpnb"``: the backend's module is imported on first use."""
    from mpnb.joblib_backend import MpnbBackend

    return MpnbBackend(**options)


if "joblib" in sys.modules:
    _register_joblib_backend()
else:
    _forget_hook()  # a reload must not add a second hook
    sys.meta_path.insert(0, _RegisterWithJoblib())


def load_ipython_extension(ipython: Any) -> None:
    """Called by ``%load_ext mpnb``: register the magics for this kernel."""
    from mpnb.magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Called by ``%unload_ext mpnb``: remove the cell-module directory."""
    from mpnb.magics import unload

    unload(ipython)
