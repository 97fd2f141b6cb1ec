"""The parent's view of a pool: who runs what, and what happened.

The pool's engine feeds the monitor; anything that wants to show the
pool (the status widget, a text report, a test) reads it:

- :meth:`Monitor.snapshot` returns one :class:`WorkerStatus` per worker, with
  the task each busy worker runs now (read from the worker's shared-memory
  slot, so it is current even inside a chunk) and how long it has run
  (from the time in the slot: the task's start, or for a task among fast
  ones, a moment before it).
- :meth:`Monitor.sample` adds CPU percent and resident memory from psutil.
- :meth:`Monitor.events` returns the :mod:`mpnb.events` recorded since a
  cursor, so a reader polling a few times a second sees every event once.
- :meth:`Monitor.calls` returns progress per call (total, done, failed).
- :meth:`Monitor.task_progress` notes what a task reported of itself
  (``mpnb.report``, a tqdm bar); the row of the worker running it shows it
  while that task runs.

Feeding the monitor is cheap: it stores one entry per batch of tasks, with
the start times the worker took (a few for a batch of fast tasks), and
event objects are built only when someone reads them.  A task's ``finished``
time is when the worker moved on to the next task (or ended the batch).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from mpnb.events import Event, TaskFailed, TaskFinished, TaskStarted, WorkerStarted, WorkerStopped

__all__ = ["CallStatus", "Monitor", "WorkerStatus"]

# events kept for readers; older ones are dropped
EVENT_HISTORY = 10_000


@dataclass(frozen=True)
class WorkerStatus:
    """One row of the status table."""

    worker: int
    pid: int | None
    # "starting", "idle", "busy", or "stopped" (by a signal such as SIGSTOP:
    # it runs nothing until it gets SIGCONT); a worker that ended has no row
    state: str
    call: int | None = None
    index: int | None = None
    since: float | None = None  # when the current task started
    elapsed: float | None = None  # seconds the current task has run
    tasks_done: int = 0
    tasks_failed: int = 0
    cpu_percent: float | None = None
    rss: int | None = None  # bytes
    address: str | None = None  # a dask worker's address; None for local workers
    rank: int | None = None  # its slot (Pool(worker_env=, gpus=, pin=)); a replacement keeps it
    device: str | None = None  # its GPU (Pool(gpus=))
    memory_limit: int | None = None  # bytes: Pool(max_memory=), else soft_memory=
    # what the current task reported of itself (mpnb.report): done of total, a note
    task_done: float | None = None
    task_total: float | None = None
    note: str | None = None


@dataclass(frozen=True)
class CallStatus:
    """Progress of one call (one map, one submit)."""

    call: int
    total: int | None  # None while a lazy imap has not seen its input end
    done: int = 0
    failed: int = 0
    started: float = 0.0
    cached: int = 0  # tasks whose stored result was taken from the cache (mpnb.cache)
    finished: float | None = None


class Monitor:
    """Status table and event log of one pool (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[int, Any] = {}
        self._calls: dict[int, CallStatus] = {}
        # [done, failed] per call, counted as tasks end; put into the
        # CallStatus records only when read (a record per delivery is too dear)
        self._counts: dict[int, list[int]] = {}
        # (first event number, count, kind, payload); expanded when read
        self._log: deque[tuple[int, int, str, tuple]] = deque()
        self._logged = 0
        self._psutil: dict[int, Any] = {}

    # ------------------------------------------------------------- writers

    def _emit(self, count: int, kind: str, payload: tuple) -> None:
        log = self._log
        log.append((self._logged, count, kind, payload))
        self._logged += count
        # entries wholly before the history go, a few per new one: an entry
        # of a whole chunk's tasks would otherwise drop thousands of one-task
        # entries at once, on the engine's thread (events() reads no further)
        oldest = self._logged - EVENT_HISTORY
        for _ in range(4):
            if len(log) < 2 or log[0][0] + log[0][1] > oldest:
                break
            log.popleft()

    def worker_starting(self, worker: int, pid: int, current: Callable[[], tuple[int, int, float]],
                        rank: int | None = None, device: str | None = None, memory_limit: int | None = None) -> None:
        with self._lock:
            self._rows[worker] = row = _MutableRow(worker, pid, current)
            row.slot = (rank, device, memory_limit)

    def worker_started(self, worker: int, pid: int, when: float) -> None:
        with self._lock:
            row = self._rows.get(worker)
            if row is not None:
                row.state = "idle"
            self._emit(1, "one", (WorkerStarted, (worker, pid, when)))

    def worker_stopped(self, worker: int, pid: int, exitcode: int | None, reason: str) -> None:
        with self._lock:
            if self._rows.pop(worker, None) is None:
                return
            self._psutil.pop(pid, None)
            self._emit(1, "one", (WorkerStopped, (worker, pid, time.monotonic(), exitcode, reason)))

    def call_started(self, call: int, total: int | None) -> None:
        with self._lock:
            self._calls[call] = CallStatus(call, total, started=time.monotonic())
            self._counts[call] = [0, 0, 0]
            while len(self._calls) > 100:
                self._counts.pop(self._calls.pop(next(iter(self._calls))).call, None)

    def tasks_cached(self, call: int, n: int) -> None:
        """``n`` tasks of ``call`` took their result from the cache: they ran nowhere."""
        with self._lock:
            if call in self._counts:
                self._counts[call][2] += n

    def call_total(self, call: int, total: int) -> None:
        with self._lock:
            status = self._calls.get(call)
            if status is not None:
                self._calls[call] = CallStatus(call, total, status.done, status.failed, status.started,
                                               status.cached, status.finished)

    def call_finished(self, call: int) -> None:
        with self._lock:
            status = self._calls.get(call)
            if status is not None:  # (dataclasses.replace took 8 µs of every call)
                self._calls[call] = CallStatus(call, status.total, status.done, status.failed, status.started,
                                               status.cached, time.monotonic())

    def chunk_sent(self, worker: int, seq: int, call: int, indices: Sequence[int], when: float) -> None:
        self.chunks_sent(worker, [(seq, call, indices, when)])

    def chunks_sent(self, worker: int, chunks: list[tuple[int, int, Sequence[int], float]]) -> None:
        """Chunks ``(seq, call, indices, when)`` sent to ``worker``, in one step."""
        with self._lock:
            row = self._rows.get(worker)
            if row is not None and chunks:
                row.chunks.extend(chunks)
                row.state = "busy"

    def tasks_ended(self, worker: int, pid: int, call: int, indices: Sequence[int],
                    starts: list[float] | dict[int, float], end: float, errors: dict[int, str],
                    ended: int | None = None) -> None:
        """Tasks ``indices`` ended; the last at ``end``.  ``starts`` holds each
        one's start time, or (a dict) the start times of some of them by
        their offset in ``indices``, the first always: the tasks between two
        timed ones ran evenly between their times.  ``errors`` maps the
        failed ones to a one-line description.  ``ended``: the seq of the
        chunk these tasks ended, as :meth:`chunk_ended` (one lock, not two)."""
        self.runs_ended(worker, pid, [(call, indices, starts, end, errors, ended)])

    def runs_ended(self, worker: int, pid: int, runs: list[tuple]) -> None:
        """Several :meth:`tasks_ended` of one worker, each ``(call, indices,
        starts, end, errors, ended)``, under one lock and as one log entry
        (the records of one message: at chunksize 1, one per task)."""
        with self._lock:
            row = self._rows.get(worker)
            count = 0
            for call, indices, _, _, errors, ended in runs:
                if ended is not None:
                    self._chunk_ended(worker, ended)
                done, failed = len(indices) - len(errors), len(errors)
                count += 2 * len(indices)
                if row is not None:
                    row.failed += failed
                    row.done += done
                counts = self._counts.get(call)
                if counts is not None:
                    counts[0] += done
                    counts[1] += failed
            if count:
                self._emit(count, "runs", (worker, pid, runs))

    def task_progress(self, worker: int, seq: int, position: int, done: float, total: float | None,
                      note: str | None) -> None:
        """The task at ``position`` of chunk ``seq`` reported ``done`` of ``total``."""
        with self._lock:
            row = self._rows.get(worker)
            if row is not None:
                row.progress = (seq, position, done, total, note)

    def chunk_ended(self, worker: int, seq: int) -> None:
        with self._lock:
            self._chunk_ended(worker, seq)

    def _chunk_ended(self, worker: int, seq: int) -> None:
        row = self._rows.get(worker)
        if row is not None:
            if row.chunks and row.chunks[0][0] == seq:
                del row.chunks[0]  # the usual case: chunks end in the order they were sent
            else:
                row.chunks = [c for c in row.chunks if c[0] != seq]
            if not row.chunks:
                row.state = "idle"

    # ------------------------------------------------------------- readers

    def snapshot(self) -> list[WorkerStatus]:
        """One row per live worker, with the running task read live."""
        now = time.monotonic()
        with self._lock:
            rows = []
            for worker, row in sorted(self._rows.items()):
                state = "stopped" if process_stopped(row.pid) else row.state
                rank, device, limit = row.slot
                status = WorkerStatus(worker, row.pid, state, tasks_done=row.done, tasks_failed=row.failed,
                                      rank=rank, device=device, memory_limit=limit)
                if row.chunks:
                    seq, call, indices, sent = row.chunks[0]
                    slot_seq, pos, started = row.current()
                    if slot_seq == seq and 0 <= pos < len(indices):
                        index, since = indices[pos], started
                    else:
                        pos, index, since = 0, indices[0], sent
                    status = replace(status, call=call, index=index, since=since, elapsed=now - since)
                    if row.progress is not None and row.progress[:2] == (seq, pos):
                        status = replace(status, task_done=row.progress[2], task_total=row.progress[3],
                                         note=row.progress[4])
                rows.append(status)
            return rows

    def sample(self) -> list[WorkerStatus]:
        """:meth:`snapshot` with CPU percent and resident memory per worker.

        CPU percent is measured since the previous call, so call it at a
        steady rate (a widget's refresh).
        """
        import psutil

        rows = []
        for status in self.snapshot():
            if status.pid is None:  # psutil.Process(None) would measure this process
                rows.append(status)
                continue
            try:
                proc = self._psutil.get(status.pid)
                if proc is None:
                    proc = self._psutil[status.pid] = psutil.Process(status.pid)
                with proc.oneshot():
                    status = replace(status, cpu_percent=proc.cpu_percent(), rss=proc.memory_info().rss)
            except psutil.Error:
                pass
            rows.append(status)
        return rows

    def events(self, since: int = 0) -> tuple[list[Event], int]:
        """Events recorded after cursor ``since``, and the next cursor.

        Start with ``since=0``; pass the returned cursor next time.  Only the
        last :data:`EVENT_HISTORY` events are kept.
        """
        with self._lock:
            logged = self._logged
            since = max(since, logged - EVENT_HISTORY)
            entries = [e for e in self._log if e[0] + e[1] > since]
        events: list[Event] = []
        for first, count, kind, payload in entries:
            expanded = _expand(kind, payload)
            events.extend(expanded[max(0, since - first):])
        return events, logged

    def cursor(self) -> int:
        """The cursor of the next event: :meth:`events` from it returns only
        what happens after this call."""
        with self._lock:
            return self._logged

    def calls(self) -> list[CallStatus]:
        """Progress of recent calls, oldest first."""
        with self._lock:
            return [replace(status, done=self._counts[call][0], failed=self._counts[call][1],
                            cached=self._counts[call][2])
                    for call, status in self._calls.items()]


def process_stopped(pid: int | None) -> bool:
    """Whether process ``pid`` is stopped by a signal (SIGSTOP, SIGTSTP, a
    debugger): it holds its task but runs nothing."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False  # ended
    except OSError:  # no /proc here: ask psutil
        import psutil

        try:
            return psutil.Process(pid).status() == psutil.STATUS_STOPPED
        except psutil.Error:
            return False
    # the state follows the command name, which may itself hold ") "
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"T", b"t")


class _MutableRow:
    __slots__ = ("worker", "pid", "state", "chunks", "done", "failed", "current", "slot", "progress")

    def __init__(self, worker: int, pid: int, current: Callable[[], tuple[int, int, float]]):
        self.worker, self.pid, self.state, self.current = worker, pid, "starting", current
        self.chunks: list[tuple[int, int, Sequence[int], float]] = []  # (seq, call, indices, sent)
        self.done = self.failed = 0
        self.slot: tuple[int | None, str | None, int | None] = (None, None, None)  # rank, device, memory limit
        # (seq, position, done, total, note): the last report of a task
        self.progress: tuple[int, int, float, float | None, str | None] | None = None


def _expand(kind: str, payload: tuple) -> list[Event]:
    if kind == "one":
        cls, fields = payload
        return [cls(*fields)]
    worker, pid, runs = payload
    return [event for call, indices, starts, end, errors, _ in runs
            for event in _run_events(worker, pid, call, indices, starts, end, errors)]


def _run_events(worker: int, pid: int, call: int, indices: Sequence[int], starts: list[float] | dict[int, float],
                end: float, errors: dict[int, str]) -> list[Event]:
    if isinstance(starts, dict):
        starts = _spread(starts, len(indices), end)
    events: list[Event] = []
    for i, index in enumerate(indices):
        started = starts[i]
        finished = starts[i + 1] if i + 1 < len(starts) else end
        events.append(TaskStarted(worker, pid, call, index, started))
        if index in errors:
            events.append(TaskFailed(worker, pid, call, index, started, finished, errors[index]))
        else:
            events.append(TaskFinished(worker, pid, call, index, started, finished))
    return events


def _spread(timed: dict[int, float], count: int, end: float) -> list[float]:
    """Start times of ``count`` tasks from those of some (``timed``, by
    offset, the first always), the others spread evenly up to the next
    timed one or ``end``."""
    marks = sorted(timed.items()) + [(count, end)]
    starts: list[float] = []
    for (offset, time_), (following, next_time) in zip(marks, marks[1:]):
        step = (next_time - time_) / (following - offset)
        starts.extend(time_ + step * k for k in range(following - offset))
    return starts
