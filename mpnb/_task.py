"""The worker-side pieces that every kind of worker uses.

A local worker process (:mod:`mpnb._worker`) and a dask worker thread
(:mod:`mpnb.backends._dask_worker`) run a chunk the same way: load the
function and the items (a failure there fails every task of the chunk, see
:func:`load_failure`), call the function on each item as its :class:`Mode`
says (:func:`caller`), catch each task's exception as a :class:`Failure`,
and pack the values so that one that cannot be pickled fails its own task
alone (:func:`pack`).  How they capture output and report records is their
own: a local worker owns its process, a dask worker shares its threads.

This module imports nothing heavy: a local worker loads it at start-up.
"""

from __future__ import annotations

import _pickle as pickle  # the C pickler: the pickle module imports re, 3 ms of a worker's start
import io
import itertools
import os
import sys
import time

from mpnb._protocol import Mode, Record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a worker 3 ms of start-up
    from typing import Any, Callable

#: files whose frames a task's traceback leaves out: the workers' own code,
#: which the user did not write (see :func:`hide_frames_of`)
_HIDDEN: set[str] = set()


def hide_frames_of(module_file: str) -> None:
    """Leave the frames of ``module_file`` out of every :class:`Failure`'s traceback."""
    _HIDDEN.add(os.path.abspath(module_file))


hide_frames_of(__file__)  # the callers below run the user's function


# ------------------------------------------------------------ serialising


def dumps(obj: Any) -> bytes:
    # plain pickle is fastest and refuses (rather than mis-pickles) objects
    # whose class or function is not importable here; cloudpickle ships those
    try:
        return pickle.dumps(obj, -1)  # -1: the highest protocol
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(obj, -1)  # -1: the highest protocol


def loads(data: bytes) -> Any:
    # cell modules (mpnb.cells.cell_*) are found by mpnb.cells' own finder,
    # which looks afresh each time: no sys.path entry, no import caches
    return pickle.loads(data)


_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})


def is_plain(values: list) -> bool:
    """True when every value is a builtin scalar, at most in tuples: such
    values pickle with plain pickle and load anywhere (task arguments, one
    way; results, the other)."""
    kinds = set(map(type, values))  # at C speed: this runs on every argument and result
    if kinds <= _PLAIN:
        return True
    if kinds - _PLAIN != {tuple}:
        return False
    tuples = (value for value in values if type(value) is tuple)
    return set(map(type, itertools.chain.from_iterable(tuples))) <= _PLAIN


class _NotPlain(Exception):
    pass


class _PlainPickler(pickle.Pickler):
    """A pickler of builtin data only: the C pickler calls ``reducer_override``
    for every object but None, the bools and exact ints, floats, strs, bytes,
    lists, tuples, dicts, sets and frozensets (documented as "may not be
    called"; cloudpickle relies on it being called for the rest), so raising
    there refuses all else, at no cost per builtin value."""

    def reducer_override(self, obj: Any) -> Any:
        raise _NotPlain


def dumps_plain(value: Any) -> bytes | None:
    """``value`` pickled, in one pass, if it holds builtin data only (which
    loads anywhere); ``None`` if anything else is in it, a class, a function
    or an instance that must be sent the careful way."""
    buffer = io.BytesIO()
    try:
        _PlainPickler(buffer, -1).dump(value)  # -1: the highest protocol
    except _NotPlain:
        return None
    return buffer.getvalue()


class PackedValues:
    """Task values pickled one by one (``blobs``, ``None`` for a task that
    failed, a :class:`mpnb.shared.SharedResult` for one whose large buffers
    are in shared memory), with their types' names, so that a value the parent cannot load
    fails its own task alone instead of the whole message."""

    __slots__ = ("blobs", "kinds")

    def __init__(self, blobs, kinds):
        self.blobs = blobs
        self.kinds = kinds

    def __reduce__(self):
        return (PackedValues, (self.blobs, self.kinds))


