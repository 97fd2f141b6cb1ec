"""The local engine: worker processes on this machine, owned by one thread.

::

    pool (caller thread)           engine thread (LocalEngine.run)      worker processes
    --------------------           -------------------------------      ----------------
    submit(chunks) --- inbox ----> | queue --> chunks per worker,       |
                  (+ wake pipe)    |   (RUNS, [Run...]) -- pipe ------> | capture output,
                                   |                                    | write slot, call fn
                                   | <---- (RECORDS, [Record...]) ----- | (values/failures,
      <--- Call.deliver ---------- | deliver, feed the Monitor          |  output, times)
                                   | <---- (PROGRESS, Progress) ------- | mpnb.report, tqdm
    cancel(call) ----------------> | SIGKILL the call's workers         |
                                   | sentinel: crash -> fail the task on the slot,
                                   |           requeue the rest, start a new worker
                                   | slot too old: timeout -> SIGKILL, same path

The engine thread owns every worker; other threads only post commands.  An
idle worker gets one chunk; once a call's tasks prove fast (its pace,
remembered per function), each worker keeps about 10 ms of its chunks
queued, sent several to a message, and answers with the records of several
chunks at once: a task at chunksize 1 no longer costs a round trip, and
still fails and reports alone.  A dead or killed worker affects only the
chunks it held: the task on its slot fails with an error that names it, the
tasks it had not reported run again elsewhere, and a new worker replaces it.
Workers are started by :class:`mpnb.backends.launcher.Launcher`; the wire is
:mod:`mpnb._protocol`.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import pickle
import select
import signal
import threading
import time
import traceback
import sys
import weakref
from collections import OrderedDict, deque
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, Sequence

from mpnb import errors
from mpnb._protocol import FUNCTION_CACHE_SIZE, STOP, Kind, Progress, Record, Run, read_frames, write_frame
from mpnb.backends.base import EngineBase
from mpnb.backends.launcher import Launcher, WorkerHandle
from mpnb.calls import Call, Chunk, Outcomes, arguments, dump_items, read_record
from mpnb.monitor import Monitor, process_stopped
from mpnb.resources import SAMPLE_SECONDS, MemoryProbe, Resources

__all__ = ["LocalEngine"]

try:  # the C functions behind signal.signal and signal.getsignal (see _interrupts_held)
    from _signal import getsignal as _getsignal, signal as _setsignal  # type: ignore[import-not-found]
except ImportError:  # another Python: the public ones
    from signal import getsignal as _getsignal, signal as _setsignal

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
# a call whose queued tasks all together should take less than this (by its
# measured pace) goes to one worker in one message: a second message and a
# second worker's wake cost more than the work they would share
_TINY_SECONDS = 0.0002
# a call's function pickled in at most this many bytes goes to the idle
# workers that lack it as soon as the call is sent (see _preload)
_PRELOAD_BYTES = 16 * 1024
# functions whose pace the engine remembers from one call to the next
_PACES_KEPT = 32
# consecutive workers that die before they are ready before the engine gives up
_MAX_START_FAILURES = 3
# how long a worker retired by max_tasks_per_child may take to leave before it is killed
_RETIRE_GRACE = 10.0


class _WorkerState:
    __slots__ = ("handle", "ready", "chunks", "next_pos", "since", "kill_reason", "functions", "init_failure",
                 "open", "started", "tasks", "retired", "rank", "memory", "peak", "measured", "inbox", "loaded")

    def __init__(self, handle: WorkerHandle, rank: int):
        self.handle = handle
        self.rank = rank  # its slot: a replacement gets the same environment, device and CPUs
        self.ready = False
        self.started = time.monotonic()  # start-up is bounded (MPNB_START_TIMEOUT)
        # chunks sent, oldest first; the first is running, more may wait
        # in the pipe so the worker never idles for a round trip
        self.chunks: deque[Chunk] = deque()
        self.next_pos = 0  # first position of chunks[0] not yet reported
        self.since = 0.0  # when chunks[0] was sent or last reported
        self.kill_reason: tuple | None = None
        self.functions: OrderedDict[int, None] = OrderedDict()  # mirror of the worker's cache
        # the pace keys (hashes of a function's pickle) of the functions it
        # loaded: one it loaded before needs no preload (its module is imported)
        self.loaded: set[int] = set()
        self.init_failure: Any = None
        self.open = True  # the connection has not reached EOF
        self.tasks = 0  # tasks sent to it, for max_tasks_per_child
        self.retired: float | None = None  # when it was asked to leave (max_tasks_per_child, soft_memory)
        self.memory = MemoryProbe(handle.pid)  # resident memory, when a limit is set
        self.peak = 0  # the most resident memory seen
        self.measured = 0  # its task count when it was last measured idle (soft_memory)
        # whether a message waits, in one call (Connection.poll builds a selector each time)
        self.inbox = select.poll()
        self.inbox.register(handle.conn.fileno(), select.POLLIN)

    @property
    def who(self) -> tuple[int, int]:
        return self.handle.worker_id, self.handle.pid

    def unreported(self) -> Iterator[tuple[int, Chunk, range]]:
        """``(n, chunk, positions not reported yet)`` for each chunk it holds."""
        for n, chunk in enumerate(self.chunks):
            yield n, chunk, range(self.next_pos if n == 0 else 0, len(chunk.indices))


def _cached(state: _WorkerState, call_id: int) -> bool:
    """Whether the worker has the call's function cached; it has once this
    returns.  The mirror of the worker's cache (``_worker._Worker.function``):
    both must change in exactly the same way."""
    functions = state.functions
    had = call_id in functions
    if not had:
        functions[call_id] = None
        while len(functions) > FUNCTION_CACHE_SIZE:
            functions.popitem(last=False)
    functions.move_to_end(call_id)
    return had


class LocalEngine(EngineBase):
    """Runs chunks on worker processes of this machine (see the module docstring)."""

    backend = "local"
    shares_memory = True

    def __init__(self, launcher: Launcher, workers: int, initializer: str | None, start_timeout: float,
                 max_tasks: int | None = None, resources: Resources | None = None):
        super().__init__("mpnb-local-engine", Monitor(), workers)
        # each slot's environment, CPUs and device (the launcher's business)
        # and the memory limits (this engine's: see _check_memory)
        self.resources = resources or Resources()
        self._sampled = 0.0
        # a worker that was sent this many tasks gets no more and is replaced
        # once they are done (max_tasks_per_child); None: workers serve on
        self.max_tasks = max_tasks
        self.launcher = launcher
        self.method = launcher.method
        self.initializer = initializer  # its qualified name, for errors
        self.start_timeout = start_timeout
        self.workers: dict[int, _WorkerState] = {}
        self.queue: deque[Chunk] = deque()
        self._wake_r, self._wake_w = os.pipe()
        # what the loop waits on, registered once, not per wait: each file
        # descriptor and its worker, True for its connection, False for its
        # sentinel (see _on_ready)
        self._poller = select.poll()
        # the engine's state is the loop's, except while a caller's thread
        # dispatches its own submit (see submit); the loop lets it go while it waits
        self._state_lock = threading.Lock()
        self._fault: BaseException | None = None  # raised in submit's dispatch: the loop raises it
        self._polled: dict[int, tuple[_WorkerState, bool] | None] = {}
        os.set_blocking(self._wake_w, False)
        # closed only when nobody can write to it any more (the read end closes when run() ends)
        weakref.finalize(self, os.close, self._wake_w)
        self._worker_ids = itertools.count()
        self._start_failures = 0
        self._start_error: BaseException | None = None
        self._cancels: list[tuple[set[int], threading.Event]] = []
        # seconds per task of recent functions, by Call.pace_key
        self._paces: OrderedDict[int, float] = OrderedDict()
        # (call id, pickled function, pace key) of the chunk sent last, if small
        # (see _preload); not the call, which would keep its results alive
        self._latest: tuple[int, bytes, int] | None = None
        # when the loop's wait ends by itself (time.monotonic()), or None: it waits for a message
        self._looks_at: float | None = None

    # -- the contract

    def kill_now(self) -> None:
        for state in list(self.workers.values()):
            state.handle.kill()
        self.shutdown(True)

    def worker_pids(self) -> list[int]:
        return [row.pid for row in self.monitor.snapshot() if row.pid is not None]

    def tiny(self, call: Call, n: int) -> bool:
        """Whether ``n`` tasks of ``call`` are, by its function's pace, less
        work all together than a second message takes (:data:`_TINY_SECONDS`).
        Such a call goes to one worker in one message (see :func:`_tiny`); the
        pool makes it one chunk, so that the worker runs and reports it once.
        Called from the caller's thread, without the engine's lock, which the
        loop still holds right after it delivered the caller's last call: one
        look-up in a dict (the loop's changes to it are single operations)."""
        pace = self._paces.get(call.pace_key)
        return pace is not None and call.timeout is None and pace * n < _TINY_SECONDS

    def pace(self, call: Call) -> float | None:
        return self._paces.get(call.pace_key)  # one look-up, as in tiny()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full (it will wake anyway) or already closed
            pass

    # -- the loop

    def submit(self, chunks: list[Chunk]) -> None:
        """Run these chunks: sent to the workers from the caller's thread
        while the loop waits, which is woken only if it must look sooner than
        it would; else (the loop is busy, or stopping) given to the loop.
        The loop woken for every call would take the interpreter's lock
        from the caller before it is asleep, in the middle of the call."""
        if not self._state_lock.acquire(blocking=False):
            super().submit(chunks)
            return
        wake: bool | None = True  # whatever happens here, the loop looks
        taken = False
        try:
            # a Ctrl-C here is raised at the end of this block, to the caller: the engine is whole
            with _interrupts_held():  # a KeyboardInterrupt must not split a message to a worker
                try:
                    if not self.stopped.is_set():
                        self._take_waiting()  # what other threads asked before
                    if self.stopping or self.stopped.is_set():
                        wake = None  # the loop answers, as after a shutdown
                    else:
                        taken = True
                        self._on_submit(chunks)
                        self._dispatch()
                        self._preload()
                        wake = bool(self.queue) or self._sooner(self._next_wakeup())
                except BaseException as exc:  # a fault of the engine's, not the caller's: the loop
                    self._fault = exc  # raises it as its own, and every task it holds then fails
                    wake = True if taken else None
        finally:
            self._state_lock.release()
            if wake:
                self._wake()
        if wake is None:
            super().submit(chunks)

    def _sooner(self, wait: float | None) -> bool:
        """Whether the loop must look within ``wait`` seconds, sooner than its wait ends."""
        return wait is not None and (self._looks_at is None or time.monotonic() + wait < self._looks_at)

    def _loop(self) -> None:
        with self._state_lock:
            self._start_missing()
        while True:
            with self._state_lock:
                if self._fault is not None:
                    raise self._fault
                self._take_waiting()
                self._retire_spent()
                # dispatch first: it may drop the last queued chunks (cancelled
                # futures), and then nothing would wake the wait below (gh-94440)
                self._dispatch()
                self._preload()
                if self.stopping and not self.queue and not any(w.chunks for w in self.workers.values()):
                    return
                wait = self._next_wakeup()
                self._looks_at = None if wait is None else time.monotonic() + wait
                poller, timeout = self._poller_for_workers(), _milliseconds(wait)
            ready = poller.poll(timeout)
            with self._state_lock:
                self._on_ready(ready)
                self._check_timeouts()
                self._check_memory(time.monotonic())

    def _close(self) -> None:
        try:
            self._stop_workers()
        finally:
            os.close(self._wake_r)
            self.launcher.close()

    def _held(self) -> Iterator[tuple[Chunk, Iterable[int]]]:
        queue, self.queue = self.queue, deque()
        for chunk in queue:
            yield chunk, range(len(chunk.indices))
        for state in self.workers.values():
            for _, chunk, positions in state.unreported():
                yield chunk, positions
            state.chunks.clear()
        for _, done in self._cancels:
            done.set()

    # -- commands

    def _on_submit(self, chunks: list[Chunk]) -> None:
        self.queue.extend(chunks)
        for chunk in chunks[:1]:
            if chunk.call.task_seconds is None:
                chunk.call.task_seconds = self._paces.get(chunk.call.pace_key)
        if self._start_error is not None:  # new work: try starting workers again
            self._start_error, self._start_failures = None, 0
            self._start_missing()

    def _on_shutdown(self, cancel_pending: bool) -> None:
        if cancel_pending:
            self._drop_queue()

    def _on_cancel(self, call: Call, done: threading.Event) -> None:
        for chunk in [c for c in self.queue if c.call is call]:
            self._drop(chunk)
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
                for chunk in state.chunks:
                    if chunk.call is call:
                        self._fail(chunk, range(len(chunk.indices)), errors.cancelled, *self._place(state))
                state.chunks = deque(c for c in state.chunks if c.call is not call)
        if doomed:
            self._cancels.append((doomed, done))
        else:
            done.set()

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
            if error is None:
                self._fail(chunk, range(len(chunk.indices)), lambda where: errors.cancelled(
                    where, ": the pool was shut down"))
            else:
                self._fail(chunk, range(len(chunk.indices)), _copy_of(error))

    # -- workers

    def _spent(self, state: _WorkerState) -> bool:
        """Whether ``state`` was sent all the tasks max_tasks_per_child allows (a chunk is never split)."""
        return self.max_tasks is not None and state.tasks >= self.max_tasks

    def _retire_spent(self) -> None:
        """Ask each worker that ran its last allowed tasks, or holds more memory
        than soft_memory between tasks, to leave, and start its replacement."""
        if self.max_tasks is None and self.resources.soft_memory is None:
            return
        for state in list(self.workers.values()):
            if state.retired is None and not state.chunks and state.kill_reason is None and (
                    self._spent(state) or self._over_soft(state)):
                state.retired = time.monotonic()
                try:
                    state.handle.conn.send_bytes(pickle.dumps(STOP))
                except OSError:
                    pass  # already gone: its sentinel says so
        self._start_missing()

    def _start_missing(self) -> None:
        # while stopping, only to run what is still queued (a worker died meanwhile)
        # a retired worker does not count: its replacement starts while it leaves
        while (sum(w.retired is None for w in self.workers.values()) < self.size
               and (not self.stopping or self.queue) and self._start_error is None):
            taken = {w.rank for w in self.workers.values() if w.retired is None}
            rank = min(set(range(self.size)) - taken)  # the slot it fills
            worker_id = next(self._worker_ids)
            handle = self.launcher.start_worker(worker_id, rank)
            self.workers[worker_id] = _WorkerState(handle, rank)
            self.monitor.worker_starting(worker_id, handle.pid, handle.current, rank=rank,
                                         device=self.resources.device(rank),
                                         memory_limit=self.resources.memory_limit)

    def _over_soft(self, state: _WorkerState) -> bool:
        """Whether an idle worker holds more than soft_memory (measured once per idle spell)."""
        soft = self.resources.soft_memory
        if soft is None or not state.ready:
            return False
        if state.measured != state.tasks:
            state.measured = state.tasks
            state.memory.sample()
        return state.memory.last > soft

    def _check_memory(self, now: float) -> None:
        """Sample busy workers' memory; kill a worker past max_memory (its task
        fails with WorkerMemoryError, see _settle_chunks)."""
        if not self.resources.watches_memory or now - self._sampled < SAMPLE_SECONDS / 2:
            return
        self._sampled = now
        limit = self.resources.max_memory
        for state in self.workers.values():
            if not state.chunks or state.kill_reason is not None:
                continue
            state.peak = max(state.peak, state.memory.sample())
            if limit is not None and state.memory.last > limit:
                state.kill_reason = ("memory", state.peak)
                state.handle.kill()

    def _place(self, state: _WorkerState) -> tuple[str, tuple[int, int]]:
        return f" in worker pid {state.handle.pid}", state.who

    # -- sending

    def _next_chunk(self) -> Chunk | None:
        while self.queue:
            chunk = self.queue.popleft()
            call = chunk.call
            if call.cancelled:
                self._drop(chunk)
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
        soft = self.resources.soft_memory
        usable = [w for w in self.workers.values()
                  if w.ready and w.open and w.kill_reason is None and w.retired is None and not self._spent(w)
                  and (soft is None or w.memory.last <= soft)]  # past soft_memory: it drains, then leaves
        # the worker that worked last comes first: its caches are warm and its
        # code has run.  A new pool's second call went otherwise to a worker
        # that had just started, still loading the function sent it to preload
        usable.sort(key=lambda state: state.since, reverse=True)
        # first every idle worker gets work, then busy ones are topped up when
        # both their call and the next are fast (see _FAST) and have no timeout
        now = time.monotonic()
        tiny = _tiny(self.queue)
        free = next((state for state in usable if not state.chunks), None) if tiny else None
        if free is not None:  # the whole call to one worker
            self._send(free, tiny)
        # a fair share of what is queued: the first idle worker must not take
        # every chunk of a map while the others wait
        share = -(-len(self.queue) // max(1, len(usable)))
        for idle in (True, False):
            for state in usable:
                if not self.queue:
                    return
                if idle == bool(state.chunks):
                    continue
                head = self.queue[0]
                room = share if idle and _short(head, share) else min(_ahead(head), share)
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
        held = len(state.chunks)
        while len(runs) < room and not self._spent(state):
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
        # one lock for the message's chunks, not one per chunk
        self.monitor.chunks_sent(state.handle.worker_id,
                                 [(c.seq, c.call.id, c.indices, c.sent) for c in itertools.islice(state.chunks, held, None)])
        try:
            write_frame(state.handle.conn.fileno(), pickle.dumps((Kind.RUNS, [tuple(run) for run in runs]),
                                                                 pickle.HIGHEST_PROTOCOL))
        except OSError:
            state.open = False  # dead: its sentinel fires and the chunks are requeued

    def _prepare(self, state: _WorkerState, chunk: Chunk) -> Run | None:
        """The run of ``chunk`` for this worker; the chunk is then the worker's."""
        call = chunk.call
        if chunk.data is None:
            try:
                chunk.data = dump_items(chunk.items, call)
            except BaseException as exc:  # SystemExit too: this thread must live on
                self._fail_unpicklable(chunk, exc)
                return None
        fn_data = None if _cached(state, call.id) else call.fn_bytes
        if fn_data is not None:
            _loads(state, call.pace_key)
        if call.fn_bytes is not None and len(call.fn_bytes) <= _PRELOAD_BYTES:
            self._latest = call.id, call.fn_bytes, call.pace_key
        now = time.monotonic()
        if not state.chunks:
            state.next_pos, state.since = 0, now
        chunk.sent = now
        state.chunks.append(chunk)
        state.tasks += len(chunk.indices)
        return Run(chunk.seq, len(chunk.indices), call.id, fn_data, chunk.data,
                   call.timeout is not None or chunk.careful, int(call.mode))

    def _preload(self) -> None:
        """Send the latest call's function to each idle worker that never
        loaded it (by its pickle: a new call of it needs no preload), so that
        it imports the function's module now, while another worker runs the
        call's first tasks, and not at its own first task of it (the next
        call's).  Small functions only: the message must not fill a pipe."""
        if self._latest is None:
            return
        call_id, fn_data, key = self._latest
        for state in self.workers.values():
            if (state.chunks or not state.ready or not state.open or state.kill_reason is not None
                    or state.retired is not None or key in state.loaded or self._spent(state)):
                continue
            _cached(state, call_id)
            _loads(state, key)
            try:
                state.handle.conn.send_bytes(pickle.dumps((Kind.LOAD, call_id, fn_data), pickle.HIGHEST_PROTOCOL))
            except OSError:
                state.open = False  # dead: its sentinel fires

    def _fail_unpicklable(self, chunk: Chunk, exc: BaseException) -> None:
        """Each task of a chunk whose items do not pickle fails with the doctor's sentence."""
        for pos, item in enumerate(chunk.items):
            args, kwargs = arguments(chunk.call.mode, item)
            self._fail(chunk, [pos], functools.partial(_pickling_error, exc, args=args, kwargs=kwargs))

    # -- receiving

    def _on_ready(self, ready: list[tuple[int, int]]) -> None:
        """Read what the workers whose descriptors are ``ready`` sent; a dead one's last messages, then its death."""
        polled = self._polled
        dead: list[_WorkerState] = []
        for fd, _ in ready:  # any event: data, end of file, an error or a closed descriptor
            found = polled.get(fd)
            if found is None:
                os.read(self._wake_r, 4096)
            elif found[1]:
                self._read(found[0], readable=True)
            else:
                dead.append(found[0])
        for state in dead:
            self._read(state)  # what it sent before it died
            self._on_death(state)

    def _poller_for_workers(self) -> Any:
        """The poller, registered for the wake pipe and each worker's
        connection (while open) and sentinel: one ``poll`` call a wait, where
        ``multiprocessing.connection.wait`` builds a selector each time."""
        want: dict[int, tuple[_WorkerState, bool] | None] = {self._wake_r: None}
        for state in self.workers.values():
            if state.open:
                want[state.handle.conn.fileno()] = (state, True)
            want[state.handle.sentinel] = (state, False)
        if want != self._polled:  # a worker came, left or closed its end
            for fd in self._polled.keys() - want.keys():
                self._poller.unregister(fd)
            for fd in want:
                self._poller.register(fd, select.POLLIN)
            self._polled = want
        return self._poller

    def _next_wakeup(self) -> float | None:
        """How long the loop may wait for a message (None: until one comes).
        One pass over the workers: the caller's submit asks it every call."""
        if self._cancels:
            return 0.05
        retired = starting = busy = False
        timeouts = []
        for w in self.workers.values():
            if w.kill_reason:
                return 0.05
            retired = retired or w.retired is not None
            starting = starting or not w.ready
            if w.chunks:
                busy = True
                if w.chunks[0].call.timeout is not None:
                    timeouts.append(w.chunks[0].call.timeout)
        if retired:
            return 0.1  # a retired worker that does not leave is killed (_check_timeouts)
        if starting:
            timeouts.append(min(5.0, self.start_timeout))  # start-up is bounded too
        if self.stopping and busy:
            timeouts.append(2.0)  # look for workers stopped by a signal (_check_timeouts)
        if self.resources.watches_memory and busy:
            timeouts.append(SAMPLE_SECONDS * 10)  # sample busy workers' memory
        if not timeouts:
            return None
        return max(0.01, min(0.1, min(timeouts) / 10))

    def _read(self, state: _WorkerState, readable: bool = False) -> None:
        """Act on the messages a worker sent: those waiting now, in one read
        when its pipe is ``readable`` (the loop's wait said so: anything
        sent later wakes the next wait); else (a dead worker's last words)
        until none is left."""
        while state.open and (readable or state.inbox.poll(0)):
            try:
                frames = read_frames(state.handle.conn.fileno())
            except (EOFError, OSError):
                state.open = False
                return
            for data in frames:
                if state.open:  # (not after a message that did not load)
                    self._on_worker_message(state, data)
            if readable:
                return

    def _on_worker_message(self, state: _WorkerState, data: bytes | bytearray) -> None:
        try:
            message = pickle.loads(data)
        except BaseException as exc:  # values are loaded one by one (_unpack): not expected
            self._unreadable(state, exc)
            return
        kind = message[0]
        if kind == Kind.RECORDS:
            self._on_records(state, [Record._make(record) for record in message[1]])
        elif kind == Kind.HELLO:
            state.ready = True
            self._start_failures = 0
            self.monitor.worker_started(state.handle.worker_id, message[1], message[2])
        elif kind == Kind.INIT_FAILED:
            state.init_failure = message[2]
        elif kind == Kind.PROGRESS:
            progress = Progress._make(message[1])
            self.monitor.task_progress(state.handle.worker_id, progress.seq, progress.position,
                                       progress.done, progress.total, progress.note)

    def _unreadable(self, state: _WorkerState, exc: BaseException) -> None:
        """A message from a worker that does not load here: the tasks it held
        fail, the worker is replaced, and the engine serves on."""
        for _, chunk, positions in state.unreported():
            self._fail(chunk, positions, lambda where: errors.failure_here(("message from its worker", exc), where),
                       *self._place(state))
        state.chunks.clear()
        state.open = False
        state.kill_reason = ("unreadable",)
        state.handle.kill()

    def _on_records(self, state: _WorkerState, records: list[Record]) -> None:
        """Record a message's records in the monitor, then deliver each run of
        one call's records at once: at chunksize 1 a message holds many
        chunks, and the caller's lock is then taken once, not per chunk."""
        call: Call | None = None
        runs: list[tuple] = []  # for the monitor, told before delivery (see _on_record)
        indices: list[Sequence[int]] = []  # each record's, joined at delivery
        values: list[Any] = []
        failed: list[int] = []
        output: dict[int, list] = {}
        worker, pid = state.who
        for record in records:
            got = self._on_record(state, record)
            if got is None:
                continue
            chunk_call, outcomes, run = got
            if call is not None and (chunk_call is not call or call.future is not None):
                self.monitor.runs_ended(worker, pid, runs)
                call.deliver(_joined(indices), values, failed, output)
                runs, indices, values, failed, output = [], [], [], [], {}
            call = chunk_call
            runs.append(run)
            indices.append(outcomes.indices)
            values += outcomes.values
            failed += outcomes.failed
            if outcomes.output:
                output.update(outcomes.output)
        if call is not None:
            self.monitor.runs_ended(worker, pid, runs)
            call.deliver(_joined(indices), values, failed, output)

    def _on_record(self, state: _WorkerState, record: Record) -> tuple[Call, Outcomes, tuple] | None:
        """Read ``record``: its call, its outcomes to deliver, and what the
        monitor is told of it (``Monitor.runs_ended``), before they are
        delivered, so that a summary made when the caller wakes counts them;
        None: ignored."""
        if not state.chunks or state.chunks[0].seq != record.seq:
            return None  # a chunk cancelled while it waited behind another call's task
        chunk = state.chunks[0]
        call, pid, first = chunk.call, state.handle.pid, record.first
        outcomes = read_record(chunk, record, f"in worker pid {pid}")
        state.next_pos = first + len(outcomes.values)
        state.since = time.monotonic()
        # recorded before delivered: a summary made when the caller wakes counts them
        starts = record.starts if not first else {pos - first: t for pos, t in record.starts.items()}
        ended = None
        if record.final:
            if first == 0:
                self._learn_pace(call, (record.end - record.starts[0]) / len(outcomes.values))
            state.chunks.popleft()
            state.next_pos = 0
            ended = record.seq
        return call, outcomes, (call.id, outcomes.indices, starts, record.end, outcomes.errors, ended)

    def _learn_pace(self, call: Call, seconds: float) -> None:
        """Update the call's seconds per task, and remember it for its function."""
        if call.task_seconds is not None:
            seconds = (call.task_seconds + seconds) / 2
        call.task_seconds = self._paces[call.pace_key] = seconds
        self._paces.move_to_end(call.pace_key)
        while len(self._paces) > _PACES_KEPT:
            self._paces.popitem(last=False)

    # -- timeouts

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for state in self.workers.values():
            if not state.ready and state.kill_reason is None and now - state.started > self.start_timeout:
                state.kill_reason = ("start-timeout", now - state.started)
                state.handle.kill()
            if state.retired is not None and now - state.retired > _RETIRE_GRACE:
                state.handle.kill()  # it was told to leave and did not (an atexit handler that hangs)
            if not state.chunks or state.kill_reason is not None:
                continue
            if self.stopping and process_stopped(state.handle.pid):
                # stopped by a signal, it would hold the shutdown forever
                state.kill_reason = ("stopped-by-signal",)
                state.handle.kill()
                continue
            self._check_task_timeout(state, now)

    def _check_task_timeout(self, state: _WorkerState, now: float) -> None:
        chunk = state.chunks[0]
        if chunk.call.timeout is None:
            return
        seq, pos, started = state.handle.current()
        limit = chunk.call.timeout
        if seq != chunk.seq:
            # still loading the function and arguments (an import may take
            # seconds): that is not the task's time, up to a grace period
            pos, started, limit = state.next_pos, state.since, limit + _LOAD_GRACE
        elif pos < state.next_pos:
            pos, started = state.next_pos, state.since
        else:
            # no task of the chunk starts before it is sent: a bound that
            # holds even for a slot read half-written on a machine that
            # reorders the worker's stores
            started = max(started, chunk.sent)
        if now - started > limit:
            state.kill_reason = ("timeout", pos, now - started)
            state.handle.kill()

    # -- deaths

    def _on_death(self, state: _WorkerState) -> None:
        handle = state.handle
        handle.kill()  # what its tasks started, before the worker is reaped
        handle.join(1.0)
        exitcode = handle.exitcode
        self.workers.pop(handle.worker_id, None)
        reason = state.kill_reason
        why = reason[0] if reason else ("stopped" if self.stopping or state.retired else errors.signal_name(exitcode))
        # gone from the monitor (and pool.pids) before its tasks fail: who reads the
        # failure must not still find the dead worker listed
        self.monitor.worker_stopped(handle.worker_id, handle.pid, exitcode, why)
        self.queue.extendleft(reversed(self._settle_chunks(state, exitcode)))
        self._judge_start(state, exitcode)
        handle.close()
        for doomed, done in list(self._cancels):
            doomed.discard(handle.worker_id)
            if not doomed:
                done.set()
                self._cancels.remove((doomed, done))
        self._start_missing()

    def _settle_chunks(self, state: _WorkerState, exitcode: int | None) -> list[Chunk]:
        """Fail the tasks a dead worker's end explains; the chunks of the rest, to run again."""
        handle, reason = state.handle, state.kill_reason
        place = self._place(state)
        requeue = []
        # the chunk the worker was in when it died: chunks before it ended but
        # their records were still batched in the worker, so they run again
        slot_seq, slot_pos, batch_end = handle.crash_position()
        crashed = next((n for n, c in enumerate(state.chunks) if c.seq == slot_seq), 0)
        for n, chunk, unreported in state.unreported():
            if chunk.call.cancelled:
                self._fail(chunk, unreported, errors.cancelled, *place)
                continue
            if reason and reason[0] == "stopped-by-signal":
                self._fail(chunk, unreported, lambda where: BrokenProcessPool(
                    f"{where} did not finish: its worker (pid {handle.pid}) was stopped by a signal when the "
                    "pool shut down, and was killed"), *place)
                continue
            culprit, error, careful = None, None, False
            if n == 0 and reason and reason[0] == "timeout":
                culprit, error = reason[1], _timeout(reason[2], chunk.call.timeout, handle.pid)
            elif n == crashed and (not reason or reason[0] == "memory"):
                # killed past max_memory: pinned to its task as a crash is
                culprit = slot_pos if slot_seq == chunk.seq and slot_pos >= unreported.start else unreported.start
                error = errors.crash_error(handle.pid, exitcode, handle.crash_report()) if not reason else \
                    errors.memory_error(handle.pid, reason[1], self.resources.max_memory or 0,
                                        self.resources.given.get("max_memory"))
                if culprit == slot_pos and batch_end > slot_pos + 1:
                    # it died inside a batch of fast tasks: which one is not
                    # known, so they run again one by one, and the next crash names it
                    culprit = error = None
                    careful = True
            if culprit is not None and error is not None:
                self._fail(chunk, [culprit], error, *place)
            rest = [p for p in unreported if p != culprit]
            if rest:
                again = chunk.rest(rest)
                again.careful = careful or chunk.careful
                requeue.append(again)
        return requeue

    def _judge_start(self, state: _WorkerState, exitcode: int | None) -> None:
        """After a worker died: give up starting workers when they cannot start."""
        reason = state.kill_reason
        if reason and reason[0] == "start-timeout":
            # another try would take as long: fail the waiting work, unless
            # other workers did start and can run it
            if not any(w.ready for w in self.workers.values()):
                self._start_error = errors.start_timeout_error(self.initializer, self.start_timeout)
                self._drop_queue(self._start_error)
        elif not state.ready and not state.chunks and not self.stopping:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                self._start_error = errors.start_error(exitcode, state.init_failure)
                self._drop_queue(self._start_error)

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


def _pickling_error(exc: BaseException, where: str, args: tuple, kwargs: dict) -> BaseException:
    return errors.pickling_error(exc, where, args, kwargs)


def _timeout(seconds: float, timeout: float | None, pid: int) -> Callable[[str], BaseException]:
    return lambda where: errors.timeout_error(where, seconds, timeout or 0.0,
                                              f"its worker (pid {pid}) was killed and replaced")


def _copy_of(error: BaseException) -> Callable[[str], BaseException]:
    def make(where: str) -> BaseException:
        exc = type(error)(*error.args)
        exc.__cause__ = error.__cause__
        return exc

    return make


class _interrupts_held:
    """In the main thread, SIGINT's handler is run only at the end of the
    block: the block changes the engine's state, which a KeyboardInterrupt
    between two steps would break (a message half written to a worker).

    It runs for every call, so it swaps handlers with ``_signal``'s own
    functions: ``signal.signal`` converts each handler to and from its enum
    (a ``ValueError`` caught for every callable), 27 µs a block against 4
    (``tests/test_hangs.py`` checks that the two agree)."""

    __slots__ = ("handler", "frames")

    def __enter__(self) -> None:
        self.handler = handler = _getsignal(signal.SIGINT)
        self.frames: list[Any] | None = None
        if callable(handler) and threading.current_thread() is threading.main_thread():
            frames: list[Any] = []
            _setsignal(signal.SIGINT, lambda signum, frame: frames.append(frame))
            self.frames = frames  # else SIGINT's handler runs in the main thread only

    def __exit__(self, *exc: object) -> None:
        frames = self.frames
        if frames is None:
            return
        _setsignal(signal.SIGINT, self.handler)
        if frames:
            self.handler(signal.SIGINT, frames[0])


def _milliseconds(seconds: float | None) -> int | None:
    """A wait in seconds as ``poll`` takes it: whole milliseconds, rounded
    up (a wait must not end before its time); None: no end."""
    return None if seconds is None else math.ceil(seconds * 1000)


def _chunk_seconds(chunk: Chunk) -> float | None:
    """How long ``chunk`` should take in a worker, once its call's pace is known."""
    pace = chunk.call.task_seconds
    return None if pace is None else pace * len(chunk.indices)


def _joined(pieces: list[Sequence[int]]) -> Sequence[int]:
    """The task indices of several records as one sequence: one range when
    they are ranges that follow each other (a map's usual case), so that no
    list of every index is built."""
    if len(pieces) == 1:
        return pieces[0]
    if all(type(p) is range and p.step == 1 for p in pieces) and all(
            a.stop == b.start for a, b in zip(pieces, pieces[1:])):  # type: ignore[attr-defined]
        return range(pieces[0].start, pieces[-1].stop)  # type: ignore[attr-defined]
    return [i for piece in pieces for i in piece]


def _reserve_ok(chunk: Chunk) -> bool:
    """Whether ``chunk`` may wait behind another on a busy worker: it is fast,
    and its call has no timeout (a timeout counts from when a task starts)."""
    seconds = _chunk_seconds(chunk)
    call = chunk.call
    return seconds is not None and seconds < _FAST and call.timeout is None and not call.cancelled


def _loads(state: _WorkerState, key: int) -> None:
    """The worker is sent the function of pace key ``key`` to load (see ``_preload``)."""
    if len(state.loaded) >= _PACES_KEPT * 8:
        state.loaded.clear()  # a notebook that made hundreds of functions: preload them again
    state.loaded.add(key)


def _tiny(queue: deque[Chunk]) -> int:
    """How many chunks of one call lead the queue when they are that call's
    queued work and it is tiny all together (:data:`_TINY_SECONDS`), else 0."""
    head = queue[0]
    seconds = _chunk_seconds(head)
    if seconds is None or not _reserve_ok(head):
        return 0
    fit = int(_TINY_SECONDS / max(seconds, 1e-9))  # how many such chunks are tiny work
    if len(queue) > fit and queue[fit].call is head.call:
        return 0
    return sum(1 for _ in itertools.takewhile(lambda chunk: chunk.call is head.call, queue))


def _short(chunk: Chunk, count: int) -> bool:
    """Whether ``count`` chunks like ``chunk`` are fast work all together: an
    idle worker then takes its whole share of the queue at once.  A pace
    learned at chunksize 1 counts each task's own bookkeeping, so a map's
    chunks look slower than they run: by ``_ahead`` alone the first map
    after it went in two rounds (each worker's records read before the rest
    was sent)."""
    seconds = _chunk_seconds(chunk)
    return seconds is not None and _reserve_ok(chunk) and seconds * count < _FAST


def _ahead(chunk: Chunk) -> int:
    """How many chunks like ``chunk`` a worker may hold at once."""
    seconds = _chunk_seconds(chunk)
    if seconds is None or not _reserve_ok(chunk):
        return 1
    return max(2, min(_MAX_AHEAD, int(_AHEAD_SECONDS / max(seconds, 1e-6))))
