"""What happens in a pool, as small picklable records.

The pool's engine turns worker messages into these events and hands
them to the :class:`~mpnb.monitor.Monitor`; a status widget reads them from
there.  Times are ``time.monotonic()`` seconds, which on Linux and macOS is
one clock shared by all processes of the machine, so worker and parent times
compare directly.

``call`` numbers the pool's calls (one ``map``, one ``submit``) and ``index``
is the task's position in that call's input.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Event",
    "TaskFailed",
    "TaskFinished",
    "TaskStarted",
    "WorkerStarted",
    "WorkerStopped",
]


@dataclass(frozen=True, slots=True)
class WorkerStarted:
    """A worker process is up and ready for tasks."""

    worker: int
    pid: int
    time: float


@dataclass(frozen=True, slots=True)
class WorkerStopped:
    """A worker process ended; ``reason`` says why in a few words."""

    worker: int
    pid: int
    time: float
    exitcode: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """A worker began running task ``index`` of call ``call``."""

    worker: int
    pid: int
    call: int
    index: int
    time: float


@dataclass(frozen=True, slots=True)
class TaskFinished:
    """Task ``index`` of call ``call`` returned a value."""

    worker: int
    pid: int
    call: int
    index: int
    started: float
    finished: float


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """Task ``index`` of call ``call`` raised, timed out, crashed or was cancelled."""

    worker: int
    pid: int
    call: int
    index: int
    started: float
    finished: float
    error: str


Event = WorkerStarted | WorkerStopped | TaskStarted | TaskFinished | TaskFailed
