"""Which part of an object will not pickle, and why.

A process pool ships a function and its arguments to another process with
pickle.  When that fails, pickle names a type (``cannot pickle '_thread.lock'
object``) but not where that object sits inside what was sent, and it says
nothing at all when the failure only shows up in the child (a function defined
in a notebook cell, which a spawned child cannot import).

:func:`diagnose` finds the culprit before any process starts.  It tries to
pickle the object; if that fails it walks down the object graph the way pickle
does (container items, instance state, a function's globals and closure when
it goes by value) and follows the first part that fails on its own, until it
reaches a part whose own pieces all pickle.  That part is the culprit; its
path from the root (``db.session._lock``), its type, the reason and a fix make
up the :class:`Diagnosis`.

Two modes, matching the two ways mpnb's consumers pickle:

* ``by_value=False``: stdlib pickle, as ``multiprocessing``,
  ``concurrent.futures`` and PyTorch use.  Functions and classes go by
  reference, so a lambda, a nested function, a class defined inside a
  function, or anything defined in an interactive ``__main__`` is a problem.
* ``by_value=True``: cloudpickle, as ``mpnb.Pool`` and loky use for notebook
  functions.  Functions go with their code, so what matters is what they
  capture: globals they use, closure variables, defaults.
"""

from __future__ import annotations

import copyreg
import functools
import io
import pickle
import socket
import sys
import threading
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from mpnb._repr import short_repr

__all__ = ["Diagnosis", "PicklingProblem", "check_call", "diagnose", "diagnose_call", "raise_for"]

# How long the walk may take before it reports where it got to.
WALK_SECONDS = 1.5
# How many parts of one container the walk looks at before giving up on it.
MAX_PARTS = 10_000


@dataclass(frozen=True)
class Diagnosis:
    """Why an object cannot be sent to another process, and what to do."""

    path: str  #: where the culprit sits, starting with the name given
    type: str  #: the culprit's type, qualified (``_thread.lock``)
    kind: str  #: a short key: ``lock``, ``file``, ``lambda``, ``main``, ...
    reason: str  #: one or two sentences: why it cannot cross a process boundary
    fix: str  #: one or two sentences: what to do instead
    error: str  #: the pickle error as raised, on one line ("" if none)
    by_value: bool  #: True when judged as cloudpickle would ship it

    def __str__(self) -> str:
        return f"{self.path} ({self.type}) cannot be sent to a worker process. {self.reason} Fix: {self.fix}"

    def returned(self) -> str:
        """The sentence for a part of a task's return value: it travels the
        other way, so the fix is about what the task returns."""
        fix = _RESULT_FIX.get(self.kind, _RESULT_FIX_ANY).format(type=self.type, fix=self.fix)
        return (f"the task's return value cannot be sent back from the worker: {self.path} "
                f"({self.type}) does not pickle. {self.reason} Fix: {fix}")


_RESULT_FIX = {
    "generator": "return list(...) of its items instead of the generator.",
    "recursion": "{fix}",
}
_RESULT_FIX_ANY = ("return the plain data you need from it instead of the {type}, or drop it "
                   "in __getstate__ of the object that holds it.")


class PicklingProblem(pickle.PicklingError):
    """An object cannot be pickled for a worker; ``.diagnosis`` says where and why."""

    def __init__(self, diagnosis: Diagnosis, message: str | None = None):
        super().__init__(str(diagnosis) if message is None else message)
        self.diagnosis = diagnosis

    def __reduce__(self):
        return (type(self), (self.diagnosis, str(self)), self.__dict__)


def diagnose(obj: Any, *, by_value: bool = False, name: str = "obj") -> Diagnosis | None:
    """Return why ``obj`` cannot be sent to a worker process, or None if it can.

    ``name`` starts the path in the answer, so pass the variable's name
    (``diagnose(db, name="db")`` gives ``db.session._lock``).  With
    ``by_value=False`` (the default) the object is judged as stdlib pickle
    ships it, which is what ``multiprocessing``, ``concurrent.futures`` and
    PyTorch use; with ``by_value=True`` as cloudpickle ships it, which is what
    ``mpnb.Pool`` uses for functions defined in the notebook.  Nothing is
    started; the object is pickled into a sink that discards the bytes.
    """
    error = _failure(obj, by_value)
    if error is None:
        return None
    path, culprit, error = _descend(obj, name, error, by_value)
    return _judge(culprit, path, error, by_value)


