"""Which worker ran which task when: ``pool.timeline()``.

The monitor's event log already holds, for every task, the worker that ran
it and when it started and ended.  :class:`Timeline` picks one call's tasks
from it and draws one lane per worker process, one bar per task, on an axis
in seconds from the call's start, so imbalance (one lane ends long after
the others) and stragglers (one long bar) show at a glance.  Failed tasks
are red; tasks cancelled by an interrupt are grey.

The drawing is plain SVG (``svg.mpnb-timeline``, ``rect.mpnb-task`` with
``data-worker`` and ``data-index``; failed ones also ``mpnb-failed``), given
to notebooks inline as HTML so it stays in the saved notebook, and as
``image/svg+xml`` for other frontends.  ``repr()`` says the same in a line.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpnb.events import TaskFailed, TaskFinished

if TYPE_CHECKING:  # pragma: no cover
    from mpnb.monitor import Monitor

__all__ = ["Task", "Timeline"]

WIDTH = 760  # px, the whole picture
LABEL = 96  # px, the lane labels on the left
LANE = 18  # px, one worker's lane
GAP = 5  # px between lanes
TOP = 24  # px, the title line
AXIS = 26  # px, the axis below the lanes
RIGHT = 24  # px, room for the last tick label
COLOURS = ("#4878a8", "#79a6d2")  # alternate per lane, so neighbouring tasks show apart
FAILED = "#cf222e"
CANCELLED = "#afb8c1"


@dataclass(frozen=True)
class Task:
    """One task as drawn: where and when it ran, and how it ended."""

    worker: int
    pid: int
    index: int
    start: float  # seconds since the call started
    end: float
    error: str | None = None  # "ValueError: ..." when it failed

    @property
    def cancelled(self) -> bool:
        return self.error is not None and self.error.startswith("CancelledError")


class Timeline:
    """The tasks of one call, by worker and time; shown as SVG in a notebook."""

    def __init__(self, call: int, tasks: list[Task]):
        self.call = call
        self.tasks = sorted(tasks, key=lambda t: (t.start, t.index))

    @classmethod
    def from_monitor(cls, monitor: "Monitor", call: int) -> "Timeline":
        """The timeline of call number ``call`` from ``monitor``'s event log."""
        origin = next((s.started for s in monitor.calls() if s.call == call), None)
        events, _ = monitor.events()
        ended = [e for e in events if isinstance(e, (TaskFinished, TaskFailed)) and e.call == call]
        if origin is None and not ended:
            known = sorted({s.call for s in monitor.calls()})
            raise ValueError(
                f"pool.timeline(call={call!r}): the pool has no record of that call; "
                f"it knows calls {known} (pool.monitor.calls())"
            )
        if origin is None:
            origin = min(e.started for e in ended)
        tasks = [
            Task(e.worker, e.pid, e.index, e.started - origin, e.finished - origin,
                 e.error if isinstance(e, TaskFailed) else None)
            for e in ended
        ]
        return cls(call, tasks)

    # ------------------------------------------------------------ facts

    @property
    def duration(self) -> float:
        return max((t.end for t in self.tasks), default=0.0)

    def lanes(self) -> list[tuple[int, int]]:
        """``(worker, pid)`` of each lane, by worker number."""
        return sorted({(task.worker, task.pid) for task in self.tasks})

    def busy(self) -> dict[int, float]:
        """Seconds each worker process (by pid) spent running the call's tasks."""
        spent: dict[int, float] = {}
        for task in self.tasks:
            spent[task.pid] = spent.get(task.pid, 0.0) + task.end - task.start
        return spent

    def __repr__(self) -> str:
        failed = [t.index for t in self.tasks if t.error is not None and not t.cancelled]
        text = (
            f"<Timeline of call {self.call}: {len(self.tasks)} tasks on {len(self.lanes())} workers "
            f"over {self.duration:.2f} s"
        )
        if failed:
            shown = ", ".join(map(str, failed[:5])) + (", ..." if len(failed) > 5 else "")
            text += f"; {len(failed)} failed (task {shown})"
        busy = self.busy()
        if len(busy) > 1:
            most, least = max(busy, key=busy.__getitem__), min(busy, key=busy.__getitem__)
            text += f"; busiest pid {most} {busy[most]:.2f} s, least pid {least} {busy[least]:.2f} s"
        return text + ">"

    # ------------------------------------------------------------ drawing

    def _repr_svg_(self) -> str:
        lanes = self.lanes()
        height = TOP + max(1, len(lanes)) * (LANE + GAP) + AXIS
        span = _nice_span(self.duration)
        scale = (WIDTH - LABEL - RIGHT) / span
        parts = [
            f'<svg class="mpnb-timeline" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
            f'<text x="0" y="14" font-size="12">{html.escape(self._title())}</text>',
        ]
        row_of = {lane: n for n, lane in enumerate(lanes)}
        for n, (worker, pid) in enumerate(lanes):
            y = TOP + n * (LANE + GAP)
            parts.append(f'<text x="0" y="{y + LANE - 5}">worker {worker} · {pid}</text>')
        counts = [0] * len(lanes)  # tasks drawn per lane, to alternate colours along it
        for task in self.tasks:
            row = row_of[(task.worker, task.pid)]
            parts.append(self._bar(task, row, scale, counts[row]))
            counts[row] += 1
        parts.extend(self._axis(len(lanes), span, scale))
        if not self.tasks:
            parts.append(f'<text x="{LABEL}" y="{TOP + 12}">no task of this call ran</text>')
        parts.append("</svg>")
        return "".join(parts)

    def _repr_html_(self) -> str:
        return f'<div class="mpnb-timeline-box">{self._repr_svg_()}</div>'

    def _title(self) -> str:
        failed = sum(1 for t in self.tasks if t.error is not None and not t.cancelled)
        return (
            f"call {self.call}: {len(self.tasks)} tasks on {len(self.lanes())} workers in "
            f"{self.duration:.2f} s" + (f", {failed} failed" if failed else "")
        )

    def _bar(self, task: Task, row: int, scale: float, count: int) -> str:
        x = LABEL + task.start * scale
        width = max(1.0, (task.end - task.start) * scale - 0.5)  # a hair apart from the next task
        y = TOP + row * (LANE + GAP)
        classes = "mpnb-task"
        if task.cancelled:
            fill, classes = CANCELLED, "mpnb-task mpnb-cancelled"
        elif task.error is not None:
            fill, classes = FAILED, "mpnb-task mpnb-failed"
        else:
            fill = COLOURS[count % 2]
        tip = f"task {task.index} on pid {task.pid}: {task.start:.3f}–{task.end:.3f} s ({task.end - task.start:.3f} s)"
        if task.error:
            tip += f"\n{task.error}"
        return (
            f'<rect class="{classes}" data-worker="{task.worker}" data-index="{task.index}" '
            f'x="{x:.1f}" y="{y}" width="{width:.1f}" height="{LANE}" fill="{fill}">'
            f"<title>{html.escape(tip)}</title></rect>"
        )

    def _axis(self, lanes: int, span: float, scale: float) -> list[str]:
        y = TOP + max(1, lanes) * (LANE + GAP)
        step = _tick_step(span)
        parts = [f'<line x1="{LABEL}" y1="{y}" x2="{WIDTH - RIGHT}" y2="{y}" stroke="#57606a"/>']
        last = int(round(span / step))
        for k in range(last + 1):
            value = k * step
            x = LABEL + value * scale
            label = _tick_label(value, step) + (" s" if k == last else "")
            parts.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" stroke="#57606a"/>')
            parts.append(f'<text x="{x:.1f}" y="{y + 15}" text-anchor="middle">{label}</text>')
        return parts


def _tick_step(span: float) -> float:
    """A round step giving about five to ten ticks over ``span`` seconds."""
    raw = span / 6
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def _nice_span(duration: float) -> float:
    """The axis length: ``duration`` rounded up to a whole tick."""
    duration = max(duration, 0.001)
    step = _tick_step(duration)
    return math.ceil(duration / step - 1e-9) * step


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"
