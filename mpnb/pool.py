"""mpnb.Pool: a process pool that behaves in a notebook.

Threads, queues and processes::

    caller thread (the cell)        manager thread                 worker processes
    ------------------------        --------------                 ----------------
    map / imap / submit / apply     _Manager.run                   _worker.main
      | _Call (fn pickled once)       |                               |
      | _Chunk ---- commands -------> | queue --> chunks per worker,  |
      |             (+ wake-up pipe)  |   one message -- pipe ------> | capture output,
      |                               |                               | write slot, call fn
      |                               | <------ records ---- pipe --- | (value/failure,
      | <--- outcomes (_Call.cond) -- | deliver, feed Monitor         |  output, times)
      | replay output in task order   |                               |
      | Ctrl-C: cancel -------------> | SIGKILL the call's workers    |
                                      | sentinel: crash -> fail the task on the slot,
                                      |           requeue the rest, start a new worker
                                      | slot too old: timeout -> SIGKILL, same path

The manager thread owns every worker; the caller only sends commands and
waits on its call, in short steps so that Ctrl-C (a ``KeyboardInterrupt`` in
the main thread) is seen at once.  An idle worker gets one chunk; once a
call's tasks prove fast (its pace, remembered per function), each worker
keeps about 10 ms of its chunks queued, sent several to a message, and
answers with the records of several chunks at once: a task at chunksize 1
no longer costs a round trip, and still fails and reports alone.  Large
numpy arguments go to the workers once per call through shared memory
(:mod:`mpnb.shared`).  A dead or killed worker affects only the chunks it
held: the task on its slot fails with an error that names it, the tasks it
had not reported run again elsewhere, and a new worker replaces it.  Workers are started by a backend (``mpnb/backends``); this module is the
policy.
"""

from __future__ import annotations

import atexit
import functools
import io
import itertools
import linecache
import logging
import os
import pickle
import reprlib
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import OrderedDict, deque
from concurrent.futures import CancelledError, Executor, Future
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait as wait_for
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from mpnb import limits, serialize, view
from mpnb._protocol import FUNCTION_CACHE_SIZE, STOP, Kind, Mode, Record, Run
from mpnb._task import Failure, PackedValues, is_plain
from mpnb.shared import SharedArrays
from mpnb.monitor import Monitor, process_stopped

if TYPE_CHECKING:  # pragma: no cover
    from mpnb.pickling import Diagnosis
    from mpnb.timeline import Timeline

__all__ = [
    "Pool",
    "RemoteTaskError",
    "RemoteTraceback",
    "TaskTimeoutError",
    "WorkerCrashedError",
]

ON_ERROR = ("raise", "collect")
BACKENDS = ("local", "dask")

# how often a waiting caller wakes to notice Ctrl-C and replay output
_POLL = 0.05
# how long an interrupted call waits for its workers to be killed
_CANCEL_WAIT = 1.5
# a call whose chunks take less than this may queue one more chunk on a busy
# worker, so it never idles for a round trip; slower ones must not, or a
# chunk could wait behind a long task while another worker idles
_FAST = 0.05
# how long a worker may take to load a chunk's function and arguments before
# its first task starts, on top of the task timeout
_LOAD_GRACE = 30.0
# a fast call keeps about this much work (by its measured pace) queued on
# each worker, sent in one message, so no worker waits for a round trip and
# the last tasks still spread over the workers
_AHEAD_SECONDS = 0.01
# and at most this many chunks per worker
_MAX_AHEAD = 64
# functions whose pace the pool remembers from one call to the next
_PACES_KEPT = 32
# consecutive workers that die before they are ready before the pool gives up
_MAX_START_FAILURES = 3
# how long a worker may take to start (its initializer included), in seconds
START_TIMEOUT_VAR = "MPNB_START_TIMEOUT"
_DEFAULT_START_TIMEOUT = 60.0


class WorkerCrashedError(BrokenProcessPool):
    """A worker process died (segfault, os._exit, SIGKILL, OOM) while running the task."""


class TaskTimeoutError(TimeoutError):
    """The task ran longer than the pool's timeout; its worker was killed and replaced."""


class RemoteTaskError(Exception):
    """A task's exception that could not be sent back as itself (shown by type and message)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (set as ``__cause__``)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


# ---------------------------------------------------------------- describing

class _Repr(reprlib.Repr):
    """reprlib, but an object whose repr is too long shows as its type,
    never as a cut that hides the type (``<unlocked _thread.... at 0x...>``)."""

    def repr_instance(self, x: Any, level: int) -> str:
        kind = type(x)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        try:
            text = repr(x)
        except Exception:
            return f"<{name} object>"
        if len(text) <= self.maxother:
            return text
        if text.startswith("<"):  # the default form: its middle says nothing
            return f"<{name} object>"
        return super().repr_instance(x, level)


_repr = _Repr()
_repr.maxstring = 40
_repr.maxother = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxlevel = 2


def _short_repr(obj: Any) -> str:
    try:
        return _repr.repr(obj)
    except Exception:
        return f"<{type(obj).__name__}>"


def _describe(call: "_Call", index: int, item: tuple) -> str:
    if call.bare:
        item = (item,)
    args, kwargs = item if call.with_kwargs else (item, {})
    if call.style == "map" and len(args) == 1 and not kwargs:
        shown = f"argument {_short_repr(args[0])}"
    else:
        parts = [_short_repr(a) for a in args] + [f"{k}={_short_repr(v)}" for k, v in kwargs.items()]
        shown = f"arguments ({', '.join(parts)})"
    return f"task {index} ({shown})"


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _likely_cause(exitcode: int | None, reason: str) -> str:
    if exitcode == -signal.SIGSEGV or exitcode == -getattr(signal, "SIGBUS", 0):
        return "a segmentation fault in native code (a C extension, ctypes, or a library bug)"
    if exitcode == -signal.SIGKILL:
        return (
            "the process was killed from outside; most often the out-of-memory killer "
            "stopping a task that used too much memory (check RSS in pool.monitor.sample())"
        )
    if exitcode == -signal.SIGABRT:
        return "abort() in native code (a failed assertion in a C library)"
    if exitcode is not None and exitcode >= 0:
        return "the task or a library ended the process (os._exit or exit() in native code)"
    return "the process was stopped by a signal"


def _remote_exception(failure: Failure, where: str) -> BaseException:
    exc: Any = None
    if failure.exc_bytes is not None:
        try:
            exc = pickle.loads(failure.exc_bytes)
        except BaseException:  # whatever loading raises (SystemExit too) is the task's, not ours
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteTaskError(f"{failure.type_name}: {failure.message}")
    lines = [failure.chained, "Traceback (most recent call last):\n"]
    for filename, lineno, name, line in failure.frames:
        # cell sources live in the notebook's linecache, not in the worker's
        line = line or linecache.getline(filename, lineno).strip()
        lines.append(f'  File "{filename}", line {lineno}, in {name}\n')
        if line:
            lines.append(f"    {line}\n")
    lines.append(f"{failure.type_name.removeprefix('builtins.')}: {failure.message}\n")
    exc.__cause__ = RemoteTraceback("\n" + "".join(lines))
    exc.add_note(f"mpnb: raised by {where}")
    return exc


def _replay(segments) -> None:
    """Write a task's captured output to this process's current streams."""
    if not segments:
        return
    streams = {"stdout": sys.stdout, "stderr": sys.stderr}
    for name, text in segments:
        stream = streams.get(name)
        if stream is not None:
            stream.write(text)
    for stream in streams.values():
        try:
            stream.flush()
        except Exception:
            pass


# ------------------------------------------------------------------- records


class _Call:
    """One map/imap/submit: its function, options and outcomes so far.

    The manager thread delivers; the caller reads under ``cond``.  ``results``
    maps a task index to its value, or to its exception when the index is in
    ``failed``; ``output`` holds what tasks printed, for those that did.
    """

    _ids = itertools.count()

    def __init__(self, fn_bytes: bytes, timeout: float | None, style: str, future: Future | None = None):
        self.id = next(self._ids)
        self.fn_bytes = fn_bytes
        self.timeout = timeout
        self.style = style  # "map", "star" or "submit": how tasks are described
        self.with_kwargs = style == "submit"
        self.bare = False  # items are single arguments, not argument tuples
        self.future = future
        self.results: dict[int, Any] = {}
        self.failed: set[int] = set()
        self.output: dict[int, list] = {}
        self.contiguous = 0  # tasks 0 .. contiguous-1 have all ended
        # a map's caller polls for progress and needs waking only at the end
        # or on a failure; waking it per delivery would cost throughput
        self.total: int | None = None
        self.cancelled = False
        # seconds a task takes in a worker (moving average), once measured or
        # remembered from an earlier call of the same function
        self.task_seconds: float | None = None
        self.pace_key = hash(fn_bytes)
        self.cond = threading.Condition(threading.Lock())
        # large arrays in the arguments, written once to shared memory
        self.shares: SharedArrays | None = None

    def release(self) -> None:
        """Free what the call's arguments hold outside the pickles (shared arrays)."""
        if self.shares is not None:
            self.shares.release()

    def deliver(self, indices: list[int], values: list[Any], failed: Iterable[int], output: dict[int, list]) -> None:
        with self.cond:
            self.results.update(zip(indices, values))
            self.failed.update(failed)
            self.output.update(output)
            results, contiguous = self.results, self.contiguous
            if indices and indices[0] == contiguous and indices[-1] - contiguous == len(indices) - 1:
                contiguous += len(indices)  # the usual case: the next run of tasks
            while contiguous in results:
                contiguous += 1
            self.contiguous = contiguous
            if self.total is None or len(results) >= self.total or failed:
                self.cond.notify_all()
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


