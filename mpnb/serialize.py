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
import types
from typing import Any

import cloudpickle

__all__ = ["Pickler", "dumps"]

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
