"""What runs inside a worker process.

A worker talks to its pool over one private duplex connection.  It receives
messages of one or more chunks of tasks and answers with records, one per
task, each carrying the task's value or failure, what the task printed, and
when it started and ended.  Records are sent when the message's last chunk
ends, or earlier when the work has run for a while, so a thousand tiny tasks
cost one message each way (whether the caller chunked them or not) and slow
tasks report each one as it ends.  Records are columns (the values, failures
and output by position, start times), which pickle fast.

The worker writes which task it runs into a small shared-memory slot, which
lets the parent see, without any message, which task a worker is running:
for the live view, and after a crash to name the task that was running.  The
clock is read, and the chunk and time written, only at some tasks: before
every one while tasks are slow, the call has a timeout (which then counts
from each task's start) or a task printed, and ever more rarely while they
run fast.  The tasks between two readings run in one C call (a batch, whose
span the slot holds; a crash inside it re-runs its tasks one by one to name
the culprit).  A record carries the start times taken; the tasks between two
of them ran evenly between those times.  So a trivial task costs about 30 ns
in the worker.

The messages are :mod:`mpnb._protocol`'s; what a dask worker runs the same
way (calling, failures, packing values) is in :mod:`mpnb._task`.  This module
imports nothing heavy: it is the first thing a worker loads.
"""

from __future__ import annotations

import _thread
import io
import mmap
import os
import sys
import time
from collections import OrderedDict

from mpnb import _task, reporting
from mpnb._protocol import (BATCH_LOOK_SECONDS, BIG_SIZE, FLUSH_SECONDS, FUNCTION_CACHE_SIZE, MAX_STRIDE, PARTIAL_SECONDS,
                            SIZE, SLOT, STOP, STRIDE_SECONDS, Boot, Kind, Progress, Record, Run, write_frame)
from mpnb._task import Failure, caller, dumps, dumps_plain, hide_frames_of, load_failure, loads, pack

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a worker 3 ms of start-up
    import signal
    from typing import Any
else:
    # the C module: signal's enums cost a worker 2 ms of start-up (its
    # threads start with _thread: threading costs 1 ms more, 4 ms cold)
    import _signal as signal

hide_frames_of(__file__)

# ------------------------------------------------------------------ output


class _Stream(io.TextIOBase):
    """A text stream that records each write as ``(name, text)``."""

    def __init__(self, capture: "_Capture", name: str):
        self._capture = capture
        self.name = name

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            self._capture.segments.append((self.name, text))
        return len(text)


class _Capture:
    """Per-task output: the stdout/stderr writes of the task running now."""

    def __init__(self) -> None:
        self.segments: list[tuple[str, str]] = []
        self.stdout = _Stream(self, "stdout")
        self.stderr = _Stream(self, "stderr")


_logging_routed = False


def _route_logging() -> None:
    """Once ``logging`` is in use, give the root logger a handler that
    writes to whatever ``sys.stderr`` is now, so log records land with the
    task's output.  Deferred until then: importing ``logging`` would add
    about 9 ms to every worker's start."""
    global _logging_routed
    _logging_routed = True
    import logging

    class CurrentStderrHandler(logging.StreamHandler):
        """A ``StreamHandler`` that follows the per-task capture instead of
        keeping the stream it was created with."""

        @property
        def stream(self):  # noqa: D102
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    root = logging.getLogger()
    if not root.handlers:
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
        root.addHandler(handler)


# ------------------------------------------------------------------ worker