def _result_error(value: Any, exc: BaseException) -> BaseException:
    """The pickle doctor's account of a return value that cannot be sent back:
    the path inside it (``result['conn']``), the type, why and the fix."""
    try:
        from mpnb.pickling import PicklingProblem, diagnose  # only on failure

        found = diagnose(value, by_value=True, name="result")
    except BaseException:  # the doctor must not hide the real error
        found = None
    if found is None:
        err: BaseException = pickle.PicklingError(
            f"the task's return value, a {type(value).__name__}, cannot be sent back "
            f"to the notebook: {exc}")
    else:
        err = PicklingProblem(found, found.returned())
    err.__cause__ = exc
    return err


# "module.Qualname" of each result type seen, for the parent's error messages
_TYPE_NAMES: dict = {}

#: set by a local worker (to its slot's path): results' large buffers then go
#: through shared-memory files (:func:`mpnb.shared.dump_result`); a dask
#: worker's go by value, as it may be on another machine
share_results: str | None = None


_shared_dumper: Callable[[Any], Any] | None = None


def _value_dumper() -> Callable[[Any], Any]:
    global _shared_dumper
    if share_results is None or "numpy" not in sys.modules:  # only arrays have such buffers
        return dumps
    if _shared_dumper is None:
        from mpnb.shared import dump_result, results_prefix

        prefix = results_prefix(share_results)
        _shared_dumper = dumps if prefix is None else lambda value: dump_result(value, prefix)
    return _shared_dumper


def pack(record: Record) -> Record:
    """``record`` with its values packed, unless all are plain; a value that
    cannot be pickled becomes its task's failure."""
    values, first, failures = record.values, record.first, record.failures
    if is_plain(values):
        return record
    blobs: list[Any] = []
    kinds: list[str] = []
    names = _TYPE_NAMES
    dump = _value_dumper()
    for i, value in enumerate(values):
        kind = type(value)
        name = names.get(kind)
        if name is None:
            name = names[kind] = f"{kind.__module__}.{kind.__qualname__}"
        kinds.append(name)
        if first + i in failures:
            blobs.append(None)
            continue
        try:
            blobs.append(dump(value))
        except BaseException as exc:  # SystemExit from a __reduce__ too: the worker lives on
            blobs.append(None)
            failures[first + i] = Failure.from_exception(_result_error(value, exc))
    return record._replace(values=PackedValues(blobs, kinds))


def run_on_thread(seq: int, task: Callable[[Any], Any], items: list, local: Any, position: list[int]) -> Record:
    """Run a chunk's tasks on a thread that shares its process (a dask
    worker's thread, a subinterpreter's): each task's output goes to its own
    list through ``local.segments`` (:mod:`mpnb._capture`), ``position[0]``
    names the task running; the chunk's one record."""
    values: list[Any] = []
    failures: dict[int, Failure] = {}
    outputs: dict[int, list] = {}
    starts: dict[int, float] = {}
    for pos, item in enumerate(items):
        starts[pos] = time.monotonic()
        position[0] = pos
        segments: list[tuple[str, str]] = []
        local.segments = segments
        try:
            values.append(task(item))
        except BaseException as exc:
            values.append(None)
            failures[pos] = Failure.from_exception(exc)
        finally:
            local.segments = None
        if segments:
            outputs[pos] = segments
    return Record(seq, 0, values, failures, outputs, starts, time.monotonic(), True)


class Failure:
    """A task's exception, made safe to send: the exception if it pickles,
    its type and message always, and the traceback as plain frames so the
    parent can show the source lines of notebook cells, which only it has."""

    __slots__ = ("exc_bytes", "type_name", "message", "frames", "chained")

    def __init__(self, exc_bytes, type_name, message, frames, chained):
        self.exc_bytes = exc_bytes
        self.type_name = type_name
        self.message = message
        self.frames = frames
        self.chained = chained

    def __reduce__(self):
        return (Failure, (self.exc_bytes, self.type_name, self.message, self.frames, self.chained))

    @classmethod
    def from_exception(cls, exc: BaseException) -> "Failure":
        import traceback  # only on failure: it is slow to import at start-up

        frames = [
            (f.filename, f.lineno, f.name, f.line or "")
            for f in traceback.extract_tb(exc.__traceback__)
            if os.path.abspath(f.filename) not in _HIDDEN
        ]
        chained = ""
        if exc.__cause__ is not None:
            chained = "".join(traceback.format_exception(exc.__cause__)) + (
                "\nThe above exception was the direct cause of the following exception:\n\n"
            )
        elif exc.__context__ is not None and not exc.__suppress_context__:
            chained = "".join(traceback.format_exception(exc.__context__)) + (
                "\nDuring handling of the above exception, another exception occurred:\n\n"
            )
        tb, exc.__traceback__ = exc.__traceback__, None
        try:
            exc_bytes = _exception_bytes(exc)
        finally:
            exc.__traceback__ = tb
        try:
            message = str(exc)
        except Exception:
            message = "<str() failed>"
        kind = type(exc)
        return cls(exc_bytes, f"{kind.__module__}.{kind.__qualname__}", message, frames, chained)