class _Chunk:
    __slots__ = ("seq", "call", "indices", "items", "data", "sent")
    _seqs = itertools.count()

    def __init__(self, call: _Call, indices: list[int], items: list[tuple], data: bytes | None):
        self.seq = next(self._seqs)
        self.call, self.indices, self.items, self.data = call, indices, items, data
        self.sent = 0.0


def _dump_items(items: list, call: _Call | None = None) -> bytes:
    """Pickle a chunk's arguments; large numpy arrays go through shared
    memory, once per ``call`` (see :mod:`mpnb.shared`)."""
    # cloudpickle is needed for anything that may be or hold a __main__
    # object; for plain data the C pickler is several times faster
    if is_plain(items):
        return pickle.dumps(items, pickle.HIGHEST_PROTOCOL)
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


# ------------------------------------------------------------------- manager


class _WorkerState:
    __slots__ = ("handle", "ready", "chunks", "next_pos", "since", "kill_reason", "functions", "init_failure",
                 "open", "started")

    def __init__(self, handle):
        self.handle = handle
        self.ready = False
        self.started = time.monotonic()  # start-up is bounded (MPNB_START_TIMEOUT)
        # chunks sent, oldest first; the first is running, one more may wait
        # in the pipe so the worker never idles for a round trip
        self.chunks: deque[_Chunk] = deque()
        self.next_pos = 0  # first position of chunks[0] not yet reported
        self.since = 0.0  # when chunks[0] was sent or last reported
        self.kill_reason: tuple | None = None
        self.functions: OrderedDict[int, None] = OrderedDict()
        self.init_failure: Failure | None = None
        self.open = True  # the connection has not reached EOF