class _Worker:
    def __init__(self, conn, slot_path: str):
        self.conn = conn
        slot_fd = os.open(slot_path, os.O_RDWR)
        try:
            self.slot = mmap.mmap(slot_fd, SLOT.size)
        finally:
            os.close(slot_fd)
        # the slot's fields as 8-byte words, each written with one store
        # (SLOT: seq, position, time, batch end, batch task); see _run_tasks and _run_batch
        self.position = memoryview(self.slot).cast("q")
        self.clock = memoryview(self.slot).cast("d")
        self.functions: OrderedDict[int, Any] = OrderedDict()
        # (call, stride, time of the last reading) where the last chunk ended:
        # the next chunk of the same call goes on from there, not from a stride of 1
        self.pace: tuple[int, int, float] = (-1, 1, 0.0)
        _task.share_results = slot_path  # large results through shared memory, named after the slot
        self.capture = _Capture()
        self.pending: list[Record] = []  # records not sent yet
        self.last_sent = time.monotonic()
        # a task's own threads may report progress while this one sends records
        self.send_lock = _thread.allocate_lock()
        self.seq = -1  # the chunk running now, for progress reports
        #: (values, first) while tasks run in one C call (see _run_tasks)
        self.batch: tuple[list, int] | None = None
        # held while no batch runs: the thread of _look_at_batches waits on it
        # (None until serve starts that thread)
        self.look_wake: Any = None
        reporting.process_sink = (os.getpid(), self.send_progress, self.running)  # mpnb.report sends here
        self.warm = False  # see _warm_up
        mallopt = getattr(_libc(), "mallopt", None) if _LINUX else None
        if mallopt is not None:
            # glibc maps each block of over 128 KiB afresh and gives the top of
            # its heap back once 128 KiB of it are free, so a task's temporary
            # arrays and each call's buffers fault in again every time.  glibc
            # raises both limits itself once such a block is freed, but not
            # after mallopt: both are set here, to the ceiling of its own.
            # (a pandas groupby of 500,000 rows: 38 ms with the trim limit alone, 20 with both)
            mallopt(_M_MMAP_THRESHOLD, _MAPPED_FROM)
            mallopt(_M_TRIM_THRESHOLD, _HEAP_KEPT)

    def _warm_up(self) -> None:
        """Get ready, once idle (no message for ``_WARM_AFTER``), for a first
        call of many fast tasks: touch the memory its objects take (CPython
        keeps one emptied arena of small objects, glibc its heap up to
        ``_HEAP_KEPT``).  In steps, each begun only while no message waits;
        done once, and again at the next idle moment if a message came
        first.  Without it the first map of 20,000 trivial tasks took some 200
        page faults in two workers and about 10% longer than the next one."""
        held: list[list[int]] = []
        while not self.conn.poll():
            if len(held) == _WARM_STEPS:
                self.warm = True
                return
            held.append(list(range(_WARM_FIRST, _WARM_FIRST + _WARM_STEP)))  # ints past the cached ones

    def report(self, record: Record, flush: bool) -> None:
        """Queue a record; send every queued one if ``flush`` or they are old.
        Records left queued wait for the message's next chunks; if those
        take long (a slow task where the pace promised fast ones), the thread
        of :meth:`_look_at_batches` sends them once they are old."""
        with self.send_lock:
            self.pending.append(record)
            if flush or time.monotonic() - self.last_sent > FLUSH_SECONDS:
                self._send_pending()
                return
        wake = self.look_wake
        if wake.locked():  # only this thread releases it: never one release too many
            wake.release()

    def _send_pending(self) -> None:
        """Send the queued records, in one message (``send_lock`` held)."""
        records, self.pending, self.last_sent = self.pending, [], time.monotonic()
        # builtin data only (no failure, plain values) pickles in one pass;
        # else each value alone, so that one the parent cannot load fails its task alone
        data = dumps_plain((int(Kind.RECORDS), [tuple(r) for r in records]))
        if data is None:
            data = dumps((Kind.RECORDS, [tuple(pack(r)) for r in records]))
        self.conn.send_bytes(data)

    def running(self) -> tuple[int, int]:
        """The task running now, as ``mpnb.report`` names it."""
        batch = self.batch
        if batch is not None:  # values.extend(map(...)) adds each value as its task returns
            return self.seq, batch[1] + len(batch[0])
        return self.seq, self.position[1]

    def _look_at_batches(self) -> None:
        """Start the thread that writes, while a batch of tasks runs in one C
        call, the task it has reached into the slot (see :data:`SLOT`): a
        slow task among fast ones shows in the live view as itself; and that
        sends queued records once they are ``FLUSH_SECONDS`` old (see
        :meth:`report`).  Between batches, with no record queued, it waits on
        :attr:`look_wake`, which each batch's start and each record queued
        release: an idle worker, or one running slow tasks, never wakes it.
        Started by :meth:`serve` right after the hello, while the parent
        answers it.  Started at a call's first queued record instead, it
        cost that call the thread's start: in a map of 2 tasks right after a
        new pool's first result, 0.17 ms between the tasks against 0.04."""
        reached, wake = self.position, _thread.allocate_lock()  # the slot, as 8-byte words

        def look() -> None:
            while True:
                time.sleep(BATCH_LOOK_SECONDS)
                batch = self.batch
                if batch is not None:
                    reached[4] = batch[1] + len(batch[0])
                if self.pending:
                    with self.send_lock:
                        if self.pending and time.monotonic() - self.last_sent > FLUSH_SECONDS:
                            try:
                                self._send_pending()
                            except OSError:  # the parent is gone: the serve loop ends
                                return
                elif batch is None:
                    wake.acquire()  # until a batch starts or a record waits (at once if one did since)

        wake.acquire()
        self.look_wake = wake
        _thread.start_new_thread(look, ())  # not threading's: see the imports

    def send_progress(self, done: float, total: float | None, note: str | None) -> None:
        """``mpnb.report`` of the running task (throttled by the caller); an
        update that would wait for a record being sent is dropped."""
        if not self.send_lock.acquire(blocking=False):
            return
        try:
            progress = Progress(*self.running(), done, total, note)
            self.conn.send_bytes(dumps((Kind.PROGRESS, tuple(progress))))
        finally:
            self.send_lock.release()

    def function(self, key: int, data: bytes | None):
        # the parent decides what to send from a mirror of this LRU cache, so
        # both sides must update it in exactly the same way
        if data is not None:
            try:
                value = loads(data)
            except BaseException as exc:
                value = exc
            self.functions[key] = value
            while len(self.functions) > FUNCTION_CACHE_SIZE:
                self.functions.popitem(last=False)
        else:
            value = self.functions[key]
        self.functions.move_to_end(key)
        if isinstance(value, BaseException):
            raise value
        return value

    def preload(self, key: int, data: bytes) -> None:
        """Load a call's function while idle (its module's import too), so
        that this worker's first task of the call does not wait for it; a
        failure is kept, and fails the call's chunks as loading them would."""
        try:
            self.function(key, data)
        except BaseException:  # noqa: S110  (kept in the cache, see function())
            pass

    def run_chunk(self, run: Run, last: bool) -> None:
        """Run one chunk; report columns: values, failures by position,
        output by position (only tasks that printed), start times of the
        tasks that were timed.  The records go out at once if this is the
        message's ``last`` chunk."""
        try:
            task = caller(self.function(run.call, run.fn_data), run.mode)
            items = loads(run.items_data)
            if not _logging_routed and "logging" in sys.modules:
                _route_logging()
        except BaseException as exc:
            self.report(load_failure(run.seq, run.count, exc), last)
            return
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.capture.stdout, self.capture.stderr
        self.seq = run.seq
        try:
            record = self._run_tasks(run.seq, task, items, run.flush_each, run.call)
        finally:
            sys.stdout, sys.stderr = saved
        self.report(record, last)

    def _run_tasks(self, seq: int, task, items: list, flush_each: bool, call: int) -> Record:
        """Run a chunk's tasks; the record of those not reported yet.  The clock
        is read before every task while tasks are slow, a timeout needs each start or a
        task printed, else ever more rarely; the tasks between two readings run as a
        batch (:meth:`_run_batch`).  See docs/architecture.md."""
        capture, monotonic = self.capture, time.monotonic
        position, clock = self.position, self.clock
        reported = reporting.task_starts()  # the latest mpnb.report's done, emptied as a task starts
        segments: list[tuple[str, str]] = []
        capture.segments = segments
        first, check_at, pos, n = 0, 0, 0, len(items)
        stride, checked = (self.pace[1], self.pace[2]) if self.pace[0] == call else (1, 0.0)
        values: list[Any] = []
        failures: dict[int, Failure] = {}
        outputs: dict[int, list] = {}
        starts: dict[int, float] = {}
        flush_at = -1.0 if flush_each else self.last_sent + PARTIAL_SECONDS
        one_by_one = flush_each
        # this loop is the whole cost of a trivial task: keep it lean
        while pos < n:
            if pos >= check_at:
                now = monotonic()
                if now > flush_at and pos > first:
                    self.report(Record(seq, first, values, failures, outputs, starts, now, False), True)
                    first, values, failures, outputs, starts = pos, [], {}, {}, {}
                    flush_at = -1.0 if flush_each else self.last_sent + PARTIAL_SECONDS
                    stride = 1
                elif one_by_one:
                    stride = 1
                else:
                    stride = _next_stride(stride, now - checked)
                # the time first and the seq last: a read of the slot between two stores must never
                # pair this chunk's seq with an older time (a task just started would look hours old)
                clock[2] = now
                position[1] = pos
                position[0] = seq
                starts[pos] = checked = now
                check_at = pos + stride
            end = check_at if check_at < n else n
            if end - pos > 1:
                pos = self._run_batch(task, items, pos, end, values, first, failures)
                if segments:  # printed in the batch: shown with its last task
                    outputs[pos - 1] = segments
                    capture.segments = segments = []
                    one_by_one, check_at = True, pos
                continue
            position[1] = pos
            reported.cell_contents = None
            try:
                values.append(task(items[pos]))
            except BaseException as exc:
                values.append(None)
                failures[pos] = Failure.from_exception(exc)
            if segments:
                outputs[pos] = segments
                capture.segments = segments = []
                one_by_one = True
            pos += 1
        self.pace = (call, stride, checked)
        return Record(seq, first, values, failures, outputs, starts, monotonic(), True)

    def _run_batch(self, task, items: list, pos: int, end: int, values: list, first: int,
                   failures: dict[int, Failure]) -> int:
        """Run tasks ``pos`` to ``end`` - 1 in one C call, their values added
        to ``values`` (which starts at task ``first``); the next position.
        The slot holds the batch's span (see :data:`SLOT`); a task that
        raises stops the batch there, and the batch goes on after it."""
        position = self.position
        position[4] = pos
        position[3] = end
        position[1] = pos
        reporting.task_starts().cell_contents = None
        self.batch = (values, first)  # which task runs: first + len(values)
        wake = self.look_wake
        if wake.locked():  # only this thread releases it: never one release too many
            wake.release()
        while pos < end:
            try:
                values.extend(map(task, items[pos:end]))  # at C speed
                pos = end
            except BaseException as exc:  # the task at the first value not added
                pos = first + len(values)
                values.append(None)
                failures[pos] = Failure.from_exception(exc)
                pos += 1
        self.batch = None
        position[3] = 0
        return pos

    def serve(self) -> None:
        self.conn.send_bytes(dumps((Kind.HELLO, os.getpid(), time.monotonic())))
        self._look_at_batches()
        call = None
        while True:
            if not self.warm and not self.conn.poll(_WARM_AFTER):
                self._warm_up()  # idle, with nothing to do: after the hello, a function's preload or a call
            try:
                message = loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                return  # the parent is gone or closed the connection
            if message is STOP:
                return
            if message[0] == Kind.LOAD:
                self.preload(message[1], message[2])
                continue
            runs = [Run._make(run) for run in message[1]]  # plain tuples on the wire
            if not self.pending:
                # records go out when the message's last chunk ends, or once
                # FLUSH_SECONDS passed since it came: not at its first task
                # because the worker was idle before
                self.last_sent = time.monotonic()
            # a message holds chunks of one call; a message of another call
            # may come before this worker was ever idle, so the arrays of the
            # call before are let go here too
            if runs and runs[0].call != call:
                call = runs[0].call
                shared = sys.modules.get("mpnb.shared")
                if shared is not None:
                    shared.forget()
            for n, run in enumerate(runs):
                self.run_chunk(run, n == len(runs) - 1)
            shared = sys.modules.get("mpnb.shared")
            if shared is not None and not self.conn.poll():
                shared.forget()  # idle: let go of the call's shared arrays


