"""The parent's view of a pool: who runs what, and what happened.

The pool's manager thread feeds the monitor; anything that wants to show the
pool (the status widget, a text report, a test) reads it:

- :meth:`Monitor.snapshot` returns one :class:`WorkerStatus` per worker, with
  the task each busy worker runs now (read from the worker's shared-memory
  slot, so it is current even inside a chunk) and how long it has run.
- :meth:`Monitor.sample` adds CPU percent and resident memory from psutil.
- :meth:`Monitor.events` returns the :mod:`mpnb.events` recorded since a
  cursor, so a reader polling a few times a second sees every event once.
- :meth:`Monitor.calls` returns progress per call (total, done, failed).

Feeding the monitor is cheap: per task it stores a small tuple; event objects
are built only when someone reads them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

from mpnb.events import TaskFailed, TaskFinished, TaskStarted, WorkerStarted, WorkerStopped

__all__ = ["CallStatus", "Monitor", "WorkerStatus"]

# events kept for readers; older ones are dropped
EVENT_HISTORY = 10_000


@dataclass(frozen=True)
class WorkerStatus:
    """One row of the status table."""

    worker: int
    pid: int | None
    state: str  # "starting", "idle", "busy", "stopped"
    call: int | None = None
    index: int | None = None
    since: float | None = None  # when the current task started
    elapsed: float | None = None  # seconds the current task has run
    tasks_done: int = 0
    tasks_failed: int = 0
    cpu_percent: float | None = None
    rss: int | None = None  # bytes


@dataclass(frozen=True)
class CallStatus:
    """Progress of one call (one map, one submit)."""

    call: int
    total: int | None  # None while a lazy imap has not seen its input end
    done: int = 0
    failed: int = 0
    started: float = 0.0
    finished: float | None = None


class Monitor:
    """Status table and event log of one pool (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[int, WorkerStatus] = {}
        self._current: dict[int, Callable[[], tuple[int, int, float]]] = {}
        self._chunks: dict[int, tuple[int, int, list[int]]] = {}  # worker -> (seq, call, indices)
        self._calls: dict[int, CallStatus] = {}
        self._log: deque[tuple] = deque(maxlen=EVENT_HISTORY)
        self._logged = 0
        self._psutil: dict[int, object] = {}

    # ------------------------------------------------------------- writers

    def _emit(self, kind: type, *fields) -> None:
        self._log.append((kind, fields))
        self._logged += 1

    def worker_starting(self, worker: int, pid: int, current: Callable[[], tuple[int, int, float]]) -> None:
        with self._lock:
            self._workers[worker] = WorkerStatus(worker, pid, "starting")
            self._current[worker] = current

    def worker_started(self, worker: int, pid: int, when: float) -> None:
        with self._lock:
            old = self._workers.get(worker) or WorkerStatus(worker, pid, "idle")
            self._workers[worker] = replace(old, pid=pid, state="idle")
            self._emit(WorkerStarted, worker, pid, when)

    def worker_stopped(self, worker: int, pid: int, exitcode: int | None, reason: str) -> None:
        with self._lock:
            self._workers.pop(worker, None)
            self._current.pop(worker, None)
            self._chunks.pop(worker, None)
            self._psutil.pop(pid, None)
            self._emit(WorkerStopped, worker, pid, time.monotonic(), exitcode, reason)

    def call_started(self, call: int, total: int | None) -> None:
        with self._lock:
            self._calls[call] = CallStatus(call, total, started=time.monotonic())
            while len(self._calls) > 100:
                self._calls.pop(next(iter(self._calls)))

    def call_total(self, call: int, total: int) -> None:
        with self._lock:
            if call in self._calls:
                self._calls[call] = replace(self._calls[call], total=total)

    def call_finished(self, call: int) -> None:
        with self._lock:
            if call in self._calls:
                self._calls[call] = replace(self._calls[call], finished=time.monotonic())

    def chunk_sent(self, worker: int, pid: int, seq: int, call: int, indices: list[int], when: float) -> None:
        with self._lock:
            self._chunks[worker] = (seq, call, indices)
            old = self._workers.get(worker) or WorkerStatus(worker, pid, "busy")
            self._workers[worker] = replace(old, state="busy", call=call, index=indices[0], since=when)
            self._emit(TaskStarted, worker, pid, call, indices[0], when)

    def tasks_ended(self, worker: int, pid: int, call: int, ended: list[tuple[int, bool, float, float, str]]) -> None:
        """``ended``: ``(index, ok, started, finished, error)`` per task."""
        with self._lock:
            done = failed = 0
            for index, ok, started, finished, error in ended:
                if ok:
                    done += 1
                    self._emit(TaskFinished, worker, pid, call, index, started, finished)
                else:
                    failed += 1
                    self._emit(TaskFailed, worker, pid, call, index, started, finished, error)
            old = self._workers.get(worker)
            if old is not None:
                self._workers[worker] = replace(
                    old, tasks_done=old.tasks_done + done, tasks_failed=old.tasks_failed + failed
                )
            status = self._calls.get(call)
            if status is not None:
                self._calls[call] = replace(status, done=status.done + done, failed=status.failed + failed)

    def chunk_ended(self, worker: int) -> None:
        with self._lock:
            self._chunks.pop(worker, None)
            old = self._workers.get(worker)
            if old is not None:
                self._workers[worker] = replace(old, state="idle", call=None, index=None, since=None, elapsed=None)

    # ------------------------------------------------------------- readers

    def snapshot(self) -> list[WorkerStatus]:
        """One row per live worker, with the running task read live."""
        now = time.monotonic()
        with self._lock:
            rows = []
            for worker, status in sorted(self._workers.items()):
                chunk = self._chunks.get(worker)
                if chunk is not None and status.state == "busy":
                    seq, call, indices = chunk
                    slot_seq, pos, started = self._current[worker]()
                    if slot_seq == seq and 0 <= pos < len(indices):
                        status = replace(status, index=indices[pos], since=started)
                    status = replace(status, elapsed=now - (status.since or now))
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
            proc = self._psutil.get(status.pid)
            try:
                if proc is None:
                    proc = self._psutil[status.pid] = psutil.Process(status.pid)
                with proc.oneshot():
                    status = replace(status, cpu_percent=proc.cpu_percent(), rss=proc.memory_info().rss)
            except psutil.Error:
                pass
            rows.append(status)
        return rows

    def events(self, since: int = 0) -> tuple[list, int]:
        """Events recorded after cursor ``since``, and the next cursor.

        Start with ``since=0``; pass the returned cursor next time.  Events
        older than the last :data:`EVENT_HISTORY` are gone.
        """
        with self._lock:
            logged = self._logged
            wanted = min(max(0, logged - since), len(self._log))
            raw = list(self._log)[len(self._log) - wanted :] if wanted else []
        return [kind(*fields) for kind, fields in raw], logged

    def calls(self) -> list[CallStatus]:
        """Progress of recent calls, oldest first."""
        with self._lock:
            return list(self._calls.values())