def _exception_bytes(exc: BaseException) -> bytes | None:
    """``exc`` pickled so that it loads as an instance of its own class.

    Pickle rebuilds an exception by calling its class with ``exc.args``,
    which fails for a class whose ``__init__`` wants other arguments
    (``def __init__(self, a, b): super().__init__(f"{a}{b}")``).  Such an
    exception is sent as its class, ``args`` and ``__dict__`` instead and
    rebuilt without calling ``__init__`` (as tblib does): the parent gets the
    same type, message, attributes and notes."""
    try:
        data = dumps(exc)
    except Exception:
        data = None
    if data is not None and not _customised(type(exc)):
        return data  # a builtin's own reduce: it loads again for sure
    if data is not None:
        try:
            loads(data)
            return data
        except BaseException:  # SystemExit from an __init__ too: it is data here
            pass
    fields = {}
    if isinstance(exc, OSError):  # kept in C fields, not in __dict__; a None set
        # explicitly would show in str() ("... -> None"), so only those given
        fields = {name: getattr(exc, name) for name in _OSERROR_FIELDS
                  if getattr(exc, name) is not None}
    try:
        return dumps(_ExceptionState(type(exc), exc.args, dict(vars(exc)), fields))
    except Exception:
        return None  # the parent shows the type and message as RemoteTaskError


def _customised(cls: type) -> bool:
    """True if a class of the user's takes part in building ``cls``'s instances."""
    for klass in cls.__mro__:
        if klass.__module__ == "builtins":
            return False
        if any(name in vars(klass) for name in _BUILDERS):
            return True
    return False


_BUILDERS = ("__init__", "__new__", "__reduce__", "__reduce_ex__", "__setstate__",
             "__getstate__", "__getnewargs__", "__getnewargs_ex__")


_OSERROR_FIELDS = ("errno", "strerror", "filename", "filename2")


class _ExceptionState:
    """Pickles as a call to :func:`_rebuild_exception`."""

    def __init__(self, cls: type, args: tuple, state: dict, fields: dict):
        self.cls, self.args, self.state, self.fields = cls, args, state, fields

    def __reduce__(self):
        return (_rebuild_exception, (self.cls, self.args, self.state, self.fields))


def _rebuild_exception(cls: type[BaseException], args: tuple, state: dict, fields: dict) -> BaseException:
    """An instance of ``cls`` with these ``args`` and attributes, made
    without calling ``cls.__init__``."""
    try:
        exc = cls.__new__(cls, *args)
    except TypeError:  # a __new__ of the user's with its own signature
        exc = cls.__new__(cls)
    exc.args = args
    for name, value in fields.items():
        setattr(exc, name, value)
    # straight into __dict__: a property without a setter must not stop it
    exc.__dict__.update(state)
    return exc


# ------------------------------------------------------------------ calling


def caller(fn: Callable, mode: int) -> Callable:
    """``fn`` as a function of one task's item, as the call's :class:`Mode` says."""
    if mode == Mode.ARG:
        return fn
    if mode == Mode.STAR:
        return lambda item: fn(*item)
    return lambda item: fn(*item[0], **item[1])


def load_failure(seq: int, count: int, exc: BaseException) -> Record:
    """The record of chunk ``seq`` whose function or items did not load in
    the worker (most often a module the worker cannot import): each of its
    ``count`` tasks fails with ``exc``."""
    failure = Failure.from_exception(exc)
    now = time.monotonic()
    return Record(seq, 0, [None] * count, dict.fromkeys(range(count), failure), {}, {0: now}, now, True)
