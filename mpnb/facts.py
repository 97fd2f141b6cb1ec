"""What a view of a pool's work shows, and how numbers read: pure data and text.

::

    monitor ──> view (reads events, builds Facts) ──> widget / text line / summary
                                   │                        │
                                   └──── mpnb.facts ────────┘
                          Facts, Row, FailedTask, seconds(), byte_size(),
                          task_text(), status_line(), summary_text()

This module has no threads, widgets or IPython: :mod:`mpnb.view` builds
:class:`Facts` from the monitor, and :mod:`mpnb.widget` and the text view draw
them.  Sizes everywhere in mpnb (worker memory, ``%mpstatus``, ``%mpdoctor``)
read through :func:`byte_size`, in one unit style: powers of 1024 with their
IEC names (KiB, MiB, GiB, TiB).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Facts", "FailedTask", "Row", "byte_size", "seconds", "status_line", "summary_text", "task_progress",
           "task_text"]


# ------------------------------------------------------------------ numbers


def seconds(value: float | None) -> str:
    """``2.0 s``, ``3:07 min``, ``1:02 h``; ``?`` when unknown."""
    if value is None:
        return "?"
    if value < 60:
        return f"{value:.1f} s"
    minutes, rest = divmod(int(value), 60)
    return f"{minutes}:{rest:02d} min" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d} h"


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def byte_size(value: float | None) -> str:
    """``512 B``, ``40.0 MiB``, ``23.5 GiB``; ``-`` when unknown."""
    if value is None:
        return "-"
    size = float(value)
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ facts


@dataclass(frozen=True)
class Row:
    """One worker as a view shows it."""

    pid: int | None
    state: str  # "starting", "idle", "busy", "stopped" (by a signal), "dead", "restarting"
    task: str = ""  # the task it runs ("task 3 (argument 7)"), or why it died
    running: float | None = None  # seconds the current task has run
    done: int = 0  # tasks of the watched calls that returned
    failed: int = 0  # ... and that failed
    cpu: float | None = None  # percent
    rss: int | None = None  # bytes
    address: str | None = None  # a cluster worker's address
    busy: float | None = None  # seconds spent on the watched calls' tasks
    worker: int | None = None  # the monitor's worker number (threads of one process share their pid)
    device: str | None = None  # its GPU (Pool(gpus=))
    memory_limit: int | None = None  # bytes: what rss is held against (max_memory, else soft_memory)

    @property
    def memory(self) -> str:
        """``120.0 MiB``, or ``120.0 MiB / 2.0 GiB`` against a limit."""
        if self.memory_limit is None:
            return byte_size(self.rss)
        return f"{byte_size(self.rss)} / {byte_size(self.memory_limit)}"
    # what the current task reported of itself (mpnb.report, a tqdm bar)
    task_done: float | None = None
    task_total: float | None = None
    note: str | None = None

    @property
    def fraction(self) -> float | None:
        """How far the current task says it is, 0 to 1; None when it did not say."""
        if self.task_done is None or not self.task_total or self.task_total < 0:
            return None
        return min(1.0, max(0.0, self.task_done / self.task_total))


@dataclass(frozen=True)
class FailedTask:
    """One failed task."""

    index: int
    task: str  # "task 3 (argument 7)"
    pid: int | None
    error: str  # "ValueError: bad input"
    traceback: str  # the worker's traceback, when the exception is at hand


@dataclass(frozen=True)
class Facts:
    """Everything a view shows at one moment."""

    name: str
    backend: str
    method: str
    alive: int
    size: int
    done: int
    failed: int
    total: int | None  # None while a lazy imap has not seen its input end
    elapsed: float
    rows: tuple[Row, ...]
    failures: tuple[FailedTask, ...]
    finished: bool = False
    cancelled: bool = False
    cached: int = 0  # tasks whose result came from the cache, not counted in done
    partial: float = 0.0  # the running tasks' reported fractions, summed

    @property
    def ended(self) -> int:
        return self.done + self.failed + self.cached

    @property
    def percent(self) -> int | None:
        """Of the total, counting running tasks by how far they said they are."""
        if not self.total:
            return 100 if self.total == 0 else None
        return min(100, int(100 * (self.ended + self.partial) / self.total))

    @property
    def rate(self) -> float | None:
        """Tasks computed per second so far: running tasks count their reported
        part; results from the cache took no time."""
        work = self.done + self.failed + self.partial
        return work / self.elapsed if self.elapsed > 0 and work else None

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far."""
        rate = self.rate
        if rate is None or self.total is None or self.finished:
            return None
        return max(0.0, (self.total - self.ended - self.partial) / rate)

    @property
    def progress(self) -> str:
        """``12/40 (30%)``, or ``12/?`` while the total is unknown."""
        if self.total is None:
            return f"{self.ended}/?"
        return f"{self.ended}/{self.total} ({self.percent}%)"


