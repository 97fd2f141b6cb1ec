"""How mpnb pickles what it sends to workers: cloudpickle, with the file
names of shipped code kept.

Functions from notebook cells travel by value.  Their code objects name the
file they came from (``/tmp/ipykernel_…/….py`` for an ordinary cell), and
that name is what lets the notebook show a worker's traceback with the
cell's source lines: the worker has no such file, the kernel's ``linecache``
has the lines.  cloudpickle from 3.1.3 on writes every code object's
``co_filename`` as ``"<dynamic-code>"`` (for deterministic payloads), so
this pickler wraps each code object in a call that puts its file name back
when it is loaded.  It uses only the pickler's public hook
(``reducer_override``); ``tests/test_serialize.py`` checks in a fresh
interpreter that the names survive, and fails if cloudpickle's handling of
code changes under it.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
import weakref
from typing import Any

import cloudpickle

__all__ = ["Pickler", "dumps", "dumps_function"]

# the file name of a code object's copy that is being pickled by cloudpickle
# itself; any other code object is wrapped first
_COPY = "<mpnb-code-copy>"


def _restore_filename(code: types.CodeType, filename: str) -> types.CodeType:
    return code.replace(co_filename=filename)


class Pickler(cloudpickle.CloudPickler):
    """cloudpickle's pickler; code objects keep their file name."""

    def __init__(self, file, protocol: int = pickle.HIGHEST_PROTOCOL):
        super().__init__(file, protocol=protocol)

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType and obj.co_filename != _COPY:
            # a copy, not obj itself: pickling obj inside its own reduction
            # would memoise it first and drop the wrapper
            return _restore_filename, (obj.replace(co_filename=_COPY), obj.co_filename)
        return super().reducer_override(obj)


def dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps(obj)``, with the file names of code kept."""
    buffer = io.BytesIO()
    Pickler(buffer).dump(obj)
    return buffer.getvalue()


# a function that pickles by reference (its module and name), with its
# pickle: a pool pickles its call's function at every call
_by_reference: "weakref.WeakKeyDictionary[types.FunctionType, bytes]" = weakref.WeakKeyDictionary()


def dumps_function(fn: Any) -> bytes:
    """``dumps(fn)`` for a call's function, remembered for a function that
    pickles by reference, and used again while that still holds: its
    module's name still finds this very function there, and the module is
    not registered with cloudpickle to go by value.  Else ``fn`` is pickled
    again, as a function redefined since (by value, or by its new
    definition) must be.  In a worker loop, a pickle by reference costs
    some 30 µs in cloudpickle; a look-up here about 1."""
    if type(fn) is not types.FunctionType:
        return dumps(fn)
    data = _by_reference.get(fn)
    if data is not None and _found_by_name(fn):
        return data
    data = dumps(fn)
    # found by name (so the plain pickler imports nothing), and cloudpickle
    # wrote what the plain pickler writes: the module and name only
    if _found_by_name(fn) and pickle.dumps(fn, pickle.HIGHEST_PROTOCOL) == data:
        _by_reference[fn] = data
    return data


def _found_by_name(fn: types.FunctionType) -> bool:
    """Whether ``fn``'s module (not registered to go by value) holds ``fn``
    under its qualified name: what a pickle by reference loads."""
    module_name = fn.__module__
    found: Any = sys.modules.get(module_name)
    for part in fn.__qualname__.split("."):
        found = getattr(found, part, None)
    if found is not fn:
        return False
    by_value = cloudpickle.list_registry_pickle_by_value()
    return not by_value or not any(module_name == name or module_name.startswith(name + ".") for name in by_value)
