"""The notebook views of a pool's work: a live ipywidget and a static summary.

The live widget is built from stock ipywidgets parts, each holding one kind
of fact, so a refresh sends one message per part that changed and none when
nothing did::

    VBox .mpnb-live
    ├── IntProgress
    ├── HTML      header (name, backend, workers, .mpnb-progress, rate, time,
    │             failures) and one table: tr.mpnb-worker[data-pid][data-state];
    │             a task that reports its progress (mpnb.report) has
    │             span.mpnb-task-progress[data-done][data-total] and a small bar
    ├── HTML      .mpnb-errors: each failure's task and traceback (empty when none)
    └── Button    .mpnb-cancel

A refresh therefore sends at most three messages (status, bar, errors), and
the errors only when a task failed since the last one.

When the work ends the widget's display is replaced by :class:`Summary`,
plain HTML (``div.mpnb-summary``) with a ``text/plain`` twin, so a saved
notebook shows it without a kernel.  The facts (:mod:`mpnb.facts`) come
from :mod:`mpnb.view`, which this module never imports: it only draws them.
"""

from __future__ import annotations

import html
from typing import Any, Callable

from mpnb.facts import Facts, Row, seconds, summary_text, task_progress, task_text

__all__ = ["LiveWidget", "Summary", "header_html", "rows_html"]

# states as the table colours them
_STATE_COLOURS = {
    "busy": "#1a7f37",
    "idle": "#57606a",
    "starting": "#9a6700",
    "restarting": "#9a6700",
    "stopped": "#cf222e",
    "dead": "#cf222e",
}
_TABLE = "border-collapse:collapse;font-size:12px;font-family:var(--jp-code-font-family,monospace)"
_CELL = "padding:1px 10px 1px 0;text-align:left;white-space:nowrap"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def header_html(facts: Facts) -> str:
    """The header line: pool, workers, progress, rate, elapsed and ETA, failures."""
    method = f" ({_e(facts.method)})" if facts.method else ""
    rate = f"{facts.rate:.1f} tasks/s" if facts.rate else "– tasks/s"
    eta = f", ETA {seconds(facts.eta)}" if facts.eta is not None else ""
    failed_style = "color:#cf222e;font-weight:bold" if facts.failed else ""
    return (
        f'<div style="font-size:13px"><b>{_e(facts.name)}</b> · {_e(facts.backend)}{method}'
        f" · workers {facts.alive}/{facts.size}"
        f' · <span class="mpnb-progress" data-done="{facts.ended}" data-total="{_e(_total(facts))}">'
        f"{_e(facts.progress)}</span>"
        f" · {rate} · {seconds(facts.elapsed)} elapsed{eta}"
        f' · <span style="{failed_style}">{facts.failed} failed</span>'
        + (f" · {facts.cached} from cache" if facts.cached else "") + "</div>"
    )


def _total(facts: Facts) -> str:
    return "" if facts.total is None else str(facts.total)


def rows_html(rows: tuple[Row, ...] | list[Row], summary: bool = False) -> str:
    """The worker table, one ``tr.mpnb-worker`` per worker."""
    addresses = any(r.address for r in rows)
    devices = any(r.device is not None for r in rows)
    if summary:
        heads = ["pid", "state", "tasks done", "failed", "busy", "CPU", "RSS"]
    else:
        heads = ["pid", "state", "current task", "running", "tasks done", "CPU", "RSS"]
    if addresses:
        heads.insert(1, "address")
    if devices:
        heads.insert(1, "GPU")
    head = "".join(f'<th style="{_CELL}">{h}</th>' for h in heads)
    body = "".join(_row_html(r, summary, addresses, devices) for r in rows)
    return f'<table style="{_TABLE}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _row_html(row: Row, summary: bool, addresses: bool, devices: bool = False) -> str:
    colour = _STATE_COLOURS.get(row.state, "inherit")
    cpu = "–" if row.cpu is None else f"{row.cpu:.0f} %"
    cells = [str(row.pid), f'<span style="color:{colour}">{_e(row.state)}</span>']
    if addresses:
        cells.insert(1, _e(row.address or ""))
    if devices:
        cells.insert(1, _e(row.device or ""))
    if summary:
        busy = "–" if row.busy is None else seconds(row.busy)
        cells += [str(row.done), str(row.failed), busy]
        if row.state == "dead":
            cells[-1] += f" ({_e(row.task)})"
        elif row.state == "busy" and task_progress(row):
            cells[-1] += f" ({_task_html(row)})"
    else:
        running = "" if row.running is None else seconds(row.running)
        cells += [_task_html(row), running, str(row.done)]
    cells += [cpu, row.memory]
    tds = "".join(f'<td style="{_CELL}">{c}</td>' for c in cells)
    return f'<tr class="mpnb-worker" data-pid="{row.pid}" data-state="{_e(row.state)}">{tds}</tr>'