def raise_for(obj: Any, *, by_value: bool = False, name: str = "obj") -> None:
    """Raise :class:`PicklingProblem` if ``obj`` cannot be sent to a worker."""
    found = diagnose(obj, by_value=by_value, name=name)
    if found is not None:
        raise PicklingProblem(found)


def check_call(fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None,
               *, by_value: bool = False) -> None:
    """Raise :class:`PicklingProblem` naming the part of a call that cannot be sent.

    The function is named by its ``__name__``, the arguments ``args[i]`` and
    ``kwargs['key']``, so the message points at the call the user wrote.
    """
    raise_for(fn, by_value=by_value, name=function_label(fn))
    found = diagnose_call(args, kwargs, by_value=by_value)
    if found is not None:
        raise PicklingProblem(found)


def function_label(fn: Any) -> str:
    """How a diagnosis names a function: its ``__name__``, else ``fn``."""
    return getattr(fn, "__name__", None) or "fn"


def diagnose_call(args: tuple = (), kwargs: dict | None = None, *, by_value: bool = False
                  ) -> Diagnosis | None:
    """The first argument of ``fn(*args, **kwargs)`` that cannot be sent, or None.

    Paths start with ``args[i]`` or ``kwargs['key']``, as the call was written.
    """
    for i, arg in enumerate(args):
        found = diagnose(arg, by_value=by_value, name=f"args[{i}]")
        if found is not None:
            return found
    for key, arg in (kwargs or {}).items():
        found = diagnose(arg, by_value=by_value, name=f"kwargs[{key!r}]")
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------- pickling


class _Sink:
    """A file that forgets what is written: pickling costs no memory."""

    def write(self, data: Any) -> int:
        return len(data)


class _MainReference(pickle.PicklingError):
    """A function or class from an interactive ``__main__`` is pickled by name."""


def interactive_main() -> bool:
    """True when ``__main__`` is a notebook or REPL that a child cannot re-import."""
    main = sys.modules.get("__main__")
    return main is not None and getattr(main, "__file__", None) is None


class _ByReferencePickler(pickle.Pickler):
    """Stdlib pickle, but refuses what only *looks* picklable in a notebook.

    Plain pickle writes ``__main__.work`` happily in the kernel; the error comes
    later, in the child.  Raising here moves that error to the parent.
    """

    def reducer_override(self, obj: Any) -> Any:
        if (
            isinstance(obj, (types.FunctionType, type))
            and getattr(obj, "__module__", None) == "__main__"
            and interactive_main()
        ):
            raise _MainReference(f"{obj.__qualname__} is defined in __main__")
        return NotImplemented


def _failure(obj: Any, by_value: bool) -> BaseException | None:
    """The exception pickling ``obj`` raises, or None."""
    if by_value:
        import cloudpickle

        pickler: pickle.Pickler = cloudpickle.Pickler(_Sink(), protocol=pickle.HIGHEST_PROTOCOL)
    else:
        pickler = _ByReferencePickler(_Sink(), protocol=pickle.HIGHEST_PROTOCOL)
    try:
        pickler.dump(obj)
    except RecursionError as exc:
        return exc
    except Exception as exc:  # pickle raises whatever __reduce__ raises
        return exc
    return None


def _descend(obj: Any, path: str, error: BaseException, by_value: bool
             ) -> tuple[str, Any, BaseException]:
    """Follow failing parts down from ``obj``; return the deepest one."""
    deadline = time.monotonic() + WALK_SECONDS
    while not _too_deep(error) and _kind(obj, by_value) is None:
        for segment, part in _parts(obj, by_value):
            part_error = _failure(part, by_value)
            if part_error is not None:
                obj, path, error = part, path + segment, part_error
                break
            if time.monotonic() > deadline:
                return path, obj, error
        else:
            return path, obj, error
    return path, obj, error


# ------------------------------------------------------------- the graph


