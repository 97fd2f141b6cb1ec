"""mpnb: process pools that work from Jupyter notebooks.

``%load_ext mpnb`` registers the ``%%mppool`` cell magic, which turns a cell's
definitions into a real importable module so that any spawn- or
forkserver-based pool can pickle them by reference.  ``mpnb.Pool`` is a
notebook-safe process pool.

Importing this package is cheap: it imports neither IPython nor the pool
machinery, and starts no thread or process.  Those come when they are used.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing is not imported: workers import this package at start-up

__version__ = "0.1.0"

__all__ = [
    "Pool",
    "PicklingProblem",
    "diagnose",
    "doctor",
    "patch",
    "unpatch",
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
}

if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

    from mpnb.doctor import doctor
    from mpnb.patching import patch, unpatch
    from mpnb.pickling import PicklingProblem, diagnose
    from mpnb.pool import Pool


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mpnb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def load_ipython_extension(ipython: Any) -> None:
    """Called by ``%load_ext mpnb``: register the magics for this kernel."""
    from mpnb.magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Called by ``%unload_ext mpnb``: remove the cell-module directory."""
    from mpnb.magics import unload

    unload(ipython)
