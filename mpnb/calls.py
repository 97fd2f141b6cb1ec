"""The records a pool and its engine share: calls, chunks, and how they pickle.

A :class:`Call` is one ``map``/``imap``/``submit``/``apply``: the function
(pickled once), the options, and the outcomes delivered so far.  A
:class:`Chunk` is a run of a call's tasks that travel together.  The pool
makes them; an engine runs the chunks and delivers each task's value or
exception into its call (:meth:`Call.deliver`), from its own thread; the
caller waits on ``Call.cond``.
"""

from __future__ import annotations

import functools
import io
import itertools
import os
import pickle
import sys
import threading
import time
from concurrent.futures import CancelledError, Future
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from mpnb import serialize
from mpnb._protocol import Mode, Record
from mpnb._task import PackedValues, dumps_plain
from mpnb._repr import short_repr
from mpnb.errors import failure_here, note
from mpnb.shared import SharedArrays

__all__ = ["Call", "Chunk", "MapResults", "Outcomes", "arguments", "as_list", "describe", "dump_items", "in_batches",
           "read_record", "task_errors"]


def _signals_end_waits() -> bool:
    """Whether a signal's handler runs inside an untimed lock wait: on Linux
    with glibc (its semaphore wait returns on EINTR). Windows before Python
    3.14, macOS and other C libraries run it only once a wait ends."""
    try:
        return sys.platform.startswith("linux") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


#: the longest a caller without a live view waits before it looks at Ctrl-C
#: again: where SIGINT's handler runs in the wait itself, until its call wakes it
WAIT_TIMEOUT: float | None = None if _signals_end_waits() else 0.05
#: how long a call's chunks are pickled before those pickled are sent (see
#: in_batches): 8 pandas frames of 12 MB took some 12 ms each, written to
#: shared memory, and their groupby 0.31 s against 0.36 sent together; the
#: 8 chunks of 20,000 trivial tasks pickle in about 1 ms
SEND_AFTER = 0.002
#: the least work, by its function's pace, of an automatic chunk near the end of a map (see chunk_sizes)
TAIL_SECONDS = 0.02