def _parts(obj: Any, by_value: bool) -> Iterator[tuple[str, Any]]:
    """(path segment, part) for each thing pickle would save as part of ``obj``."""
    if isinstance(obj, dict):
        yield from _dict_parts(obj, "")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj[:MAX_PARTS]):
            yield f"[{i}]", item
    elif isinstance(obj, (set, frozenset)):
        for i, item in enumerate(list(obj)[:MAX_PARTS]):
            yield f".<set item {i}>", item
    elif isinstance(obj, functools.partial):
        yield ".func", obj.func
        for i, item in enumerate(obj.args):
            yield f".args[{i}]", item
        yield from _dict_parts(obj.keywords, ".keywords")
    elif isinstance(obj, types.MethodType):
        yield ".__self__", obj.__self__
        yield ".__func__", obj.__func__
    elif isinstance(obj, types.FunctionType):
        if by_value:  # by reference a function has no parts: its name is all
            yield from _function_parts(obj)
    elif isinstance(obj, type):
        if by_value:
            for key, value in list(vars(obj).items()):
                if not (key.startswith("__") and key.endswith("__")):
                    yield f".{key}", value
    else:
        yield from _reduced_parts(obj)


def _dict_parts(mapping: dict, prefix: str) -> Iterator[tuple[str, Any]]:
    for i, (key, value) in enumerate(mapping.items()):
        if i >= MAX_PARTS:
            return
        yield f"{prefix}[{short_repr(key)}]", value


def _function_parts(fn: types.FunctionType) -> Iterator[tuple[str, Any]]:
    for name in sorted(_global_names(fn.__code__)):
        if name in fn.__globals__:
            yield f".__globals__[{name!r}]", fn.__globals__[name]
    for i, (name, cell) in enumerate(zip(fn.__code__.co_freevars, fn.__closure__ or ())):
        try:
            yield f".__closure__[{i}].cell_contents", cell.cell_contents
        except ValueError:  # an empty cell: nothing to ship
            continue
    for i, value in enumerate(fn.__defaults__ or ()):
        yield f".__defaults__[{i}]", value
    yield from _dict_parts(fn.__kwdefaults__ or {}, ".__kwdefaults__")
    yield from _dict_parts(fn.__dict__, ".__dict__")