def _next_stride(stride: int, took: float) -> int:
    """How many tasks to run before the next reading of the clock, after
    ``stride`` tasks took ``took`` seconds: as many as fit in
    ``STRIDE_SECONDS`` at that pace, at most twice ``stride``; 1 after a
    stride that took over twice ``STRIDE_SECONDS`` (a slow task among fast
    ones: the tasks after it are timed each again).  Tasks of 1 ms then run
    50 at a time in one C call: read before each, they took some 4 us more
    a task (measured in a map of 10,000 tasks that spin on the thread's CPU
    clock), 0.4% of the map."""
    if took > 2 * STRIDE_SECONDS:
        return 1
    fits = STRIDE_SECONDS * stride / took if took > 0 else MAX_STRIDE
    return max(1, min(2 * stride, int(fits), MAX_STRIDE))


# ----------------------------------------------------------- process setup

#: in a worker's environment from its start (exec and loky launchers), so its
#: descendants carry it: after a worker crashed, the processes it started that
#: left its process group are found by it
WORKER_VAR = "MPNB_WORKER"

_LINUX = sys.platform.startswith("linux")
#: mallopt's parameters; the size from which a worker's blocks are mapped alone
#: (glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64 bits), and what of its freed heap
#: it keeps (twice that, as glibc's own adjustment sets)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MAPPED_FROM = 32 << 20
_HEAP_KEPT = 64 << 20
#: how long a worker waits for a message before it warms up: calls that
#: come back to back (a loop of maps) find it at rest, not warming up
_WARM_AFTER = 0.02
#: _Worker._warm_up's steps: 64 lists of 512 new ints, 1 MiB of small objects in
#: all, some 10 µs a step; none on a free-threaded build, whose allocator
#: (mimalloc) gives freed pages back
_WARM_STEPS = 0 if "free-threading" in sys.version else 64
_WARM_STEP, _WARM_FIRST = 512, 1000
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _processes() -> list[tuple[int, int, int]]:
    """``(pid, parent pid, process group)`` of every process on the machine."""
    found = []
    if not _LINUX:
        import psutil  # not needed on Linux, where /proc is cheaper to read

        for process in psutil.process_iter(["ppid"]):
            try:
                found.append((process.pid, process.info["ppid"], os.getpgid(process.pid)))
            except OSError:
                continue
        return found
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields:
            found.append((int(name), int(fields[1]), int(fields[2])))
    return found