class Call:
    """One map/imap/submit/apply: its function, options and outcomes so far.

    The engine delivers; the caller reads under ``cond``.  ``results`` maps
    a task index to its value, or to its exception when the index is in
    ``failed``; ``output`` holds what tasks printed, for those that did.
    """

    _ids = itertools.count()

    def __init__(self, fn: Callable | None, fn_bytes: bytes | None, timeout: float | None, mode: int,
                 future: Future | None = None):
        self.id = next(self._ids)
        self.fn = fn  # for an engine that runs tasks in this process
        self.fn_bytes = fn_bytes  # for the others, pickled once
        self.timeout = timeout
        self.mode = mode
        self.future = future
        self.results: dict[int, Any] | MapResults = {}
        self.failed: set[int] = set()
        self.output: dict[int, list] = {}
        self.contiguous = 0  # tasks 0 .. contiguous-1 have all ended
        # a map's caller polls for progress and needs waking only at the end
        # or on a failure; waking it per delivery would cost throughput
        self._total: int | None = None
        self.cancelled = False
        # seconds a task takes in a worker (moving average), once measured or
        # remembered from an earlier call of the same function
        self.task_seconds: float | None = None
        self.pace_key = hash(fn_bytes)
        self.cond = threading.Condition(threading.Lock())
        # large arrays in the arguments, written once to shared memory
        self.shares: SharedArrays | None = None
        # where its results are stored across kernels (mpnb.cache.CallCache), or None
        self.cache: Any = None

    @property
    def total(self) -> int | None:
        """How many tasks the call has, once known (a map's at once, a lazy imap's at its input's end)."""
        return self._total

    @total.setter
    def total(self, n: int | None) -> None:
        self._total = n
        if n is not None and not self.results:
            # a list, not a dict: a run of tasks lands with one slice assignment
            self.results = MapResults(n)

    def values(self) -> list[Any]:
        """Every task's outcome by index, once all ended (a map's result):
        a map's list of places itself, not a copy (nothing writes to it
        once every task ended)."""
        results = self.results
        if type(results) is MapResults:
            return results.slots
        return list(map(results.__getitem__, range(self.total or len(results))))

    def snapshot(self, n: int) -> list[Any]:
        """The outcomes of tasks ``0`` to ``n - 1`` so far; one not finished holds a ``CancelledError``."""
        with self.cond:
            results = self.results
            if len(results) == n:
                return self.values()
            return [results[i] if i in results else CancelledError(f"task {i} did not finish") for i in range(n)]

    def release(self) -> None:
        """Free what the call's arguments hold outside the pickles (shared arrays)."""
        if self.shares is not None:
            self.shares.release()

    def wake(self) -> None:
        """Wake the caller waiting for this call: :meth:`deliver` does when
        every task has its outcome, a task failed or output came, and
        ``Pool.cancel`` when it stops the call; a caller waiting without a
        live view wakes for nothing else."""
        with self.cond:
            self.cond.notify_all()

    def deliver(self, indices: Sequence[int], values: list[Any], failed: Iterable[int], output: dict[int, list]) -> None:
        with self.cond:
            results = self.results
            if type(results) is MapResults and indices and indices[-1] - indices[0] == len(indices) - 1:
                results.put_run(indices[0], values)
            else:
                results.update(zip(indices, values))
            self.failed.update(failed)
            stored = self.cache is not None and [i for i in indices if i in self.failed]
            self.output.update(output)
            results, contiguous = self.results, self.contiguous
            if indices and indices[0] == contiguous and indices[-1] - contiguous == len(indices) - 1:
                contiguous += len(indices)  # the usual case: the next run of tasks
            if type(results) is MapResults:
                contiguous = results.first_missing(contiguous)  # at C speed: a map may have many
            else:
                while contiguous in results:
                    contiguous += 1
            self.contiguous = contiguous
            if self.total is None or len(results) >= self.total or failed or output:
                self.cond.notify_all()  # see wake
        if stored is not False:
            self.cache.put(indices, values, stored)
        future = self.future
        if future is not None:
            self.release()  # before the result is seen: nothing is left once it is
            future._mpnb_output = output.get(0, ())  # type: ignore[attr-defined]
            try:
                if self.failed:
                    future.set_exception(values[0])
                else:
                    future.set_result(values[0])
            except Exception:  # already cancelled by the user
                pass

    def first_failure(self) -> int | None:
        return min(self.failed) if self.failed else None


class MapResults:
    """A map's outcomes by task index: ``dict``'s reading methods over a
    list of ``total`` places, so a run of values lands with one slice
    assignment and the result is one list copy.  ``filled`` marks the
    places that hold an outcome, one byte each, so that counting them and
    finding the first empty one run at C speed and never compare values."""

    __slots__ = ("slots", "filled", "count")

    def __init__(self, total: int):
        self.slots: list[Any] = [None] * total
        self.filled = bytearray(total)
        self.count = 0

    def put_run(self, first: int, values: list[Any]) -> None:
        end = first + len(values)
        self.count += len(values) - self.filled.count(1, first, end)
        self.filled[first:end] = b"\x01" * len(values)
        self.slots[first:end] = values

    def update(self, pairs: Iterable[tuple[int, Any]]) -> None:
        slots, filled = self.slots, self.filled
        for index, value in pairs:
            self.count += not filled[index]
            filled[index] = 1
            slots[index] = value

    def first_missing(self, start: int) -> int:
        """The first index from ``start`` without an outcome (``total`` when none is missing)."""
        found = self.filled.find(0, start)
        return len(self.slots) if found < 0 else found

    def __len__(self) -> int:
        return self.count

    def __contains__(self, index: object) -> bool:
        return type(index) is int and 0 <= index < len(self.slots) and self.filled[index] == 1

    def __getitem__(self, index: int) -> Any:
        if not self.filled[index]:
            raise KeyError(index)
        return self.slots[index]

    def get(self, index: int, default: Any = None) -> Any:
        return self.slots[index] if index in self else default

    def pop(self, index: int) -> Any:
        value = self[index]
        self.slots[index] = None
        self.filled[index] = 0
        self.count -= 1
        return value

    def __iter__(self) -> Iterator[int]:
        return (i for i, mark in enumerate(self.filled) if mark)


