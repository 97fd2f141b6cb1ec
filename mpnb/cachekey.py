"""Cache keys: a stable digest of a function's identity and of a task's arguments.

A key must be the same in a new kernel for the same computation, and differ
when anything the result depends on changed.  What names a function:

- a ``%%mppool`` function: its cell module's name, which is a hash of the
  module's text and captured values (:func:`mpnb.cellmodule.module_name`);
  a helper from another cell is imported by that cell's module name in the
  text, so a changed helper cell changes this one's name too;
- a function of an ordinary cell (``__main__``): a by-value pickle of its
  code and of the globals it uses, with the kernel's temporary file names
  taken out of the code objects;
- a library function: module, qualified name and the version of the
  distribution that holds the module (Python's version for the standard
  library; a hash of the file's content for a module of no distribution).

Arguments are walked, not pickled: containers item by item (sets sorted by
their items' digests), numpy arrays and pandas objects by a hash of their
buffers with dtype, shape and index, other objects by their
``__reduce_ex__`` reduction.  What cannot be reduced (an open file, a lock)
raises :class:`Uncacheable`, naming where in the arguments it is.
"""

from __future__ import annotations

import copyreg
import functools
import hashlib
import importlib.metadata
import io
import pickle
import struct
import sys
import types
from pathlib import Path
from typing import Any, Callable, Mapping

import cloudpickle

__all__ = ["Uncacheable", "digest", "function_key", "function_label"]

_CELLS = "mpnb.cells.cell_"


class Uncacheable(TypeError):
    """An object that has no stable hash; ``where`` says where it is (``args[0].fh``)."""

    def __init__(self, where: str, obj: Any, why: str):
        kind = type(obj)
        super().__init__(f"{where} (a {kind.__module__}.{kind.__qualname__}) has no stable hash: {why}")
        self.where = where


def digest(obj: Any, where: str = "argument") -> bytes:
    """A 16-byte digest of ``obj``'s content, the same in every process."""
    walker = _Walker()
    walker.walk(obj, where)
    return walker.hash.digest()


# --------------------------------------------------------------- functions


def function_key(fn: Callable) -> bytes:
    """A digest of what ``fn`` computes (see the module doc); raises :class:`Uncacheable`."""
    return digest(fn, "the function")


def function_label(fn: Callable) -> tuple[str, str]:
    """``(name, where it came from)`` for listings: the cell module, the notebook, or the library and version."""
    fn = getattr(fn, "func", fn)  # functools.partial
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__qualname__
    if module.startswith(_CELLS):
        return name, "%%mppool " + module.rpartition(".")[2]
    if module in ("__main__", "__mp_main__"):
        return name, "notebook cell"
    return name, f"{module} {_version(module)}"


def _importable(obj: Any) -> bool:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return False
    if module in ("__main__", "__mp_main__") or module not in sys.modules:
        return False
    found: Any = sys.modules[module]
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def _version(module: str) -> str:
    """The version a module's results depend on."""
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        return "python " + sys.version.split()[0]
    dists = _distributions().get(top)
    if dists:
        try:
            return f"{dists[0]} {importlib.metadata.version(dists[0])}"
        except importlib.metadata.PackageNotFoundError:
            pass
    # a module of no distribution (a .py beside the notebook): its content
    path = getattr(sys.modules.get(module), "__file__", None)
    if path and Path(path).is_file():
        return "file " + hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    return "unversioned"