def _stat_fields(pid: int) -> list[bytes]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent
    pid, process group, ...); none for a process that is gone (Linux only)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return []
    # the command name may hold spaces and parentheses: fields follow the last ")"
    return stat[stat.rindex(b")") + 2:].split()


def _children_by_parent() -> dict[int, list[int]]:
    """``{parent pid: [child pids]}`` of every process on the machine."""
    tree: dict[int, list[int]] = {}
    for pid, ppid, _ in _processes():
        tree.setdefault(ppid, []).append(pid)
    return tree


def _group(pgid: int) -> list[int]:
    """The members of process group ``pgid``."""
    return [pid for pid, _, group in _processes() if group == pgid]


def descendants(pid: int) -> list[int]:
    """The pids below ``pid``, children first."""
    tree = _children_by_parent()
    found, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return True  # ended (or a zombie elsewhere): the group it led may outlive it
    except PermissionError:
        return False


def _is_guardian(pid: int) -> bool:
    """True for a worker's guardian (Linux, where it is named)."""
    if not _LINUX:
        return False
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip() == GUARDIAN_NAME.encode()
    except OSError:
        return False


#: how long a resource tracker of the tree (multiprocessing's, loky's) is
#: given, once every other process of the tree is dead, to see its pipe's
#: EOF, unlink what its clients left (named semaphores, shared memory) and exit
TRACKER_GRACE = 2.0