class _Manager(threading.Thread):
    """Owns the workers: dispatches chunks, collects records, handles deaths."""

    def __init__(self, backend, workers: int, monitor: Monitor, initializer: str | None = None,
                 start_timeout: float = _DEFAULT_START_TIMEOUT):
        super().__init__(name="mpnb-pool-manager", daemon=True)
        self.backend = backend
        self.initializer = initializer  # its qualified name, for errors
        self.start_timeout = start_timeout
        self.size = workers
        self.monitor = monitor
        self.workers: dict[int, _WorkerState] = {}
        self.queue: deque[_Chunk] = deque()
        self.commands: SimpleQueue = SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # closed only when nobody can write to it any more (the read end closes when run() ends)
        weakref.finalize(self, os.close, self._wake_w)
        self._worker_ids = itertools.count()
        self._start_failures = 0
        self._start_error: BaseException | None = None
        self._cancels: list[tuple[set[int], threading.Event]] = []
        # seconds per task of recent functions, by _Call.pace_key
        self._paces: OrderedDict[int, float] = OrderedDict()
        self.stopping = False
        self.stopped = threading.Event()
        self.error: BaseException | None = None

    # -- commands from other threads

    def command(self, *message) -> None:
        self.commands.put(message)
        if self.stopped.is_set():  # nobody will read it: answer it here
            self._refuse_after_stop()
            return
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full (it will wake anyway) or already closed
            pass

    def kill_all_now(self) -> None:
        """Called at exit: kill every worker without waiting for anything."""
        for state in list(self.workers.values()):
            state.handle.kill()
        self.command("shutdown", True)

    # -- the loop

    def run(self) -> None:
        try:
            self._start_missing()
            while True:
                self._handle_commands()
                # dispatch first: it may drop the last queued chunks (cancelled
                # futures), and then nothing would wake the wait below (gh-94440)
                self._dispatch()
                if self.stopping and not self.queue and not any(w.chunks for w in self.workers.values()):
                    break
                self._wait_and_handle()
                self._check_timeouts()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            self.error = exc
            traceback.print_exc(file=sys.__stderr__)
            self._fail_everything(BrokenProcessPool(f"the mpnb pool stopped working: {exc!r}"))
        finally:
            try:
                self._stop_workers()
            finally:  # whatever happened, nobody may wait on this pool forever
                self.stopped.set()
                self._refuse_after_stop()
                os.close(self._wake_r)
                self.backend.close()

    def _refuse_after_stop(self) -> None:
        """Answer the commands that arrived after the loop ended: their work
        fails at once, so nobody waits on a pool that no longer runs."""
        why = f"the pool's manager stopped ({self.error!r})" if self.error else "the pool was shut down"
        while True:
            try:
                message = self.commands.get_nowait()
            except Empty:
                return
            if message[0] == "chunks":
                for chunk in message[1]:
                    self._fail_chunk(chunk, range(len(chunk.indices)), None, lambda where: BrokenProcessPool(
                        f"{where} was not run: {why}; create a new mpnb.Pool"))
            elif message[0] == "cancel":
                message[2].set()

    def _handle_commands(self) -> None:
        while True:
            try:
                message = self.commands.get_nowait()
            except Empty:
                return
            kind = message[0]
            if kind == "chunks":
                self.queue.extend(message[1])
                for chunk in message[1][:1]:
                    if chunk.call.task_seconds is None:
                        chunk.call.task_seconds = self._paces.get(chunk.call.pace_key)
                if self._start_error is not None:  # new work: try starting workers again
                    self._start_error, self._start_failures = None, 0
                    self._start_missing()
            elif kind == "cancel":
                self._cancel(message[1], message[2])
            elif kind == "shutdown":
                self.stopping = True
                if message[1]:  # cancel what has not started
                    self._drop_queue()

    def _start_missing(self) -> None:
        # while stopping, only to run what is still queued (a worker died meanwhile)
        while len(self.workers) < self.size and (not self.stopping or self.queue) and self._start_error is None:
            worker_id = next(self._worker_ids)
            handle = self.backend.start_worker(worker_id)
            self.workers[worker_id] = _WorkerState(handle)
            self.monitor.worker_starting(worker_id, handle.pid, handle.current)

    def _next_chunk(self) -> _Chunk | None:
        while self.queue:
            chunk = self.queue.popleft()
            call = chunk.call
            if call.cancelled:
                continue
            future = call.future
            if future is not None and not future.running() and not future.set_running_or_notify_cancel():
                call.release()  # cancelled by its owner before it started: it never runs
                continue
            return chunk
        return None

    def _dispatch(self) -> None:
        if not self.queue:
            return
        usable = [w for w in self.workers.values() if w.ready and w.open and w.kill_reason is None]
        # first every idle worker gets work, then busy ones are topped up when
        # both their call and the next are fast (see _FAST) and have no timeout
        now = time.monotonic()
        for idle in (True, False):
            for state in usable:
                if not self.queue:
                    return
                if idle == bool(state.chunks):
                    continue
                head = self.queue[0]
                room = _ahead(head)
                if not idle:
                    if not (_reserve_ok(state.chunks[0]) and _reserve_ok(head) and now - state.since < _FAST):
                        continue
                    room -= len(state.chunks)
                    if room < max(1, _ahead(head) // 2):
                        continue  # top up in batches, not a chunk per message
                self._send(state, room)

    def _send(self, state: _WorkerState, room: int) -> None:
        """Send up to ``room`` queued chunks of one call to a worker, in one message."""
        runs: list[Run] = []
        while len(runs) < room:
            chunk = self._next_chunk()
            if chunk is None:
                break
            run = self._prepare(state, chunk)
            if run is not None:
                runs.append(run)
            if not self.queue or self.queue[0].call is not chunk.call:
                break
        if not runs:
            return
        try:
            state.handle.conn.send_bytes(pickle.dumps((Kind.RUNS, runs), pickle.HIGHEST_PROTOCOL))
        except OSError:
            state.open = False  # dead: its sentinel fires and the chunks are requeued

    def _prepare(self, state: _WorkerState, chunk: _Chunk) -> Run | None:
        """The message part that runs ``chunk``; the chunk is then the worker's."""
        call = chunk.call
        if chunk.data is None:
            try:
                chunk.data = _dump_items(chunk.items, call)
            except BaseException as exc:  # SystemExit too: this thread must live on
                for pos, item in enumerate(chunk.items):
                    self._fail_chunk(chunk, [pos], None,
                                     lambda where, exc=exc, item=item: _pickling_error(exc, where, call, item))
                return None
        # mirror of the worker's function cache (see _worker._Worker.function)
        if call.id in state.functions:
            fn_data = None
        else:
            fn_data = call.fn_bytes
            state.functions[call.id] = None
            while len(state.functions) > FUNCTION_CACHE_SIZE:
                state.functions.popitem(last=False)
        state.functions.move_to_end(call.id)
        now = time.monotonic()
        if not state.chunks:
            state.next_pos, state.since = 0, now
        chunk.sent = now
        state.chunks.append(chunk)
        self.monitor.chunk_sent(state.handle.worker_id, chunk.seq, call.id, chunk.indices, now)
        mode = Mode.KWARGS if call.with_kwargs else (Mode.ARG if call.bare else Mode.STAR)
        return Run(seq=chunk.seq, count=len(chunk.indices), call=call.id, fn_data=fn_data,
                   items_data=chunk.data, flush_each=call.timeout is not None, mode=mode)

    def _wait_and_handle(self) -> None:
        by_object: dict[Any, _WorkerState] = {}
        waitables: list[Any] = [self._wake_r]
        for state in self.workers.values():
            if state.open:
                waitables.append(state.handle.conn)
                by_object[state.handle.conn] = state
            waitables.append(state.handle.sentinel)
            by_object[state.handle.sentinel] = state
        ready = wait_for(waitables, timeout=self._next_wakeup())
        if self._wake_r in ready:
            os.read(self._wake_r, 4096)
        dead = []
        for obj in ready:
            state = by_object.get(obj)
            if state is None:
                continue
            if obj is state.handle.conn:
                self._read(state)
            else:
                dead.append(state)
        for state in dead:
            self._read(state)  # what it sent before it died
            self._on_death(state)

    def _next_wakeup(self) -> float | None:
        if self._cancels or any(w.kill_reason for w in self.workers.values()):
            return 0.05
        timeouts = [w.chunks[0].call.timeout for w in self.workers.values()
                    if w.chunks and w.chunks[0].call.timeout is not None]
        if not all(w.ready for w in self.workers.values()):
            timeouts.append(min(5.0, self.start_timeout))  # start-up is bounded too
        if self.stopping and any(w.chunks for w in self.workers.values()):
            timeouts.append(2.0)  # look for workers stopped by a signal (_check_timeouts)
        if not timeouts:
            return None
        return max(0.01, min(0.1, min(timeouts) / 10))

    def _read(self, state: _WorkerState) -> None:
        conn = state.handle.conn
        while state.open:
            try:
                if not conn.poll():
                    return
                data = conn.recv_bytes()
            except (EOFError, OSError):
                state.open = False
                return
            try:
                message = pickle.loads(data)
            except BaseException as exc:  # values are loaded one by one (_unpack): not expected
                self._unreadable(state, exc)
                return
            kind = message[0]
            if kind == Kind.RECORDS:
                for record in message[1]:
                    self._on_records(state, record)
            elif kind == Kind.HELLO:
                state.ready = True
                self._start_failures = 0
                self.monitor.worker_started(state.handle.worker_id, message[1], message[2])
            elif kind == Kind.INIT_FAILED:
                state.init_failure = message[2]

    def _unreadable(self, state: _WorkerState, exc: BaseException) -> None:
        """A message from a worker that does not load here: the tasks it held
        fail, the worker is replaced, and the pool serves on."""
        for n, chunk in enumerate(state.chunks):
            start = state.next_pos if n == 0 else 0
            self._fail_chunk(chunk, range(start, len(chunk.indices)), state,
                             lambda where: _failure_here(("message from its worker", exc), where))
        state.chunks.clear()
        state.open = False
        state.kill_reason = ("unreadable",)
        state.handle.kill()

    def _on_records(self, state: _WorkerState, record: Record) -> None:
        if not state.chunks or state.chunks[0].seq != record.seq:
            return
        chunk = state.chunks[0]
        call, pid, first, final = chunk.call, state.handle.pid, record.first, record.final
        indices, values, failed, errors, output = _read_record(chunk, record, f"in worker pid {pid}")
        state.next_pos = first + len(values)
        state.since = time.monotonic()
        # recorded before delivered: a summary made when the caller wakes counts them
        self.monitor.tasks_ended(state.handle.worker_id, pid, call.id, indices, record.starts, record.end, errors)
        call.deliver(indices, values, failed, output)
        if final:
            if first == 0:
                self._learn_pace(call, (record.end - record.starts[0]) / len(values))
            state.chunks.popleft()
            state.next_pos, state.since = 0, state.since
            self.monitor.chunk_ended(state.handle.worker_id, record.seq)

    def _learn_pace(self, call: _Call, seconds: float) -> None:
        """Update the call's seconds per task, and remember it for its function."""
        if call.task_seconds is not None:
            seconds = (call.task_seconds + seconds) / 2
        call.task_seconds = self._paces[call.pace_key] = seconds
        self._paces.move_to_end(call.pace_key)
        while len(self._paces) > _PACES_KEPT:
            self._paces.popitem(last=False)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for state in self.workers.values():
            if not state.ready and state.kill_reason is None and now - state.started > self.start_timeout:
                state.kill_reason = ("start-timeout", now - state.started)
                state.handle.kill()
            if not state.chunks or state.kill_reason is not None:
                continue
            if self.stopping and process_stopped(state.handle.pid):
                # stopped by a signal, it would hold the shutdown forever
                state.kill_reason = ("stopped-by-signal",)
                state.handle.kill()
                continue
            chunk = state.chunks[0]
            if chunk.call.timeout is None:
                continue
            seq, pos, started = state.handle.current()
            limit = chunk.call.timeout
            if seq != chunk.seq:
                # still loading the function and arguments (an import may take
                # seconds): that is not the task's time, up to a grace period
                pos, started, limit = state.next_pos, state.since, limit + _LOAD_GRACE
            elif pos < state.next_pos:
                pos, started = state.next_pos, state.since
            if now - started > limit:
                state.kill_reason = ("timeout", pos, now - started)
                state.handle.kill()

    def _cancel(self, call: _Call, done: threading.Event) -> None:
        call.cancelled = True
        self.queue = deque(c for c in self.queue if c.call is not call)
        doomed = set()
        for worker_id, state in self.workers.items():
            if not state.chunks or state.kill_reason is not None:
                continue
            if state.chunks[0].call is call:
                state.kill_reason = ("cancel",)
                state.handle.kill()
                doomed.add(worker_id)
            elif any(c.call is call for c in state.chunks):
                # queued behind another call's task: killing the worker would
                # run that task twice; the worker's records of these are ignored
                kept = deque(c for c in state.chunks if c.call is not call)
                for chunk in state.chunks:
                    if chunk.call is call:
                        self._fail_chunk(chunk, range(len(chunk.indices)), state,
                                         lambda where: CancelledError(f"{where} was cancelled"))
                state.chunks = kept
        if doomed:
            self._cancels.append((doomed, done))
        else:
            done.set()

    def _on_death(self, state: _WorkerState) -> None:
        handle = state.handle
        handle.kill()  # what its tasks started, before the worker is reaped
        handle.join(1.0)
        exitcode = handle.exitcode
        worker_id = handle.worker_id
        self.workers.pop(worker_id, None)
        reason = state.kill_reason
        requeue = []
        # the chunk the worker was in when it died: chunks before it ended but
        # their records were still batched in the worker, so they run again
        slot_seq, slot_pos, _ = handle.current()
        crashed = next((n for n, c in enumerate(state.chunks) if c.seq == slot_seq), 0)
        for n, chunk in enumerate(state.chunks):
            start = state.next_pos if n == 0 else 0
            unreported = range(start, len(chunk.indices))
            if chunk.call.cancelled:
                self._fail_chunk(chunk, unreported, state, lambda where: CancelledError(f"{where} was cancelled"))
                continue
            if reason and reason[0] == "stopped-by-signal":
                self._fail_chunk(chunk, unreported, state, lambda where: BrokenProcessPool(
                    f"{where} did not finish: its worker (pid {handle.pid}) was stopped by a signal when the "
                    "pool shut down, and was killed"))
                continue
            culprit = None
            if n == 0 and reason and reason[0] == "timeout":
                culprit, seconds, timeout = reason[1], reason[2], chunk.call.timeout

                def error(where: str, seconds=seconds, timeout=timeout) -> BaseException:
                    return TaskTimeoutError(
                        f"{where} ran for {seconds:.1f} s, longer than the timeout of "
                        f"{timeout:g} s; its worker (pid {handle.pid}) was killed and replaced"
                    )
            elif n == crashed and not reason:
                culprit = slot_pos if slot_seq == chunk.seq and slot_pos >= start else start
                error = _crash_error(handle, exitcode)
            if culprit is not None:
                self._fail_chunk(chunk, [culprit], state, error)
            rest = [p for p in unreported if p != culprit]
            if rest:
                requeue.append(_Chunk(chunk.call, [chunk.indices[p] for p in rest], [chunk.items[p] for p in rest], None))
        self.queue.extendleft(reversed(requeue))
        if reason and reason[0] == "start-timeout":
            # another try would take as long: fail the waiting work, unless
            # other workers did start and can run it
            if not any(w.ready for w in self.workers.values()):
                self._start_error = _start_timeout_error(self.initializer, self.start_timeout)
                self._drop_queue(self._start_error)
        elif not state.ready and not state.chunks and not self.stopping:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                self._start_error = _start_error(state, exitcode)
                self._drop_queue(self._start_error)
        why = reason[0] if reason else ("stopped" if self.stopping else _signal_name(exitcode))
        self.monitor.worker_stopped(worker_id, handle.pid, exitcode, why)
        handle.close()
        for doomed, done in list(self._cancels):
            doomed.discard(worker_id)
            if not doomed:
                done.set()
                self._cancels.remove((doomed, done))
        self._start_missing()

    def _fail_chunk(self, chunk: _Chunk, positions, state, make_error: Callable[[str], BaseException]) -> None:
        positions = list(positions)
        if not positions:
            return
        now = time.monotonic()
        pid = state.handle.pid if state is not None else None
        indices, values, errors = _task_errors(chunk, positions, make_error, f" in worker pid {pid}" if pid else "")
        if state is not None:
            self.monitor.tasks_ended(state.handle.worker_id, pid or 0, chunk.call.id, indices,
                                     [now] * len(indices), now, errors)
        chunk.call.deliver(indices, values, indices, {})

    def _drop_queue(self, error: BaseException | None = None) -> None:
        """Fail every queued chunk with ``error``; with no error (shutdown with
        ``cancel_futures=True``) a submitted future is cancelled, as
        ``concurrent.futures`` does, and a map's tasks get a CancelledError."""
        queue, self.queue = self.queue, deque()
        for chunk in queue:
            future = chunk.call.future
            if error is None and future is not None and future.cancel():
                chunk.call.release()
                continue
            def make(where: str, error=error) -> BaseException:
                if error is None:
                    return CancelledError(f"{where} was cancelled: the pool was shut down")
                exc = type(error)(*error.args)
                exc.__cause__ = error.__cause__
                return exc

            self._fail_chunk(chunk, range(len(chunk.indices)), None, make)

    def _fail_everything(self, error: BaseException) -> None:
        self._drop_queue(error)
        for state in list(self.workers.values()):
            for n, chunk in enumerate(state.chunks):
                start = state.next_pos if n == 0 else 0
                self._fail_chunk(chunk, range(start, len(chunk.indices)), None,
                                 lambda where: BrokenProcessPool(f"{where}: {error}"))
            state.chunks.clear()
        for _, done in self._cancels:
            done.set()

    def _stop_workers(self) -> None:
        for state in self.workers.values():
            try:
                state.handle.conn.send_bytes(pickle.dumps(STOP))
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        for state in self.workers.values():
            try:
                state.handle.join(max(0.0, deadline - time.monotonic()))
                if state.handle.exitcode is None:
                    state.handle.kill()
                    state.handle.join(1.0)
                self.monitor.worker_stopped(state.handle.worker_id, state.handle.pid, state.handle.exitcode, "stopped")
                state.handle.close()
            except Exception:  # one worker's trouble must not leave the others running
                traceback.print_exc(file=sys.__stderr__)
                state.handle.kill()
        self.workers.clear()
        self.backend.close()  # before stopped is set: an exiting process may not wait longer


def _read_record(chunk: _Chunk, record: Record, where: str) -> tuple[list, list, list, dict, dict]:
    """What a worker's ``record`` of ``chunk`` says, in the call's terms: the
    indices it covers, their values (a failed task's is its exception), the
    failed indices, each failure in one line (for the monitor), and the
    output by index.  ``where`` follows a task's name in its error message."""
    call, first = chunk.call, record.first
    values, unloadable = record.values, {}
    if type(values) is PackedValues:
        values = _unpack(values, first, unloadable)
    errors: dict[int, str] = {}
    failed = []
    for pos, failure in itertools.chain(record.failures.items(), unloadable.items()):
        index = chunk.indices[pos]
        exc = _failure_here(failure, f"{_describe(call, index, chunk.items[pos])} {where}")
        values[pos - first] = exc
        failed.append(index)
        errors[index] = f"{type(exc).__name__}: {exc}"
    output = {chunk.indices[pos]: segments for pos, segments in record.outputs.items()}
    return chunk.indices[first : first + len(values)], values, failed, errors, output


def _unpack(packed: PackedValues, first: int, unloadable: dict[int, tuple[str, BaseException]]) -> list[Any]:
    """The values of a record whose values were not all plain, each loaded
    alone: one that cannot be loaded here is put in ``unloadable`` by its
    position, as ``(type name, exception)``, and fails its task alone."""
    values: list[Any] = []
    for i, blob in enumerate(packed.blobs):
        try:
            values.append(None if blob is None else pickle.loads(blob))
        except BaseException as exc:  # SystemExit too: loading runs the value's own code
            values.append(None)
            unloadable[first + i] = (packed.kinds[i], exc)
    return values


def _failure_here(failure: Failure | tuple[str, BaseException], where: str) -> BaseException:
    """The exception a task's caller sees, for a failure in the worker or a
    value (or an exception) that cannot be loaded in this process."""
    if isinstance(failure, Failure):
        try:
            return _remote_exception(failure, where)
        except BaseException as exc:  # the exception itself does not load here
            failure = (failure.type_name, exc)
    kind, exc = failure
    error = pickle.UnpicklingError(
        f"{where} ended, but what it returned or raised, a {kind}, cannot be loaded in this process "
        f"({type(exc).__name__}: {exc}); make it a type this process can import, or return plain data"
    )
    error.__cause__ = exc
    error.add_note(f"mpnb: raised by {where}")
    return error


def _chunk_seconds(chunk: _Chunk) -> float | None:
    """How long ``chunk`` should take in a worker, once its call's pace is known."""
    pace = chunk.call.task_seconds
    return None if pace is None else pace * len(chunk.indices)


def _task_errors(chunk: _Chunk, positions: Iterable[int], make_error: Callable[[str], BaseException],
                 place: str) -> tuple[list[int], list[BaseException], dict[int, str]]:
    """The errors of a chunk's tasks at ``positions``: their indices, the
    exceptions (``make_error(task description)``, noted with the task and
    ``place``) and the one-line descriptions the monitor records."""
    indices, values, errors = [], [], {}
    for pos in positions:
        index = chunk.indices[pos]
        where = _describe(chunk.call, index, chunk.items[pos])
        exc = make_error(where)
        if not isinstance(exc, CancelledError):
            exc.add_note(f"mpnb: raised by {where}{place}")
        indices.append(index)
        values.append(exc)
        errors[index] = f"{type(exc).__name__}: {exc}"
    return indices, values, errors


def _reserve_ok(chunk: _Chunk) -> bool:
    """Whether ``chunk`` may wait behind another on a busy worker: it is fast,
    and its call has no timeout (a timeout counts from when a task starts)."""
    seconds = _chunk_seconds(chunk)
    call = chunk.call
    return seconds is not None and seconds < _FAST and call.timeout is None and not call.cancelled


def _ahead(chunk: _Chunk) -> int:
    """How many chunks like ``chunk`` a worker may hold at once."""
    seconds = _chunk_seconds(chunk)
    if seconds is None or not _reserve_ok(chunk):
        return 1
    return max(2, min(_MAX_AHEAD, int(_AHEAD_SECONDS / max(seconds, 1e-6))))


def _pickling_error(exc: BaseException, where: str, call: _Call | None = None, item: Any = None
                    ) -> BaseException:
    """The error of a task whose arguments do not pickle: the pickle
    doctor's sentence (which argument, the path inside it, why, the fix)."""
    from mpnb.pickling import PicklingProblem, diagnose_call  # only on failure: it is slow to import

    found = None
    if call is not None:
        args, kwargs = _arguments(call, item)
        found = _diagnosis(lambda: diagnose_call(args, kwargs, by_value=True))
    if found is not None:
        err: BaseException = PicklingProblem(found)
    else:  # the doctor finds nothing wrong on its own: say what pickle said
        err = pickle.PicklingError(f"the arguments of {where} cannot be sent to a worker: {exc}")
    err.__cause__ = exc
    return err


def _function_error(fn: Callable, exc: BaseException) -> BaseException:
    """The error of a function that does not pickle, in the pickle doctor's words."""
    from mpnb.pickling import PicklingProblem, diagnose, function_label

    found = _diagnosis(lambda: diagnose(fn, by_value=True, name=function_label(fn)))
    if found is not None:
        return PicklingProblem(found)
    return pickle.PicklingError(f"the function {getattr(fn, '__qualname__', fn)!r} cannot be sent to a worker: {exc}")


def _diagnosis(run: Callable[[], Diagnosis | None]) -> Diagnosis | None:
    # only after pickling failed, so the happy path never pays for the walk;
    # a doctor that trips over a strange object must not hide the real error
    try:
        return run()
    except KeyboardInterrupt:
        raise
    except BaseException:  # SystemExit from a __reduce__ too
        return None


def _arguments(call: _Call, item: Any) -> tuple[tuple, dict]:
    """A task's item as the ``(args, kwargs)`` its function is called with."""
    if call.bare:
        return (item,), {}
    if call.with_kwargs:
        return item
    return tuple(item), {}


def _crash_error(handle, exitcode: int | None) -> Callable[[str], BaseException]:
    report = handle.crash_report()

    def make(where: str) -> BaseException:
        exc = WorkerCrashedError(
            f"{where} crashed its worker (pid {handle.pid}, {_signal_name(exitcode)}); "
            f"likely cause: {_likely_cause(exitcode, '')}. The pool replaced the worker."
        )
        if report:
            exc.__cause__ = RemoteTraceback("\n" + report + "\n")
        return exc

    return make


def _start_timeout_error(initializer: str | None, seconds: float) -> BaseException:
    if initializer is not None:
        why = f"the initializer {initializer} did not return; make it return sooner, or"
    else:
        why = "the machine may be overloaded, or an import at start-up is slow;"
    return BrokenProcessPool(
        f"the pool's workers did not start within {seconds:g} s ({START_TIMEOUT_VAR}): {why} "
        f"set {START_TIMEOUT_VAR} to more seconds before creating the pool"
    )


def start_timeout() -> float:
    """Seconds a worker may take to start, from ``MPNB_START_TIMEOUT`` (default 60)."""
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


def _start_error(state: _WorkerState, exitcode: int | None) -> BaseException:
    exc = WorkerCrashedError(
        f"the pool's worker processes exit before they are ready ({_signal_name(exitcode)}); "
        "if you gave an initializer, it is the first suspect"
    )
    if state.init_failure is not None:
        exc.__cause__ = _remote_exception(state.init_failure, "the initializer")
    return exc


# ------------------------------------------------------------- exit handling

_live_managers: "weakref.WeakSet[_Manager]" = weakref.WeakSet()
_atexit_registered = False


def _kill_all_at_exit() -> None:
    for manager in list(_live_managers):
        manager.kill_all_now()
    for manager in list(_live_managers):
        manager.stopped.wait(2.0)


def _finish_at_exit() -> None:
    """At interpreter exit, before threads are joined: in a script, let the
    pools finish the work already submitted, as ``concurrent.futures`` does
    (Ctrl-C while waiting stops it); in a kernel, which exits to shut down or
    restart, stop everything at once."""
    if _in_kernel():
        _kill_all_at_exit()
        return
    managers = list(_live_managers)
    for manager in managers:
        manager.command("shutdown", False)
    try:
        for manager in managers:
            while not manager.stopped.wait(_POLL):
                pass
    except KeyboardInterrupt:
        _kill_all_at_exit()


def _in_kernel() -> bool:
    """True in a running IPython kernel (not in a script that imported ipykernel)."""
    for module, name in (("ipykernel.kernelapp", "IPKernelApp"), ("ipykernel.zmqshell", "ZMQInteractiveShell")):
        cls = getattr(sys.modules.get(module), name, None)
        try:
            if cls is not None and cls.initialized():
                return True
        except Exception:  # an ipykernel that differs: judge by the other one
            continue
    return False


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        # registered after multiprocessing's own handler, so it runs first and
        # that handler's join() of our (killed) workers returns at once
        atexit.register(_kill_all_at_exit)
        try:
            # runs before atexit handlers, while the manager threads still work
            # (concurrent.futures registers its own wait the same way)
            threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # interpreter already exiting
            pass
        _atexit_registered = True


# ---------------------------------------------------------------------- Pool


class Pool(Executor):
    """A process pool that works from notebooks.

    ``Pool(workers=None, *, timeout=None, on_error="raise")`` starts
    ``workers`` processes (default: the usable CPUs, cgroup-aware) in the
    background and returns at once.  It is a ``concurrent.futures.Executor``
    (``submit``, ``map``, ``shutdown``, ``with``) and also has the
    ``multiprocessing.Pool`` methods ``imap``, ``imap_unordered``,
    ``starmap`` and ``apply``.

    Functions defined in notebook cells travel by value (cloudpickle);
    functions from modules travel by reference.  ``timeout`` is per task: a
    task running longer is stopped by killing its worker and fails alone
    with :class:`TaskTimeoutError`.  A worker that crashes fails only its
    task, with :class:`WorkerCrashedError`.  ``on_error="collect"`` returns
    exceptions in place of results instead of raising.  What tasks print is
    shown in the cell that runs the call, in task order.

    ``initializer(*initargs)`` runs in each worker as it starts; ``env`` adds
    environment variables to the workers.  ``context`` is how workers start,
    always as fresh interpreters: ``"exec"`` (default on POSIX: mpnb's own
    launcher, the fastest), ``"loky"`` (loky's launcher), ``"spawn"`` or
    ``"forkserver"``; never ``fork``.

    Inside a worker, a new ``Pool`` starts no processes: it runs its tasks
    inline (see :mod:`mpnb.limits`, ``MPNB_MAX_DEPTH``).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        timeout: float | None = None,
        on_error: str = "raise",
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        env: dict[str, str] | None = None,
        context: str | None = None,
        backend: str = "local",
        address: Any = None,
        live: bool | None = None,
    ):
        self.backend = _check_backend(backend, address)
        #: the dask scheduler's address (``backend="dask"``), else None
        self.address: str | None = None
        self.workers = limits.resolve_workers(workers) if backend == "local" else 0
        self.timeout = _check_timeout(timeout)
        self.on_error = _check_on_error(on_error)
        self.monitor = Monitor()
        #: results of the last ``map``/``starmap``, in input order, kept even
        #: when it raised or was interrupted: a value, the exception of a
        #: failed task, or a ``CancelledError`` for a task that did not finish
        self.last_results: list[Any] | None = None
        self._inline = limits.runs_inline()
        self._closed = False
        self._manager: _Manager | None = None
        #: show a live status view while work runs: None decides by where it
        #: runs (see mpnb.view.choose_mode), False never, True always
        self.live = view.check_live(live)
        self._running: dict[int, _Call] = {}  # calls under way, for cancel()
        self._interrupts: set[int] = set()  # blocking calls that cancel() stopped
        self._last_call: int | None = None
        if backend == "dask":
            self._start_dask(address, workers, initializer, env, context)
            return
        if self._inline:
            self._initializer = (initializer, initargs)
            if initializer is not None:
                initializer(*initargs)
            return
        from mpnb.backends.local import DEFAULT_METHOD, LocalBackend

        worker_env = limits.thread_env(self.workers)
        worker_env[limits.DEPTH_VAR] = str(limits.current_depth() + 1)
        worker_env.update(env or {})
        config = {
            "parent": os.getpid(),
            # pickled as each worker starts: queues and locks in initargs pickle only then
            "initializer": (initializer, initargs) if initializer is not None else None,
        }
        manager = _Manager(LocalBackend(worker_env, config, context or DEFAULT_METHOD), self.workers, self.monitor,
                           _qualified_name(initializer) if initializer is not None else None, start_timeout())
        _register_atexit()
        _live_managers.add(manager)
        manager.start()
        self._manager = manager
        # a pool dropped without shutdown() must not leave workers behind
        self._finalizer = weakref.finalize(self, manager.command, "shutdown", True)

    def _start_dask(self, address: Any, workers: int | None, initializer: Any, env: Any, context: str | None) -> None:
        from mpnb.backends.dask import connect

        engine = connect(address, workers=workers, initializer=initializer, env=env, context=context)
        self.workers, self.monitor, self.address = engine.size, engine.monitor, engine.address
        _register_atexit()
        _live_managers.add(engine)  # type: ignore[arg-type]
        self._manager = engine  # type: ignore[assignment]
        self._finalizer = weakref.finalize(self, engine.command, "shutdown", True)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("inline" if self._inline else "running")
        where = f"backend='dask' address={self.address!r} " if self.backend == "dask" else ""
        return f"<mpnb.Pool {where}workers={self.workers} timeout={self.timeout} on_error={self.on_error!r} {state}>"

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [row.pid for row in self.monitor.snapshot() if row.pid is not None]

    # ---------------------------------------------------------- plumbing

    def _check_open(self) -> _Manager | None:
        if self._closed:
            raise RuntimeError("this mpnb.Pool was shut down; create a new Pool to run more tasks")
        manager = self._manager
        if manager is not None and (manager.stopped.is_set() or manager.error is not None):
            raise BrokenProcessPool(f"this mpnb.Pool stopped working ({manager.error!r}); create a new mpnb.Pool")
        return manager

    def _new_call(self, fn: Callable, timeout: float | None, style: str, future: Future | None = None) -> _Call:
        if not callable(fn):
            raise TypeError(f"the pool needs a callable, not a {type(fn).__name__}")
        try:
            fn_bytes = serialize.dumps(fn)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit from a __reduce__ too
            raise _function_error(fn, exc) from exc
        timeout = self.timeout if timeout is None else _check_timeout(timeout)
        call = _Call(fn_bytes, timeout, style, future)
        return call

    def _chunks(self, call: _Call, items: Iterable[tuple], chunksize: int) -> Iterator[tuple[int, _Chunk]]:
        """``(tasks so far, chunk)`` pairs; a chunk may be empty when its
        only task failed to pickle (that task's outcome is then delivered)."""
        iterator = iter(items)
        index = 0
        while True:
            batch = list(itertools.islice(iterator, chunksize))
            if not batch:
                return
            indices = list(range(index, index + len(batch)))
            index += len(batch)
            try:
                data = _dump_items(batch, self._sharing(call))
            except KeyboardInterrupt:
                raise
            except BaseException:  # SystemExit from a __reduce__ too: it is the task's failure
                # find out which argument does not pickle, fail that task alone
                for i, item in zip(indices, batch):
                    yield i + 1, self._single_chunk(call, i, item)
                continue
            yield index, _Chunk(call, indices, batch, data)

    def _sharing(self, call: _Call) -> _Call | None:
        """The call whose large arrays go through shared files, or None: a
        dask worker may be on another machine, so there they are pickled."""
        return call if self.backend == "local" else None

    def _single_chunk(self, call: _Call, index: int, item: tuple) -> _Chunk:
        try:
            return _Chunk(call, [index], [item], _dump_items([item], self._sharing(call)))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            error = _pickling_error(exc, _describe(call, index, item), call, item)
            error.add_note(f"mpnb: raised by {_describe(call, index, item)}")
            call.deliver([index], [error], [index], {})
            return _Chunk(call, [], [], b"")  # nothing to run

    def _send_chunks(self, manager: _Manager, chunks: list[_Chunk]) -> None:
        chunks = [c for c in chunks if c.indices]
        if chunks:
            manager.command("chunks", chunks)

    def _cancel(self, call: _Call) -> None:
        done = threading.Event()
        assert self._manager is not None
        self._manager.command("cancel", call, done)
        done.wait(_CANCEL_WAIT)

    def _auto_chunksize(self, n: int) -> int:
        chunksize, extra = divmod(n, self.workers * 4)
        return max(1, chunksize + bool(extra))

    # ---------------------------------------------------------- Executor

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` was called; a closed pool takes no work."""
        return self._closed

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` in a worker; returns a ``Future``.

        What the task prints is shown when its result is fetched with
        ``future.result()`` or ``future.exception()``.
        """
        __tracebackhide__ = True  # IPython shows the caller's line, not mpnb's frames
        manager = self._check_open()
        future = _TaskFuture()
        if manager is None:
            _run_inline_into(future, fn, args, kwargs)
            return future
        call = self._new_call(fn, None, "submit", future)
        future._mpnb_stop = functools.partial(_stop_submitted, manager, call)
        self.monitor.call_started(call.id, 1)
        self._running[call.id] = call
        future.add_done_callback(lambda _, running=self._running, key=call.id: running.pop(key, None))
        view.watch_background(self, call, [(args, kwargs)])
        self._send_chunks(manager, [self._single_chunk(call, 0, (args, kwargs))])
        return future

    def map(  # type: ignore[override]
        self,
        fn: Callable,
        *iterables: Iterable,
        chunksize: int | None = None,
        timeout: float | None = None,
        on_error: str | None = None,
    ) -> list[Any]:
        """``[fn(x) for x in iterable]`` on the workers; a list in input order.

        With several iterables, ``fn`` gets one item of each (like ``zip``).
        ``chunksize`` tasks travel together (automatic when ``None``);
        ``timeout`` (seconds, per task) and ``on_error`` override the pool's.
        The outcome stays in ``pool.last_results`` even when the call raises
        or is interrupted.
        """
        __tracebackhide__ = True
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if len(iterables) == 1:
            return self._map(fn, list(iterables[0]), "bare", chunksize, timeout, on_error)
        return self._map(fn, list(zip(*iterables)), "map", chunksize, timeout, on_error)

    def starmap(
        self,
        fn: Callable,
        iterable: Iterable[Iterable],
        *,
        chunksize: int | None = None,
        timeout: float | None = None,
        on_error: str | None = None,
    ) -> list[Any]:
        """``[fn(*args) for args in iterable]`` on the workers, in input order."""
        __tracebackhide__ = True
        return self._map(fn, [tuple(args) for args in iterable], "star", chunksize, timeout, on_error)

    def apply(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in a worker and wait for its value."""
        __tracebackhide__ = True
        results = self._map(fn, [(args, kwargs)], "submit", 1, None, "raise")
        return results[0]

    def _map(self, fn, items, style, chunksize, timeout, on_error) -> list[Any]:
        __tracebackhide__ = True
        on_error = self.on_error if on_error is None else _check_on_error(on_error)
        manager = self._check_open()
        if manager is None:
            return _map_inline(self, fn, [(x,) for x in items] if style == "bare" else items, on_error)
        call = self._new_call(fn, timeout, "map" if style == "bare" else style)
        call.bare = style == "bare"
        n = len(items)
        chunksize = self._auto_chunksize(n) if chunksize is None else _check_chunksize(chunksize)
        self.last_results = None
        call.total = n
        self.monitor.call_started(call.id, n)
        self._running[call.id], self._last_call = call, call.id
        live = view.watch(self, call, items)
        self._send_chunks(manager, [chunk for _, chunk in self._chunks(call, items, chunksize)])
        shown = 0
        interrupted = False
        try:
            while True:
                with call.cond:
                    if call.contiguous < n and not (call.failed and on_error == "raise"):
                        call.cond.wait(_POLL)
                    upto = call.contiguous
                    failed = call.first_failure()
                if live is not None:
                    live.poll()
                if call.id in self._interrupts:
                    raise KeyboardInterrupt
                if call.output:
                    for index in range(shown, upto):
                        _replay(call.output.pop(index, None))
                shown = upto
                if failed is not None and on_error == "raise":
                    # its other tasks are stopped: nobody will see them, and a
                    # later shutdown() must not wait for them
                    manager.command("cancel", call, threading.Event())
                    raise call.results[failed]
                if shown == n:
                    break
        except KeyboardInterrupt as interrupt:
            interrupted = True
            self._cancel(call)
            finished = len(call.results) - len(call.failed)
            interrupt.add_note(
                f"mpnb: interrupted; {finished} of {n} results finished and are kept in "
                "pool.last_results (unfinished tasks hold a CancelledError)"
            )
            raise
        finally:
            self._running.pop(call.id, None)
            self._interrupts.discard(call.id)
            call.release()
            self.last_results = _snapshot(call, n)
            for index in sorted(call.output):
                _replay(call.output.pop(index, None))
            self.monitor.call_finished(call.id)
            if live is not None:
                live.finish(interrupted)
        return self.last_results

    def imap(
        self,
        fn: Callable,
        iterable: Iterable,
        *,
        chunksize: int = 1,
        timeout: float | None = None,
        on_error: str | None = None,
    ) -> Iterator[Any]:
        """Lazy ``map``: yields results in input order as they are ready.

        Reads the input only a few chunks ahead of the results, so it suits
        long or endless iterables.  A failed task raises when its turn comes
        (or is yielded, with ``on_error="collect"``).
        """
        __tracebackhide__ = True
        return self._imap(fn, iterable, chunksize, timeout, on_error, ordered=True)

    def imap_unordered(
        self,
        fn: Callable,
        iterable: Iterable,
        *,
        chunksize: int = 1,
        timeout: float | None = None,
        on_error: str | None = None,
    ) -> Iterator[Any]:
        """Like :meth:`imap`, but yields each result as soon as it is ready."""
        __tracebackhide__ = True
        return self._imap(fn, iterable, chunksize, timeout, on_error, ordered=False)

    def _imap(self, fn, iterable, chunksize, timeout, on_error, ordered) -> Iterator[Any]:
        __tracebackhide__ = True
        on_error = self.on_error if on_error is None else _check_on_error(on_error)
        manager = self._check_open()
        chunksize = _check_chunksize(chunksize)
        if manager is None:
            return iter(_map_inline(self, fn, [(x,) for x in iterable], on_error))
        call = self._new_call(fn, timeout, "map")
        call.bare = True
        return self._imap_results(manager, call, iterable, chunksize, on_error, ordered)

    def _imap_results(self, manager, call, iterable, chunksize, on_error, ordered) -> Iterator[Any]:
        __tracebackhide__ = True
        self.monitor.call_started(call.id, None)
        self._running[call.id], self._last_call = call, call.id
        live = view.watch(self, call, None)
        # an error of the input iterator is raised after the results of the
        # items before it, as the builtin map would reach it
        input_error: list[Exception] = []
        chunks = self._chunks(call, _until_error(iterable, input_error), chunksize)
        ahead = 2 * self.workers * chunksize  # tasks submitted beyond those yielded
        submitted = yielded = 0
        exhausted = interrupted = False
        try:
            while True:
                while not exhausted and submitted - yielded < ahead:
                    pair = next(chunks, None)
                    if pair is None:
                        exhausted = True
                        self.monitor.call_total(call.id, submitted)
                        break
                    submitted, chunk = pair
                    self._send_chunks(manager, [chunk])
                if exhausted and yielded >= submitted:
                    if input_error:
                        raise input_error[0]
                    return
                with call.cond:
                    if ordered:
                        ready = [yielded] if yielded in call.results else []
                    else:
                        ready = list(call.results)
                    if not ready:
                        call.cond.wait(_POLL)
                # every pass, not only when waiting: a slow consumer always finds a result ready
                if live is not None:
                    live.poll()
                if call.id in self._interrupts:
                    raise KeyboardInterrupt
                if not ready:
                    continue
                with call.cond:
                    taken = [(i, call.results.pop(i), i in call.failed, call.output.pop(i, None)) for i in ready]
                for index, value, failed, output in taken:
                    yielded += 1
                    _replay(output)
                    if failed and on_error == "raise":
                        raise value
                    yield value
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            self._cancel(call)
            raise
        finally:
            call.cancelled = True
            call.release()
            self._running.pop(call.id, None)
            self._interrupts.discard(call.id)
            self.monitor.call_finished(call.id)
            if live is not None:
                live.finish(interrupted)

    def cancel(self) -> None:
        """Stop the work under way, as a kernel interrupt does.

        A waiting ``map``, ``starmap``, ``imap`` or ``apply`` raises
        ``KeyboardInterrupt`` (what finished stays in ``pool.last_results``);
        submitted futures that have not started are cancelled, and those
        running end with a ``CancelledError``: their workers are killed and
        replaced.  The pool stays usable.  Any thread may
        call this; the live view's Cancel button does.
        """
        manager = self._manager
        for call in list(self._running.values()):
            if call.future is None:
                self._interrupts.add(call.id)
            elif manager is not None:
                _stop_submitted(manager, call)

    def timeline(self, call: int | None = None) -> "Timeline":
        """A picture of which worker ran which task when, failures marked.

        For the last ``map``/``starmap``/``imap`` of this pool, or for call
        number ``call`` (see ``pool.monitor.calls()``).  Shown as SVG in a
        notebook; its text form summarises the same.
        """
        from mpnb.timeline import Timeline

        if call is None:
            call = self._last_call
        if call is None:
            raise ValueError(
                "pool.timeline(): this pool has not run a map or imap yet; run one first, "
                "or pass call=<number> from pool.monitor.calls()"
            )
        return Timeline.from_monitor(self.monitor, call)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers once queued tasks are done (or dropped, with
        ``cancel_futures=True``).  With ``wait=True``, return when they have
        exited.  A pool cannot be used after this."""
        if self._closed:
            return
        self._closed = True
        manager = self._manager
        if manager is None:
            return
        self._finalizer.detach()
        manager.command("shutdown", cancel_futures)
        if wait:
            try:
                while not manager.stopped.wait(_POLL):
                    pass
            except KeyboardInterrupt:
                manager.kill_all_now()
                raise

    def __exit__(self, exc_type, exc, tb):
        # leaving a with-block by an error or Ctrl-C must not wait for the queue
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def _stop_submitted(manager: _Manager, call: _Call) -> None:
    """Stop a submitted task: one that has not started never will; one
    running ends with a ``CancelledError`` (its worker is killed)."""
    future = call.future
    if future is not None and not future.done():
        future.cancel()
        manager.command("cancel", call, threading.Event())


_callback_log = logging.getLogger("concurrent.futures")


class _TaskFuture(Future):
    """A Future that shows its task's output where its result is fetched."""

    _mpnb_output: Any = ()
    _mpnb_stop: Callable[[], None] | None = None

    def _show_output(self) -> None:
        output, self._mpnb_output = self._mpnb_output, ()
        _replay(output)

    def _invoke_callbacks(self) -> None:
        # as concurrent.futures does, but for anything a callback raises
        # (SystemExit too): the pool's manager thread runs them and must live on
        for callback in self._done_callbacks:
            try:
                callback(self)
            except BaseException:
                _callback_log.exception("exception calling callback for %r", self)

    def _interrupted(self) -> None:
        """Ctrl-C while waiting: stop the task, as an interrupted map does."""
        stop = self._mpnb_stop
        if stop is not None:
            stop()

    def result(self, timeout: float | None = None) -> Any:
        __tracebackhide__ = True
        try:
            return super().result(timeout)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            if self.done():
                self._show_output()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        __tracebackhide__ = True
        try:
            return super().exception(timeout)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            if self.done():
                self._show_output()


# -------------------------------------------------------------------- helpers


def _until_error(iterable: Iterable, error: list[Exception]) -> Iterator[Any]:
    """The items of ``iterable`` up to an error, which is put in ``error``."""
    try:
        yield from iterable
    except Exception as exc:
        error.append(exc)


def _snapshot(call: _Call, n: int) -> list[Any]:
    with call.cond:
        results = call.results
        if len(results) == n:
            return list(map(results.__getitem__, range(n)))
        return [results[i] if i in results else CancelledError(f"task {i} did not finish") for i in range(n)]


def _check_backend(backend: str, address: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use 'local' (processes on this machine) or 'dask'")
    if backend == "local" and address is not None:
        raise ValueError(f"address={address!r} is for a dask cluster: pass backend='dask' with it")
    return backend


def _check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: use 'raise' or 'collect'")
    return on_error


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout={timeout!r}: give a number of seconds above 0, or None")
    return timeout


def _check_chunksize(chunksize: int) -> int:
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(f"chunksize={chunksize!r}: give a whole number of 1 or more, or None")
    return chunksize


def _run_inline_into(future: Future, fn, args, kwargs) -> None:
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as exc:
        future.set_exception(exc)


def _map_inline(pool: Pool, fn, items, on_error) -> list[Any]:
    """A pool inside a worker: run the tasks here, one after the other."""
    results = []
    for args in items:
        try:
            results.append(fn(*args))
        except Exception as exc:
            if on_error == "raise":
                raise
            results.append(exc)
    pool.last_results = results
    return results