def _global_names(code: types.CodeType) -> set[str]:
    """Names a function's code (and the code nested in it) looks up as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


# the reconstructors of protocol 2+ (undeclared in the stubs, hence getattr)
_NEWOBJ = (getattr(copyreg, "__newobj__"), getattr(copyreg, "__newobj_ex__", None))


def _reduced_parts(obj: Any) -> Iterator[tuple[str, Any]]:
    reducer = copyreg.dispatch_table.get(type(obj))
    try:
        reduced = reducer(obj) if reducer else obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    except Exception:
        return  # the object itself refuses: it is the culprit
    if not isinstance(reduced, tuple):
        return  # a global name
    func, args, state, items, dict_items = (tuple(reduced) + (None,) * 5)[:5]
    if func in _NEWOBJ and args:
        yield ".__class__", args[0]
        args = args[1:]
    else:
        yield ".<reconstructor>", func
    for i, arg in enumerate(args or ()):
        yield f".<argument {i}>", arg
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
        for part in state:
            yield from _state_parts(part)
    else:
        yield from _state_parts(state)
    if items is not None:
        for i, item in enumerate(items):
            if i >= MAX_PARTS:
                break
            yield f"[{i}]", item
    if dict_items is not None:
        for i, (key, value) in enumerate(dict_items):
            if i >= MAX_PARTS:
                break
            yield f"[{short_repr(key)}]", value


def _state_parts(state: Any) -> Iterator[tuple[str, Any]]:
    if state is None:
        return
    if isinstance(state, dict):
        for key, value in list(state.items())[:MAX_PARTS]:
            if isinstance(key, str) and key.isidentifier():
                yield f".{key}", value
            else:
                yield f".__dict__[{short_repr(key)}]", value
    else:
        yield ".__getstate__()", state


# ---------------------------------------------------------------- verdicts

_INITIALIZER = "in the worker function itself or in a pool initializer, which runs once per worker"


def _kind(obj: Any, by_value: bool) -> str | None:
    """A known kind of object that cannot cross a process boundary, or None."""
    if isinstance(obj, _lock_types()):
        return "lock"
    if isinstance(obj, threading.Thread):
        return "thread"
    if isinstance(obj, io.IOBase):
        return "file"
    if isinstance(obj, socket.socket):
        return "socket"
    if type(obj).__module__ == "sqlite3":
        return "sqlite"
    if isinstance(obj, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        return "generator"
    if isinstance(obj, (types.FrameType, types.TracebackType)):
        return "frame"
    if _is_ctypes_pointer(obj):
        return "ctypes"
    if isinstance(obj, types.ModuleType) and not by_value:
        return "module"
    if isinstance(obj, (types.FunctionType, type)) and not by_value:
        qualname = getattr(obj, "__qualname__", "")
        if qualname == "<lambda>" or qualname.endswith(".<lambda>"):
            return "lambda"
        if "<locals>" in qualname:
            return "local_class" if isinstance(obj, type) else "local_function"
        if obj.__module__ == "__main__" and interactive_main():
            return "main"
    return None


def _lock_types() -> tuple[type, ...]:
    return (
        type(threading.Lock()),
        type(threading.RLock()),
        threading.Condition,
        threading.Semaphore,
        threading.Event,
        threading.Barrier,
    )


def _is_ctypes_pointer(obj: Any) -> bool:
    ctypes = sys.modules.get("ctypes")
    if ctypes is None:
        return False
    pointer_types = (ctypes._Pointer, ctypes._CFuncPtr, ctypes.c_void_p, ctypes.c_char_p,
                     ctypes.c_wchar_p)
    return isinstance(obj, pointer_types)


def _type_name(obj: Any) -> str:
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _judge(obj: Any, path: str, error: BaseException, by_value: bool) -> Diagnosis:
    kind = _kind(obj, by_value)
    if kind is None:
        kind = _kind_from_error(obj, error)
    reason, fix = _EXPLAIN[kind](obj, error, by_value)
    return Diagnosis(path=path, type=_type_name(obj), kind=kind, reason=reason, fix=fix,
                     error=_one_line(error), by_value=by_value)


def _too_deep(error: BaseException) -> bool:
    # cloudpickle turns RecursionError into PicklingError("... deep recursion ...")
    return isinstance(error, RecursionError) or (
        isinstance(error, pickle.PicklingError) and "recursion" in str(error))


def _kind_from_error(obj: Any, error: BaseException) -> str:
    if _too_deep(error):
        return "recursion"
    if isinstance(error, RuntimeError) and "through inheritance" in str(error):
        return "inherit"
    try:
        reducer = copyreg.dispatch_table.get(type(obj))
        reducer(obj) if reducer else obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    except Exception:
        if _defines_reduce(type(obj)):
            return "reduce"
    return "other"


def _defines_reduce(cls: type) -> bool:
    """True if ``cls`` itself (not a C base) customises how it pickles."""
    for klass in cls.__mro__:
        if klass is object:
            return False
        if any(name in vars(klass) for name in
               ("__reduce__", "__reduce_ex__", "__getstate__", "__getnewargs__")):
            return getattr(klass, "__module__", "") not in ("builtins",)
    return False


def _explain_lock(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        f"A {_type_name(obj)} coordinates the threads of one process; a copy in another "
        "process would guard nothing, so pickle refuses it.",
        f"create it {_INITIALIZER}; or, if it belongs to an object you send, drop it "
        "in __getstate__ and make a new one in __setstate__.",
    )


def _explain_thread(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        "A thread runs in this process only; it cannot be copied into another.",
        f"start the thread {_INITIALIZER}, or send only the data it works on.",
    )


def _explain_file(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    name = getattr(obj, "name", None)
    what = f"the open file {name!r}" if isinstance(name, str) else "an open file"
    return (
        f"It is {what}: an open file is a handle owned by this process, and its "
        "position and buffers cannot be copied.",
        f"send the file name and open it {_INITIALIZER}.",
    )


def _explain_socket(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        "A socket is a network connection owned by this process; another process "
        "cannot take over its state.",
        f"send the address and connect {_INITIALIZER}.",
    )


def _explain_sqlite(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        f"A sqlite3 {type(obj).__name__} holds an open database handle owned by this process.",
        "send the database path and call sqlite3.connect(path) in a pool initializer, so "
        "each worker opens its own connection once.",
    )


def _explain_generator(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        f"A {type(obj).__name__} is a paused function with a live frame; pickle cannot "
        "copy a running frame.",
        "send list(...) of its items, or send what creates it and make the generator "
        "in the worker.",
    )


def _explain_frame(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        "Frames and tracebacks are the live state of running code in this process.",
        "send the text instead (traceback.format_exc()), or the values you need from it.",
    )


def _explain_ctypes(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        "A ctypes pointer holds a raw memory address, which means nothing in another "
        "process.",
        "send the data it points to (bytes, a list, a NumPy array), or put it in "
        "multiprocessing.shared_memory and send the block's name.",
    )


MODULE_FIX = ("import the module inside the worker function instead of passing it, or use "
              "mpnb.Pool, which sends modules by name.")


def _explain_module(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (f"It is the module {obj.__name__!r}; stdlib pickle cannot send modules.", MODULE_FIX)


_BY_NAME = "stdlib pickle sends functions and classes by name, for the worker to import"


def _explain_lambda(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        f"It is a lambda; {_BY_NAME}, and a lambda has no name to import.",
        "define it with def in a %%mppool cell (or a module), or use mpnb.Pool, "
        "which sends notebook functions by value.",
    )


def _explain_local_function(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    outer = obj.__qualname__.split(".<locals>")[0]
    return (
        f"{obj.__qualname__} is defined inside the function {outer}; {_BY_NAME}, and a "
        "function nested in another cannot be imported.",
        "move it to the top level of a %%mppool cell and pass what it captured as "
        f"arguments with functools.partial({obj.__name__}, ...), or use mpnb.Pool.",
    )


def _explain_local_class(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    outer = obj.__qualname__.split(".<locals>")[0]
    return (
        f"The class {obj.__qualname__} is defined inside the function {outer}; "
        f"{_BY_NAME}, and a class made inside a function cannot be imported.",
        "define the class at the top level of a %%mppool cell or a module.",
    )


def _explain_main(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    what = "class" if isinstance(obj, type) else "function"
    return (
        f"The {what} {obj.__qualname__} is defined in the notebook (__main__); {_BY_NAME}, "
        "and a worker started by spawn or forkserver has its own __main__ without it: it "
        f"dies with AttributeError: Can't get attribute '{obj.__qualname__}' on "
        f"<module '__main__'> (from Python 3.14: module '__main__' has no attribute "
        f"'{obj.__qualname__}').",
        "put the definition in a %%mppool cell, which makes it importable, or use "
        "mpnb.Pool, which sends notebook functions by value.",
    )


def _explain_inherit(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        f"A multiprocessing {type(obj).__name__} can only reach a worker when the worker "
        "is started, not inside a task.",
        "pass it to the pool at start (Pool(initializer=init, initargs=(obj,)) and keep "
        "it in a global there), or use a multiprocessing.Manager() proxy.",
    )


def _explain_reduce(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        f"Its own pickling method raised {_one_line(error)}.",
        f"make {type(obj).__qualname__}.__reduce__ / __getstate__ return picklable state, "
        "or create the object inside the worker.",
    )


def _explain_recursion(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        "It is nested more deeply than pickle can follow (the recursion limit is "
        f"{sys.getrecursionlimit()}), as a long linked chain of objects is.",
        "send a flat form (a list of nodes, an array) and rebuild the links in the "
        "worker, or raise sys.setrecursionlimit in this process and the workers.",
    )


def _explain_other(obj: Any, error: BaseException, by_value: bool) -> tuple[str, str]:
    return (
        f"Pickle refuses it: {_one_line(error)}.",
        f"create it {_INITIALIZER}, or send the plain data it is built from.",
    )


_EXPLAIN: dict[str, Callable[[Any, BaseException, bool], tuple[str, str]]] = {
    "lock": _explain_lock,
    "thread": _explain_thread,
    "file": _explain_file,
    "socket": _explain_socket,
    "sqlite": _explain_sqlite,
    "generator": _explain_generator,
    "frame": _explain_frame,
    "ctypes": _explain_ctypes,
    "module": _explain_module,
    "lambda": _explain_lambda,
    "local_function": _explain_local_function,
    "local_class": _explain_local_class,
    "main": _explain_main,
    "inherit": _explain_inherit,
    "reduce": _explain_reduce,
    "recursion": _explain_recursion,
    "other": _explain_other,
}