def _cmdline(pid: int) -> bytes:
    if _LINUX:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""
    import psutil

    try:
        return "\0".join(psutil.Process(pid).cmdline()).encode()
    except psutil.Error:
        return b""


def _is_tracker(pid: int) -> bool:
    """True for a resource tracker: it unlinks on EOF, so it ends last."""
    return b"resource_tracker import main" in _cmdline(pid)


def _gone(pid: int) -> bool:
    if _LINUX:
        fields = _stat_fields(pid)
        return not fields or fields[0] in (b"Z", b"X")
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def end_trackers(trackers: list[int], grace: float = TRACKER_GRACE) -> None:
    """Let ``trackers`` (pids; one may be listed twice) exit by themselves, then SIGKILL those left.

    A resource tracker ignores SIGINT and SIGTERM and, when its pipe's last
    writer is gone, unlinks what is still registered (the named semaphores of
    a spawn Pool, a ``SharedMemory``) and exits.  Killed with the rest of a
    tree, it would leave them in ``/dev/shm`` for good; so it is resumed
    (a half-done kill may have stopped it) and waited for, ``grace`` at most.
    """
    for pid in trackers:
        _signal(pid, signal.SIGCONT)
    deadline = time.monotonic() + grace
    while any(not _gone(pid) for pid in trackers) and time.monotonic() < deadline:
        time.sleep(0.005)
    for pid in trackers:
        _signal(pid, signal.SIGKILL)


def kill_tree(root: int, include_root: bool = True) -> None:
    """SIGKILL everything ``root`` started, and ``root`` itself if ``include_root``.

    The one way a worker is ended, from the pool (timeout, crash, Cancel,
    shutdown), from inside the worker (its parent is gone, or it exits) and
    from its guardian (the worker died).
    Everything below ``root`` is stopped first, until no new process appears,
    so that nothing forks while it is being killed; then its process group
    (a worker leads its own) catches members no longer below it.

    A guardian is never stopped, and is killed last: should the process
    that kills die half-way (a kernel SIGKILLed while it shuts down), the
    worker's death still wakes its guardian, which ends what is left.  A
    guardian stopped then would stay stopped for good: Linux sends SIGCONT
    only to a process group it finds orphaned, and a worker's group is not
    when the pool's process shares its session (a plain script's pool).

    A resource tracker is neither stopped nor killed with the others: it
    ends after them and ``root`` (:func:`end_trackers`).  When ``root`` is
    this process (a worker ending itself), the tracker sees EOF only after
    it; the worker's guardian, left alive, then waits for it (:func:`kill_marked`).
    """
    me = os.getpid()
    if root != me and include_root:
        _signal(root, signal.SIGSTOP)
    found: list[int] = []
    spared: list[int] = []  # guardians and resource trackers
    for _ in range(20):  # a bound, in case something keeps forking faster than we stop it
        new = [pid for pid in descendants(root) if pid != me and pid not in found]
        if not new:
            break
        for pid in new:
            if _is_guardian(pid) or _is_tracker(pid):
                spared.append(pid)
            else:
                _signal(pid, signal.SIGSTOP)
        found += new
    for pid in found:
        if pid not in spared:
            _signal(pid, signal.SIGKILL)
    guardians = [pid for pid in spared if _is_guardian(pid)]
    trackers = [pid for pid in spared if pid not in guardians]
    if trackers and guardians and (root == me or not include_root):
        # a tracker sees its EOF only once this process is gone: the guardian waits for it
        if include_root:
            _signal(me, signal.SIGKILL)
        return
    if not include_root:
        return _kill_all(guardians)
    if root != me:
        _signal(root, signal.SIGKILL)
        end_trackers(trackers + _kill_group_but_trackers(root, me))
    if _leads_group(root):
        try:
            os.killpg(root, signal.SIGKILL)  # ends this process too when root is itself
        except (ProcessLookupError, PermissionError):
            pass
    _signal(root, signal.SIGKILL)
    _kill_all(guardians)