# ------------------------------------------------------------------ text


def _amount(value: float) -> str:
    return str(int(value)) if abs(value) < 1e15 and value == int(value) else f"{value:.3g}"


def task_progress(row: Row) -> str:
    """What the task reported: ``fitting · 340/1000 (34%)``, ``fitting``,
    ``340``; empty when it reported nothing."""
    parts = [row.note] if row.note else []
    if row.task_done is not None:
        amount = _amount(row.task_done)
        if row.task_total is not None:
            amount += f"/{_amount(row.task_total)}"
            if row.fraction is not None:
                amount += f" ({int(100 * row.fraction)}%)"
        parts.append(amount)
    return " · ".join(parts)


def task_text(row: Row) -> str:
    """The current task with what it reported: ``task 7 (argument 0.3) · fitting · 340/1000 (34%)``."""
    reported = task_progress(row)
    return f"{row.task} · {reported}" if reported and row.task else row.task or reported


def status_line(facts: Facts) -> str:
    """One line of facts: progress, workers, rate, time, failures."""
    busy = sum(1 for r in facts.rows if r.state == "busy")
    rate = f"{facts.rate:.1f} tasks/s" if facts.rate else "- tasks/s"
    eta = f", ETA {seconds(facts.eta)}" if facts.eta is not None else ""
    reports = "".join(f" | {task_text(r)}" for r in facts.rows if r.state == "busy" and task_progress(r))
    return (
        f"mpnb {facts.name}: {facts.progress} | workers {facts.alive}/{facts.size} ({busy} busy) | "
        f"{rate} | {seconds(facts.elapsed)}{eta} | {facts.failed} failed"
        + (f" | {facts.cached} from cache" if facts.cached else "") + reports
    )


def summary_text(facts: Facts) -> str:
    """The end-of-work summary as plain text: a headline, workers, failures."""
    state = "cancelled" if facts.cancelled else "done"
    rate = f", {facts.rate:.1f} tasks/s" if facts.rate else ""
    lines = [
        f"mpnb {facts.name} ({facts.backend}{', ' + facts.method if facts.method else ''}): {state}, "
        f"{facts.done} of {facts.total if facts.total is not None else '?'} tasks returned, "
        f"{facts.failed} failed, {seconds(facts.elapsed)}{rate}"
        + (f", {facts.cached} from cache" if facts.cached else "")
    ]
    for row in facts.rows:
        lines.append(
            f"  pid {row.pid}: {row.state}, {row.done} done, {row.failed} failed"
            + (f", busy {seconds(row.busy)}" if row.busy is not None else "")
            + (f", {row.task}" if row.state == "dead" else "")
            + (f", {task_text(row)}" if row.state == "busy" and task_progress(row) else "")
            + (f", {row.address}" if row.address else "")
            + (f", GPU {row.device}" if row.device is not None else "")
            + (f", memory {row.memory}" if row.memory_limit is not None and row.rss is not None else "")
        )
    for failure in facts.failures:
        lines.append(f"  {failure.task} failed in pid {failure.pid}: {failure.error}")
    return "\n".join(lines)