class _KeyPickler(cloudpickle.CloudPickler):
    """cloudpickle by value, with code objects' file names dropped: the
    kernel's temporary file of a cell differs from kernel to kernel."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType and obj.co_filename != "<cell>":
            # the copy is pickled as an argument: cloudpickle before 3.1.3 leaves code to its
            # dispatch table, which would be given obj itself after this method
            return _same, (obj.replace(co_filename="<cell>"),)
        return super().reducer_override(obj)


def _same(value: Any) -> Any:
    return value


def _by_value(obj: Any, where: str) -> bytes:
    buffer = io.BytesIO()
    try:
        _KeyPickler(buffer, protocol=5).dump(obj)
    except Exception as exc:
        raise Uncacheable(where, obj, f"it does not pickle ({type(exc).__name__}: {exc})") from None
    return buffer.getvalue()


# --------------------------------------------------------------- the walk


_ATOMS = (type(None), bool, int, float, complex, str, bytes)


class _Walker:
    def __init__(self) -> None:
        self.hash = hashlib.blake2b(digest_size=16)
        self.seen: dict[int, int] = {}
        self.alive: list[Any] = []  # keeps walked objects, so their ids stay theirs

    def put(self, tag: str, data: bytes = b"") -> None:
        self.hash.update(tag.encode() + struct.pack("<Q", len(data)) + data)

    def walk(self, obj: Any, where: str) -> None:
        kind = type(obj)
        if kind in _ATOMS:
            self.put(kind.__name__, obj if kind is bytes else obj.encode("utf-8", "surrogatepass") if kind is str else repr(obj).encode())
            return
        if id(obj) in self.seen:  # shared or cyclic: a reference to the first visit
            self.put("ref", struct.pack("<Q", self.seen[id(obj)]))
            return
        self.seen[id(obj)] = len(self.seen)
        self.alive.append(obj)
        if kind in (tuple, list):
            self.put(kind.__name__, struct.pack("<Q", len(obj)))
            for i, item in enumerate(obj):
                self.walk(item, f"{where}[{i}]")
        elif kind is dict:
            self.put("dict", struct.pack("<Q", len(obj)))
            for key, value in obj.items():
                self.walk(key, f"{where} key")
                self.walk(value, f"{where}[{key!r}]")
        elif kind in (set, frozenset):
            self.put(kind.__name__, b"".join(sorted(digest(item, f"{where} item") for item in obj)))
        else:
            self.special(obj, kind, where)

    def special(self, obj: Any, kind: type, where: str) -> None:
        module = kind.__module__
        if module == "numpy" and kind.__name__ == "ndarray":
            self.array(obj, where)
        elif module.startswith("pandas.") and _is_pandas(obj):
            self.pandas(obj, where)
        elif isinstance(obj, (types.FunctionType, type)):
            self.function(obj, where)
        elif isinstance(obj, types.ModuleType):
            self.put("module", f"{obj.__name__} {_version(obj.__name__)}".encode())
        elif isinstance(obj, (types.BuiltinFunctionType, types.MethodType)):
            self_ = getattr(obj, "__self__", None)
            if isinstance(obj, types.MethodType):
                self.walk(obj.__func__, where)
            else:
                self.put("builtin", f"{obj.__module__}.{obj.__qualname__}".encode())
            if self_ is not None and not isinstance(self_, types.ModuleType):
                self.walk(self_, f"{where}.__self__")
        else:
            self.reduced(obj, kind, where)

    def function(self, obj: Any, where: str) -> None:
        module = getattr(obj, "__module__", "") or ""
        if module.startswith(_CELLS) or _importable(obj):
            # a cell module's name is its content hash; a library's has its version
            version = "" if module.startswith(_CELLS) else _version(module)
            self.put("global", f"{module} {obj.__qualname__} {version}".encode())
        else:
            self.put("by value", _by_value(obj, where))

    def global_(self, obj: Any) -> None:
        module = obj.__module__
        name = getattr(obj, "__qualname__", None) or obj.__name__
        self.put("global", f"{module} {name} {_version(module)}".encode())

    def array(self, obj: Any, where: str) -> None:
        import numpy

        self.put("ndarray", f"{obj.dtype.str} {obj.shape}".encode())
        if obj.dtype.hasobject:
            self.walk(obj.tolist(), where)
        else:
            contiguous: Any = numpy.ascontiguousarray(obj)
            self.hash.update(memoryview(contiguous).cast("B"))

    def pandas(self, obj: Any, where: str) -> None:
        import pandas  # type: ignore[import-untyped]

        self.put(type(obj).__name__, repr(getattr(obj, "dtypes", getattr(obj, "dtype", None))).encode())
        for part in ("name", "names", "columns"):
            if hasattr(obj, part):
                value = getattr(obj, part)
                self.walk(list(value) if isinstance(value, pandas.Index) else value, f"{where}.{part}")
        try:
            # per row, the index's values combined in unless obj is the index
            rows = pandas.util.hash_pandas_object(obj, index=not isinstance(obj, pandas.Index))
        except TypeError as exc:  # unhashable cells (lists in an object column)
            raise Uncacheable(where, obj, str(exc)) from None
        self.array(rows.to_numpy(), where)

    def reduced(self, obj: Any, kind: type, where: str) -> None:
        if _importable(obj):  # a named object of a module: numpy's ufuncs, enum members' classes
            self.global_(obj)
            return
        try:
            # as pickle does: a reducer registered with copyreg first (numpy 1's ufuncs)
            registered = copyreg.dispatch_table.get(kind)
            reduction = registered(obj) if registered is not None else obj.__reduce_ex__(5)
        except Exception as exc:
            raise Uncacheable(where, obj, f"it cannot be pickled ({exc})") from None
        if isinstance(reduction, str):  # a global, by name
            self.put("global", f"{getattr(obj, '__module__', '')} {reduction}".encode())
            return
        self.put("object")
        for i, part in enumerate(reduction[:5]):
            if i >= 3 and part is not None:  # list or dict items: an iterator
                part = list(part)
            self.walk(part, where if i != 2 else f"{where}.__dict__")


def _is_pandas(obj: Any) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(obj, (pandas.DataFrame, pandas.Series, pandas.Index))