def _task_html(row: Row) -> str:
    """The task cell: its description, and what it reported with a small bar."""
    if not task_progress(row):
        return _e(row.task)
    total = "" if row.task_total is None else _amount_attr(row.task_total)
    bar = ""
    if row.fraction is not None:
        bar = ('<span style="display:inline-block;width:60px;height:7px;margin-left:6px;background:#d0d7de;'
               f'border-radius:3px;vertical-align:middle"><span style="display:block;height:100%;'
               f'width:{100 * row.fraction:.0f}%;background:#1a7f37;border-radius:3px"></span></span>')
    done = "" if row.task_done is None else _amount_attr(row.task_done)
    return (f'<span class="mpnb-task-progress" data-done="{done}" data-total="{total}">'
            f"{_e(task_text(row))}{bar}</span>")


def _amount_attr(value: float) -> str:
    return str(int(value)) if abs(value) < 1e15 and value == int(value) else repr(value)


def errors_html(facts: Facts) -> str:
    """Each failure's task, worker and traceback, folded."""
    if not facts.failures:
        return ""
    items = []
    for failure in facts.failures:
        text = failure.traceback + "\n" + failure.error if failure.traceback else failure.error
        items.append(
            f"<details><summary>{_e(failure.task)} in pid {failure.pid}: {_e(failure.error)[:200]}</summary>"
            f'<pre style="font-size:11px;margin:2px 0 6px 12px;white-space:pre-wrap">{_e(text)}</pre></details>'
        )
    more = facts.failed - len(facts.failures)
    if more > 0:
        items.append(f"<div>… and {more} more</div>")
    return f'<div style="color:#cf222e;font-size:12px">{"".join(items)}</div>'


class LiveWidget:
    """The live view in a notebook (see the module docstring for its parts)."""

    def __init__(self, facts: Facts, on_cancel: Callable[[], None]):
        import ipywidgets as widgets
        from IPython.display import display

        self._on_cancel = on_cancel
        self.bar = widgets.IntProgress(value=0, min=0, max=max(1, facts.total or 1), bar_style="info",
                                       layout=widgets.Layout(width="100%", max_width="600px"))
        self.status = widgets.HTML(header_html(facts) + rows_html(facts.rows))
        # classes given at creation travel in the comm_open, not in an update each
        self.errors = widgets.HTML(errors_html(facts), _dom_classes=("mpnb-errors",))
        self.cancel = widgets.Button(description="Cancel", icon="stop", button_style="warning",
                                     tooltip="Stop this work, as interrupting the kernel does",
                                     layout=widgets.Layout(width="auto"), _dom_classes=("mpnb-cancel",))
        self.cancel.on_click(self._clicked)
        self.root = widgets.VBox([self.bar, self.status, self.errors, self.cancel], _dom_classes=("mpnb-live",))
        # each part owns a layout (and a style) widget with comms of their own
        self._parts = [w for part in (self.bar, self.status, self.errors, self.cancel, self.root)
                       for w in (part, part.layout, getattr(part, "style", None)) if w is not None]
        self._handle = display(self.root, display_id=True)

    def comm_widgets(self) -> dict[str, Any]:
        """The widgets the frontend may send messages to while work runs, by comm id."""
        return {self.cancel.comm.comm_id: self.cancel} if self.cancel.comm is not None else {}

    def _clicked(self, _button: Any) -> None:
        with self.cancel.hold_sync():
            self.cancel.disabled = True
            self.cancel.description = "Cancelling…"
        self._on_cancel()

    def update(self, facts: Facts) -> None:
        """Show ``facts``; each part that did not change sends nothing."""
        self.status.value = header_html(facts) + rows_html(facts.rows)
        with self.bar.hold_sync():
            if facts.total is not None:
                self.bar.max = max(1, facts.total)
            self.bar.value = min(int(facts.ended + facts.partial), self.bar.max)
            self.bar.bar_style = "danger" if facts.failed else "info"
        self.errors.value = errors_html(facts)

    def close(self, facts: Facts) -> None:
        """Replace the widget by the static summary and free its comms."""
        if self._handle is not None:
            self._handle.update(Summary(facts))
        for part in self._parts:
            part.close()


class Summary:
    """What a call did, as static HTML that stays in the saved notebook."""

    def __init__(self, facts: Facts):
        self.facts = facts

    def _repr_html_(self) -> str:
        f = self.facts
        state = "cancelled" if f.cancelled else "done"
        colour = "#cf222e" if f.failed or f.cancelled else "#1a7f37"
        method = f" ({_e(f.method)})" if f.method else ""
        rate = f" · {f.rate:.1f} tasks/s" if f.rate else ""
        errors = errors_html(f)
        if errors:
            errors = f'<div class="mpnb-errors">{errors}</div>'
        return (
            f'<div class="mpnb-summary" data-done="{f.done}" data-total="{_e(_total(f))}" data-failed="{f.failed}"'
            f' style="border-left:3px solid {colour};padding:2px 8px">'
            f'<div style="font-size:13px"><b>{_e(f.name)}</b> · {_e(f.backend)}{method} · '
            f'<span style="color:{colour}">{state}</span>: {f.done} of {_e(_total(f) or "?")} tasks returned'
            f" · {f.failed} failed{f' · {f.cached} from cache' if f.cached else ''}"
            f" · {seconds(f.elapsed)}{rate} · {f.size} workers</div>"
            f"{rows_html(f.rows, summary=True)}{errors}</div>"
        )

    def __repr__(self) -> str:
        return summary_text(self.facts)