def _kill_group_but_trackers(root: int, me: int) -> list[int]:
    """SIGKILL the members of ``root``'s group no longer below it (its death
    re-parented them) but guardians and resource trackers; the trackers."""
    trackers = []
    for pid in _group(root) if _leads_group(root) else ():
        if pid == me or _is_guardian(pid):
            continue
        if _is_tracker(pid):
            trackers.append(pid)
        else:
            _signal(pid, signal.SIGKILL)
    return trackers


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def kill_marked(mark: str) -> None:
    """SIGKILL this user's processes whose environment carries a worker's mark
    (``WORKER_VAR``): after the worker died, what its tasks started that left
    its process group.  Resource trackers end last (:func:`end_trackers`).
    On Linux it reads ``/proc`` itself: a guardian forked before its worker's
    set-up cannot import psutil (no site-packages yet)."""
    marked = _marked(mark)
    trackers = [pid for pid in marked if _is_tracker(pid)]
    _kill_all([pid for pid in marked if pid not in trackers])
    end_trackers(trackers)


def _marked(mark: str) -> list[int]:
    """This user's processes (but this one) whose environment carries ``mark``."""
    uid, me = os.getuid(), os.getpid()
    found = []
    if _LINUX:
        entry = f"{WORKER_VAR}={mark}".encode()
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                with open(f"/proc/{name}/environ", "rb") as f:
                    if entry in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                continue
        return found
    import psutil  # only after a worker died

    for process in psutil.process_iter(["uids"]):
        uids = process.info["uids"]
        if uids is None or uids.real != uid or process.pid == me:
            continue
        try:
            if process.environ().get(WORKER_VAR) == mark:
                found.append(process.pid)
        except psutil.Error:
            pass
    return found


def _end_with_tree(signum=None, frame=None) -> None:
    """The parent is gone: take everything this worker started down with it."""
    if os.getpid() != _worker_pid:
        # a process a task forked inherits this handler: it just ends, as by default
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGHUP)
        return
    kill_tree(_worker_pid)
    os._exit(70)


_worker_pid = 0

#: the guardian's process name (``/proc/<pid>/comm``, what ``ps`` and
#: ``%mpstatus`` show), set on Linux
GUARDIAN_NAME = "mpnb-guardian"
_PR_SET_NAME = 15


_libc_loaded: list = []


def _libc():
    """The C library through ctypes (loaded once: importing ctypes takes a few ms)."""
    if not _libc_loaded:
        try:
            import ctypes

            _libc_loaded.append(ctypes.CDLL(None, use_errno=True))
        except Exception:
            _libc_loaded.append(None)
    return _libc_loaded[0]


def _die_with_parent(parent: int, mark: str) -> None:
    """End, with everything the tasks started, when the parent process dies,
    even while a task runs.

    The worker leads its own process group (so the kernel's interrupts and
    its group kill do not reach it), and on Linux it is a child subreaper:
    processes its tasks started that lost their parent (a double-forked
    daemon) are re-parented to it, so it finds and ends them.

    On Linux its parent's death ends it at once with ``PR_SET_PDEATHSIG``
    SIGKILL, even while it is stopped or a task holds the GIL in a long C
    call.  What it started is then ended by its guardian (see
    :func:`_start_guardian`), which runs no Python code of the tasks and so
    never waits for their GIL; when the parent is not the process that
    started it (forkserver), the guardian waits on a pidfd of the parent.
    Elsewhere, or where neither works, a thread watches the parent's pid,
    and the SIGHUP the kernel sends a stopped worker whose group it orphans
    ends the worker with its tree.
    """
    global _worker_pid
    _worker_pid = os.getpid()
    signal.signal(signal.SIGHUP, _end_with_tree)
    libc = _libc() if _LINUX else None
    if libc is not None:
        # sent when the thread that started us (the local engine's thread) or its process ends
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    direct = os.getppid() == parent  # not so under forkserver
    # before any thread starts: a fork copies only this one
    guarded = _start_guardian(mark, libc, None if direct else parent)

    def parent_gone() -> bool:
        if direct:
            return os.getppid() != parent
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def watch() -> None:
        while not parent_gone():
            time.sleep(0.25)
        _end_with_tree()

    if parent_gone():
        _end_with_tree()
    # the kernel's signal (direct) or the guardian's pidfd (forkserver) sees
    # the parent end at once: a thread that wakes 4 times a second is for elsewhere
    if libc is None or not (direct or (guarded and _pidfd_watches(parent))):
        _thread.start_new_thread(watch, ())  # not threading's: its import costs a worker 1 ms of start-up


def _pidfd_watches(pid: int) -> bool:
    """Whether a pidfd of ``pid`` opens here, as the guardian opens one to wait for it."""
    try:
        os.close(os.pidfd_open(pid))
    except (AttributeError, OSError):
        return False
    return True