class Chunk:
    """Tasks of one call that travel together: their indices in the call,
    their items, and the items pickled (``data``, None until needed)."""

    __slots__ = ("seq", "call", "indices", "items", "data", "sent", "careful")
    _seqs = itertools.count()

    def __init__(self, call: Call, indices: Sequence[int], items: list, data: bytes | None):
        self.seq = next(self._seqs)
        self.call, self.indices, self.items, self.data = call, indices, items, data
        self.sent = 0.0
        #: run its tasks one by one, each reported at once (after a crash
        #: inside a batch of them, to find the culprit)
        self.careful = False

    def rest(self, positions: Iterable[int]) -> "Chunk":
        """A new chunk of the tasks at ``positions``, to run again."""
        positions = list(positions)
        return Chunk(self.call, [self.indices[p] for p in positions], [self.items[p] for p in positions], None)


def chunk_sizes(n: int, workers: int, pace: float | None) -> int | Iterator[int]:
    """The automatic chunk sizes of a map of ``n`` tasks, given ``pace``, the
    seconds a task of its function took lately (``None`` when not known yet).

    ``multiprocessing.Pool``'s size is ``n`` ÷ (4 × ``workers``): 4 chunks a
    worker.  Once the pace is known, the chunks from the middle of the map on
    get smaller instead, each a share of what is left (``left`` ÷ (2 ×
    ``workers``)) but at least ``TAIL_SECONDS`` of work: a worker that fell
    behind (a busy machine, a slower task) then leaves a short tail, not one
    of its chunks, for the others to wait on.  Trivial tasks keep the fixed
    size: their least chunk is over it."""
    most = max(1, -(-n // (4 * workers)))
    least = most if pace is None else max(1, int(TAIL_SECONDS / max(pace, 1e-9)))
    if least >= most:
        return most
    return _shrinking(n, workers, most, least)


def _shrinking(n: int, workers: int, most: int, least: int) -> Iterator[int]:
    left = n
    while left > 0:
        size = min(most, max(least, -(-left // (2 * workers))), left)
        yield size
        left -= size


def batches(items: Iterable[Any], sizes: int | Iterator[int]) -> Iterator[list]:
    """``items`` in lists of ``sizes`` items each (a chunksize: all of it)."""
    if isinstance(sizes, int):
        if type(items) is list:  # a map's: slices, at C speed
            return (items[i:i + sizes] for i in range(0, len(items), sizes))
        iterator = iter(items)
        return iter(lambda: list(itertools.islice(iterator, sizes)), [])
    return _batches_of(items, sizes)


def _batches_of(items: Iterable[Any], sizes: Iterator[int]) -> Iterator[list]:
    iterator = iter(items)
    for size in sizes:
        batch = list(itertools.islice(iterator, size))
        if not batch:
            return
        yield batch


def as_list(items: Iterable[Any]) -> list[Any]:
    """A map's items as a list: a list is not copied (nor does multiprocessing.Pool.map copy one)."""
    return items if type(items) is list else list(items)


def arguments(mode: int, item: Any) -> tuple[tuple, dict]:
    """A task's item as the ``(args, kwargs)`` its function is called with."""
    if mode == Mode.ARG:
        return (item,), {}
    if mode == Mode.KWARGS:
        return item
    return tuple(item), {}


def describe(call: Call, index: int, item: Any) -> str:
    """``task 3 (argument 7)``: how errors and views name a task."""
    args, kwargs = arguments(call.mode, item)
    label = f"task {index}"
    if call.mode == Mode.ARG:
        return f"{label} (argument {short_repr(args[0])})"
    parts = [short_repr(a) for a in args] + [f"{k}={short_repr(v)}" for k, v in kwargs.items()]
    return f"{label} (arguments ({', '.join(parts)}))"


def task_errors(chunk: Chunk, positions: Iterable[int], make_error: Callable[[str], BaseException],
                place: str) -> tuple[list[int], list[BaseException], dict[int, str]]:
    """The errors of a chunk's tasks at ``positions``: their indices, the
    exceptions (``make_error(task description)``, noted with the task and
    ``place``) and the one-line descriptions the monitor records."""
    indices, values, errors = [], [], {}
    for pos in positions:
        index = chunk.indices[pos]
        where = describe(chunk.call, index, chunk.items[pos])
        exc = note(make_error(where), where + place)
        indices.append(index)
        values.append(exc)
        errors[index] = f"{type(exc).__name__}: {exc}"
    return indices, values, errors


class Outcomes(NamedTuple):
    """What a worker's record says of its chunk, in the call's terms."""

    indices: Sequence[int]  #: the tasks it covers
    values: list[Any]  #: their values; a failed task's is its exception
    failed: list[int]  #: the tasks that failed
    errors: dict[int, str]  #: each failure in one line, for the monitor
    output: dict[int, list]  #: what each task printed, by index


def read_record(chunk: Chunk, record: Record, place: str) -> Outcomes:
    """The outcomes in a worker's ``record`` of ``chunk`` (a local worker's,
    or a dask worker's); ``place`` says where the tasks ran, for errors."""
    call, first = chunk.call, record.first
    unloadable: dict[int, tuple[str, BaseException]] = {}
    values = record.values
    if type(values) is PackedValues:
        values = _unpack(values, first, unloadable)
    errors: dict[int, str] = {}
    failed = []
    if record.failures or unloadable:  # (at chunksize 1 a record per task: the usual case skips this)
        for pos, failure in itertools.chain(record.failures.items(), unloadable.items()):
            index = chunk.indices[pos]
            exc = failure_here(failure, f"{describe(call, index, chunk.items[pos])} {place}")
            values[pos - first] = exc
            failed.append(index)
            errors[index] = f"{type(exc).__name__}: {exc}"
    output = {chunk.indices[pos]: segments for pos, segments in record.outputs.items()} if record.outputs else {}
    return Outcomes(chunk.indices[first : first + len(values)], values, failed, errors, output)


def _unpack(packed: PackedValues, first: int, unloadable: dict[int, tuple[str, BaseException]]) -> list[Any]:
    """The values of a record whose values were not all plain, each loaded
    alone: one that cannot be loaded here is put in ``unloadable`` by its
    position, as ``(type name, exception)``, and fails its task alone."""
    values: list[Any] = []
    for i, blob in enumerate(packed.blobs):
        try:
            # bytes, or a result whose buffers came through shared memory (mpnb.shared)
            values.append(None if blob is None else pickle.loads(blob) if type(blob) is bytes else blob.load())
        except BaseException as exc:  # SystemExit too: loading runs the value's own code
            values.append(None)
            unloadable[first + i] = (packed.kinds[i], exc)
    return values


# ---------------------------------------------------------------- pickling


def in_batches(chunks: Iterable[tuple[int, Chunk]]) -> Iterator[list[Chunk]]:
    """The chunks of ``(tasks so far, chunk)`` pairs, pickled as they come,
    in lists to send: all in one, but once pickling took ``SEND_AFTER``
    since the last list, those pickled so far.  Chunks whose large arguments
    are written to shared memory then reach the workers while the rest are
    pickled.  Chunks with no task (its only task failed to pickle) are left out."""
    batch: list[Chunk] = []
    since = time.perf_counter()
    for _, chunk in chunks:
        if chunk.indices:
            batch.append(chunk)
        if batch and time.perf_counter() - since > SEND_AFTER:
            yield batch
            batch, since = [], time.perf_counter()
    if batch:
        yield batch


def dump_items(items: list, call: Call | None = None) -> bytes:
    """Pickle a chunk's items; large numpy arrays go through shared memory,
    once per ``call`` (see :mod:`mpnb.shared`), when a call is given."""
    # cloudpickle is needed for anything that may be or hold a __main__
    # object; for plain data the C pickler is several times faster
    data = dumps_plain(items)
    if data is not None:
        return data
    if call is None or "numpy" not in sys.modules:
        return serialize.dumps(items)
    if call.shares is None:
        call.shares = SharedArrays()
    buffer = io.BytesIO()
    _sharing_pickler()(buffer, call.shares).dump(items)
    return buffer.getvalue()


@functools.cache
def _sharing_pickler() -> type:
    class SharingPickler(serialize.Pickler):
        """mpnb's pickler, sending large numpy arrays as shared-memory references."""

        def __init__(self, file, shares: SharedArrays):
            super().__init__(file)
            self._shares = shares

        def reducer_override(self, obj):
            reduced = self._shares.reduce(obj)
            if reduced is not None:
                return reduced
            return super().reducer_override(obj)

    return SharingPickler