def _start_guardian(mark: str, libc, owner: int | None) -> bool:
    """Fork the worker's guardian: a process that waits for the worker to
    end, however it ends, then kills what the worker left.  Given ``owner``
    (the pool's process, when it is not the worker's parent: forkserver), it
    also ends the worker when the owner dies, which ``PR_SET_PDEATHSIG``
    cannot see.
    False when it could not be started.

    It waits for EOF on a pipe whose write end only the worker holds
    (processes a task forks close their copy; exec closes it), so EOF means
    the worker is gone.  It stays in the worker's process group: every kill
    of that group (timeout, crash, Cancel, shutdown) ends it too, and a clean
    stop ends it with the rest of the tree.
    """
    read_end, write_end = os.pipe()  # both close on exec
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return False  # no guardian: the pool's kill paths still end the tree
    if pid == 0:
        try:
            os.close(write_end)
            _guard(read_end, _worker_pid, mark, libc, owner)
        finally:
            os._exit(0)
    os.close(read_end)
    pipe = os.fstat(write_end)

    def close_in_forked_child() -> None:
        # a forked copy holding the write end would keep the guardian waiting
        try:
            if os.path.samestat(os.fstat(write_end), pipe):
                os.close(write_end)
        except OSError:
            pass

    os.register_at_fork(after_in_child=close_in_forked_child)
    return True


def _guard(read_end: int, worker: int, mark: str, libc, owner: int | None) -> None:
    """The guardian's life: wait for EOF on ``read_end`` (or for ``owner``
    to end), then kill the processes carrying ``mark`` and ``worker``'s tree
    and process group (this process with it)."""
    import gc

    gc.disable()  # a collected copy of the worker's objects would close their fds, now others
    # the kernel sends SIGHUP to a stopped group its owner's death orphans; the
    # guardian must outlive the worker, whatever reaches the group but SIGKILL
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    if libc is not None:
        libc.prctl(_PR_SET_NAME, GUARDIAN_NAME.encode(), 0, 0, 0)
    _close_all_but(read_end)
    if not _wait_for_end(read_end, owner):
        return  # not an EOF: the worker may live, so nothing is killed
    try:
        kill_marked(mark)  # those that left the group first: the group kill ends this process
    except Exception:
        pass
    kill_tree(worker)


def _wait_for_end(read_end: int, owner: int | None) -> bool:
    """Block until EOF on ``read_end`` or the end of ``owner`` (where a pidfd
    can watch it); False on an error."""
    import select

    watched = [read_end]
    if owner is not None:
        try:
            watched.append(os.pidfd_open(owner))  # Linux 5.3+: readable once it has ended
        except (AttributeError, OSError):
            pass
    try:
        while True:
            ready = select.select(watched, [], [])[0]
            if len(watched) > 1 and watched[1] in ready:
                return True
            if read_end in ready and not os.read(read_end, 1):
                return True
    except OSError:
        return False


def _close_all_but(keep: int) -> None:
    """Close every file descriptor but ``keep``; 0, 1 and 2 become /dev/null,
    so that no pipe a reader waits on stays open in the guardian."""
    try:
        fds = [int(name) for name in os.listdir("/dev/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in (keep, null):
            os.dup2(null, fd)


def _lead_own_group() -> None:
    try:
        os.setpgid(0, 0)  # the exec launcher did it already; a session leader cannot
    except OSError:
        pass


class _ThenLoader:
    """A module's loader, then a function of the loaded module."""

    def __init__(self, loader, then):
        self.loader, self.then = loader, then

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.then(module)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)  # get_source, get_filename, ... as the loader's


class _AfterImport:
    """First on ``sys.meta_path`` until ``name`` is imported; then ``then``
    is called with the module, before the import returns."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, name: str, path=None, target=None):
        if name != self.name or self not in sys.meta_path:
            return None
        sys.meta_path.remove(self)
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if getattr(spec.loader, "exec_module", None) is not None:
                    spec.loader = _ThenLoader(spec.loader, self.then)
                return spec
        return None


def _after_import(name: str, then) -> None:
    """Call ``then(module)`` once module ``name`` is imported, now if it is."""
    module = sys.modules.get(name)
    if module is not None:
        then(module)
    else:
        sys.meta_path.insert(0, _AfterImport(name, then))


def _setup(config: dict[str, Any], slot_path: str) -> None:
    # the kernel's interrupt may reach the whole process group; the pool
    # decides what happens to tasks, so workers ignore SIGINT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lead_own_group()
    os.environ.update(config.get("env", {}))  # loky set them already; spawn did not
    os.environ[WORKER_VAR] = slot_path
    if _worker_pid != os.getpid():  # an exec worker did it in boot()
        _die_with_parent(config["parent"], slot_path)
    if config.get("authkey"):
        # what spawn and loky hand their children, so Manager proxies connect;
        # set once multiprocessing is imported (it costs an exec worker 5 ms)
        _after_import("multiprocessing.process", lambda process: setattr(
            process.current_process(), "authkey", config["authkey"]))
    import faulthandler

    global _fault_file
    _fault_file = open(slot_path + ".fault", "w")
    faulthandler.enable(file=_fault_file)
    if config.get("initializer") is not None:
        initializer, initargs = loads(config["initializer"])
        initializer(*initargs)
    if "logging" in sys.modules:
        _route_logging()
    # tqdm bars inside tasks report to the live view instead of writing
    _after_import("tqdm.std", reporting.quiet_tqdm)
    _after_import("tqdm.notebook", reporting.quiet_tqdm_notebook)


_fault_file = None


class _PipeConnection:
    """The worker's end of its pipe, speaking ``multiprocessing.connection``'s
    framing (a 4-byte big-endian length, or -1 and 8 bytes) over the
    inherited descriptor: importing ``multiprocessing.connection`` would cost
    an exec worker 10 to 30 ms of start-up."""

    def __init__(self, fd: int):
        self.fd = fd
        self.poller: Any = None  # made once: a worker polls before every message

    def send_bytes(self, data: bytes) -> None:
        write_frame(self.fd, data)

    def _read(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            part = os.read(self.fd, left)
            if not part:
                raise EOFError
            parts.append(part)
            left -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def recv_bytes(self) -> bytes:
        (n,) = SIZE.unpack(self._read(4))
        if n == -1:
            (n,) = BIG_SIZE.unpack(self._read(8))
        return self._read(n)

    def poll(self, timeout: float = 0.0) -> bool:
        poller = self.poller
        if poller is None:
            import select  # a built-in module: no cost

            poller = self.poller = select.poll()
            poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def close(self) -> None:
        os.close(self.fd)


class _SiteOnFirstUse:
    """First on ``sys.meta_path`` of an exec worker (started without
    ``site``): when a task first imports a name that a finder of the
    parent's ``.pth`` files finds (an editable install's package), run those
    files of the parent's site directories, as ``site`` did in the parent,
    then find the name as the parent does.  A worker that never imports such
    a name never pays for them."""

    def __init__(self, site_dirs: list[str], names: list[str]):
        self.site_dirs = site_dirs
        self.names = set(names)

    def find_spec(self, name: str, path=None, target=None):
        if name not in self.names:
            return None
        self.run_site()
        # importlib is iterating the list this changed: look through it afresh
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                return spec
        return None

    def run_site(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        before = list(sys.path)
        import site

        known: set[str] = set()
        for directory in self.site_dirs:
            site.addsitedir(directory, known)
        site.execsitecustomize()
        sys.path[:] = before  # the parent's order: it holds what the .pth files add


def boot(fd: int, parent: int | None = None) -> None:
    """Entry point of a worker started by ``python -S -P -c`` (the ``exec``
    start method): read a :class:`~mpnb._protocol.Boot` from the inherited
    pipe ``fd``, set up as the parent is, then serve (see
    :func:`mpnb.backends.launcher.site_setup`)."""
    conn = _PipeConnection(fd)
    mark = os.environ.get(WORKER_VAR)
    if parent is not None and mark and _LINUX:  # (elsewhere the guardian needs psutil: after set-up)
        # what needs no set-up is done before it is read: a spare worker
        # (mpnb.backends.launcher) has done it when a pool takes it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _lead_own_group()
        _die_with_parent(parent, mark)
    import faulthandler  # noqa: F401  (the set-up's, loaded while a spare waits)

    try:
        data = conn.recv_bytes()
    except EOFError:  # a spare worker no pool took (its owner closed the pipe, or ended)
        os._exit(0)
    setup: Boot = loads(data)
    sys.path[:] = setup.path
    if setup.site_dirs:
        on_first_use = _SiteOnFirstUse(setup.site_dirs, setup.site_names or [])
        if setup.site_names is None:
            on_first_use.run_site()  # finders whose names are unknown: now
        else:
            sys.meta_path.insert(0, on_first_use)
    _set_quit()
    # what a task starts as multiprocessing does (spawn, forkserver) gets
    # the parent's interpreter flags, not this worker's -S -P
    _after_import("subprocess", lambda subprocess: setattr(
        subprocess, "_args_from_interpreter_flags", lambda: list(setup.flags)))
    main(conn, setup.slot_path, setup.config)


def _set_quit() -> None:
    """``exit()`` and ``quit()``, which ``site`` would have defined."""
    import builtins
    import _sitebuiltins

    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")


def main(conn, slot_path: str, config: dict[str, Any]) -> None:
    """Entry point of a worker process (started by the local backend)."""
    try:
        _setup(config, slot_path)
    except BaseException as exc:
        try:
            conn.send_bytes(dumps((Kind.INIT_FAILED, os.getpid(), Failure.from_exception(exc))))
        finally:
            kill_tree(os.getpid(), include_root=False)
            os._exit(3)
    try:
        _Worker(conn, slot_path).serve()
    finally:
        # what the tasks started ends with the worker, also on a clean stop
        kill_tree(os.getpid(), include_root=False)
