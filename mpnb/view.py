"""Live status of a pool's work: the one place that decides how it is shown.

::

    caller (the cell's thread)           refresher thread              frontend
    --------------------------           ----------------              --------
    map / imap / submit
      | watch() -> Session  ---- starts --> after DELAY s: display(widget)
      |                                     every INTERVAL s:
      |                                       facts() <- pool.monitor
      |                                       render(facts): ≤ 3 comm ---> widget
      | wait loop: Session.poll()             messages, none if unchanged
      |   our widgets' comm_msg <---------------------------------------- Cancel click
      |   (others stay queued)  --> pool.cancel()
      | Session.finish() -------- stops --> summary replaces the widget --> static HTML

:func:`choose_mode` decides between the ipywidgets view (a kernel with a
frontend), a text line on a terminal, and nothing.  Work that ends within
:data:`DELAY` shows nothing at all, so a quick call costs only a thread
start.  The caller does no per-task work: a refresher thread reads the
monitor a few times a second, builds :class:`Facts` and hands them to the
view, which sends only what changed.  With at most three widgets changing per tick and :data:`INTERVAL`
between ticks (so at most three ticks in any second), a live view sends at
most nine comm messages per second whatever the task rate.

A Cancel click reaches the kernel as a ``comm_msg`` on the shell channel,
which the kernel reads only between cells.  While a blocking call waits, the
main thread therefore takes the shell messages already waiting for it
(:class:`_CommPump`), handles those addressed to this view's widgets, and
hands every other one back to the kernel's own handler, in order.  This
relies on how ipykernel 6 and 7 queue shell messages; with any other kernel
the pump is off and the Cancel button works only between cells.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Protocol

from mpnb.events import TaskFailed, TaskFinished, WorkerStopped

if TYPE_CHECKING:  # pragma: no cover
    from mpnb.monitor import Monitor
    from mpnb.pool import Pool

__all__ = ["Facts", "Failure", "Row", "Session", "TextView", "check_live", "choose_mode", "status_line",
           "summary_text", "watch", "watch_background"]

#: seconds between two refreshes of a live view
INTERVAL = 0.4
#: work that ends sooner than this (seconds) shows nothing: a quick call in a
#: loop costs no widget and leaves no summary
DELAY = 0.2
#: how often a waiting caller looks for clicks on the view
PUMP_INTERVAL = 0.1
#: environment variable: "0" turns live views off, "1" shows them even when
#: the output is not a terminal
LIVE_VAR = "MPNB_LIVE"
#: failures listed in a view (the count says how many there were)
MAX_FAILURES = 20
#: workers that died during the work, kept in the table
MAX_DEAD_ROWS = 8


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


@dataclass(frozen=True)
class Failure:
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
    failures: tuple[Failure, ...]
    finished: bool = False
    cancelled: bool = False

    @property
    def ended(self) -> int:
        return self.done + self.failed

    @property
    def percent(self) -> int | None:
        if not self.total:
            return 100 if self.total == 0 else None
        return int(100 * self.ended / self.total)

    @property
    def rate(self) -> float | None:
        """Tasks ended per second so far."""
        return self.ended / self.elapsed if self.elapsed > 0 and self.ended else None

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far."""
        rate = self.rate
        if rate is None or self.total is None or self.finished:
            return None
        return max(0.0, (self.total - self.ended) / rate)

    @property
    def progress(self) -> str:
        """``12/40 (30%)``, or ``12/?`` while the total is unknown."""
        if self.total is None:
            return f"{self.ended}/?"
        return f"{self.ended}/{self.total} ({self.percent}%)"


# ------------------------------------------------------------------ modes


def check_live(live: Any) -> bool | None:
    """Validate a pool's ``live`` option: ``None`` (automatic), ``True`` or ``False``."""
    if live is not None and not isinstance(live, bool):
        raise ValueError(f"live={live!r}: give True (always show), False (never) or None (automatic)")
    return live


def choose_mode(live: bool | None) -> str | None:
    """``"widget"``, ``"text"`` or ``None``: how the status of work is shown here.

    ``live=False`` (or ``MPNB_LIVE=0`` when ``live`` is ``None``) shows
    nothing.  In a Jupyter kernel the widget is shown.  Elsewhere a text line
    is written to ``stderr`` when it is a terminal, or always when asked
    (``live=True`` or ``MPNB_LIVE=1``).
    """
    if live is None:
        setting = os.environ.get(LIVE_VAR, "").strip()
        if setting not in ("", "0", "1"):
            raise ValueError(f"{LIVE_VAR}={setting!r}: set it to 0 (no live status), 1 (always) or leave it unset")
        live = None if setting == "" else setting == "1"
    if live is False:
        return None
    if _kernel() is not None:
        return "widget"
    if live or _is_tty(sys.stderr):
        return "text"
    return None


def _kernel() -> Any:
    """The ipykernel this process runs, if it has a frontend to show widgets."""
    if "ipykernel" not in sys.modules:
        return None
    kernel = getattr(_shell(), "kernel", None)
    return kernel if getattr(kernel, "session", None) is not None else None


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------ sessions


class View(Protocol):
    def update(self, facts: Facts) -> None: ...
    def close(self, facts: Facts) -> None: ...


class Session:
    """The live view of some calls of one pool, from their start to their summary."""

    def __init__(self, pool: "Pool", mode: str, background: bool, call: Any, items: list | None):
        self.monitor: Monitor = pool.monitor
        self.mode = mode
        self.background = background
        self.cell = _execution_count()
        self.name, self.backend, self.method = _pool_labels(pool)
        self.size = pool.workers
        self._pool = weakref.ref(pool)
        self._calls: dict[int, tuple[Any, list | None]] = {call.id: (call, items)}  # id -> (_Call, items)
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._cursor = self.monitor.cursor()  # only what happens from now on
        self._failures: list[Failure] = []
        self._cancelled_tasks = 0
        self._dead: dict[int, Row] = {}
        self._work: dict[int, tuple[int, int, float]] = {}  # pid -> (done, failed, seconds)
        self._cancelled = False
        self._stop = threading.Event()
        self._pump: _CommPump | None = None
        self._next_pump = 0.0
        # clicks can be taken from a blocked caller only in the main thread
        self._caller_waits_in_main = not background and threading.current_thread() is threading.main_thread()
        self.view: View | None = None  # made by the refresher once DELAY has passed
        self._thread = threading.Thread(target=self._refresh, name="mpnb-live", daemon=True)
        self._thread.start()

    def _make_view(self) -> View:
        if self.mode == "widget":
            from mpnb.widget import LiveWidget

            view = LiveWidget(self.facts(), self.cancel)
            if self._caller_waits_in_main:
                self._pump = _CommPump.create(_kernel(), view.comm_widgets())
            return view
        return TextView(sys.stderr)

    # -- what the pool calls

    def add(self, call: Any, items: list | None) -> None:
        with self._lock:
            self._calls[call.id] = (call, items)

    def poll(self) -> None:
        """From a waiting caller: handle clicks on this view (main thread only)."""
        if self._pump is None:
            return
        now = time.monotonic()
        if now >= self._next_pump:
            self._next_pump = now + PUMP_INTERVAL
            self._pump.pump()

    def finish(self, interrupted: bool = False) -> None:
        """The work is over (``interrupted``: by Ctrl-C or Cancel): stop
        refreshing and leave the summary."""
        self._cancelled = self._cancelled or interrupted
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def cancel(self) -> None:
        """The Cancel button: stop the pool's work, as a kernel interrupt does."""
        self._cancelled = True
        pool = self._pool()
        if pool is not None:
            pool.cancel()

    # -- the refresher

    def _refresh(self) -> None:
        try:
            while not self._stop.wait(DELAY if self.view is None else INTERVAL):
                if self.background and self._all_done():
                    break
                if self.view is None:
                    self.view = self._make_view()
                self.view.update(self.facts())
        finally:
            _forget(self)
            if self.view is not None:
                self.view.close(self.facts(finished=True))

    def _all_done(self) -> bool:
        with self._lock:
            return all(call.future is None or call.future.done() for call, _ in self._calls.values())

    def facts(self, finished: bool = False) -> Facts:
        """Read the monitor: progress, workers and failures of these calls now."""
        with self._lock:
            calls = dict(self._calls)
        statuses = [s for s in self.monitor.calls() if s.call in calls]
        self._read_events(calls)
        total: int | None = 0
        for status in statuses:
            total = None if total is None or status.total is None else total + status.total
        rows = [self._row(status, calls) for status in self.monitor.sample()]
        alive = len(rows)
        rows.extend(self._dead.values())
        rows = [self._with_work(row) for row in rows]
        return Facts(
            name=self.name, backend=self.backend, method=self.method, alive=alive, size=self.size,
            done=sum(s.done for s in statuses), failed=sum(s.failed for s in statuses) - self._cancelled_tasks,
            total=total, elapsed=time.monotonic() - min((s.started for s in statuses), default=self._started),
            rows=tuple(rows),
            failures=tuple(self._failures), finished=finished, cancelled=self._cancelled,
        )

    def _read_events(self, calls: dict[int, tuple[Any, list | None]]) -> None:
        events, self._cursor = self.monitor.events(self._cursor)
        for event in events:
            if isinstance(event, WorkerStopped):
                if event.reason != "stopped":
                    self._dead[event.pid] = Row(event.pid, "dead", task=_death(event.reason))
                    while len(self._dead) > MAX_DEAD_ROWS:
                        self._dead.pop(next(iter(self._dead)))
            elif isinstance(event, (TaskFinished, TaskFailed)) and event.call in calls:
                failed = isinstance(event, TaskFailed)
                if failed and event.error.startswith("CancelledError"):
                    self._cancelled_tasks += 1  # cancelled, not failed: no row counts it
                    continue
                done, fails, seconds = self._work.get(event.pid, (0, 0, 0.0))
                self._work[event.pid] = (done + (not failed), fails + failed,
                                         seconds + event.finished - event.started)
                if failed:
                    self._on_failure(event, calls[event.call])

    def _on_failure(self, event: TaskFailed, entry: tuple[Any, list | None]) -> None:
        if len(self._failures) < MAX_FAILURES:
            self._failures.append(Failure(event.index, _task_label(entry, event.index), event.pid, event.error,
                                          _traceback(entry[0], event.index)))

    def _with_work(self, row: Row) -> Row:
        done, failed, seconds = self._work.get(row.pid or -1, (0, 0, None))
        return replace(row, done=done, failed=failed, busy=seconds)

    def _row(self, status: Any, calls: dict[int, tuple[Any, list | None]]) -> Row:
        state = status.state
        if state == "starting" and status.worker >= self.size:
            state = "restarting"  # replaces a worker that died
        task = ""
        if status.index is not None:
            task = _task_label(calls.get(status.call), status.index)
        return Row(
            pid=status.pid, state=state, task=task, running=status.elapsed, cpu=status.cpu_percent, rss=status.rss,
            address=getattr(status, "address", None),
        )


def _task_label(entry: tuple[Any, list | None] | None, index: int) -> str:
    if entry is None:
        return f"task {index} (another call)"
    call, items = entry
    if items is None or not 0 <= index < len(items):
        return f"task {index}"
    from mpnb.pool import _describe

    label = _describe(call, index, items[index])
    return label.replace("task 0", "submitted task", 1) if call.future is not None else label


def _traceback(call: Any, index: int) -> str:
    with call.cond:
        exc = call.results.get(index) if index in call.failed else None
    if not isinstance(exc, BaseException) or exc.__cause__ is None:
        return ""
    return str(exc.__cause__).strip("\n")


def _death(reason: str) -> str:
    if reason == "cancel":
        return "killed by Cancel"
    if reason == "timeout":
        return "killed: task timed out"
    if reason == "stopped-by-signal":
        return "killed at shutdown: stopped by a signal"
    if reason == "start-timeout":
        return "killed: did not start in time"
    return f"died ({reason})"


def _pool_labels(pool: "Pool") -> tuple[str, str, str]:
    """The pool's variable name in the notebook, its backend and start method."""
    name = "pool"
    shell = _shell()
    if shell is not None:
        name = next((k for k, v in shell.user_ns.items() if v is pool and not k.startswith("_")), name)
    backend = getattr(pool, "backend", None)
    engine = getattr(getattr(pool, "_manager", None), "backend", None)
    if not isinstance(backend, str):
        backend = type(engine).__name__.removesuffix("Backend").lower() if engine is not None else "inline"
    return name, backend, str(getattr(engine, "method", "") or "")


def _shell() -> Any:
    """The running IPython shell, without importing IPython in a plain script."""
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()


def _execution_count() -> int | None:
    return getattr(_shell(), "execution_count", None)


# ------------------------------------------------------------------ entry points

# the background session of each pool, reused by later submits of the same cell
_background: "weakref.WeakKeyDictionary[Pool, Session]" = weakref.WeakKeyDictionary()
_background_lock = threading.Lock()


def watch(pool: "Pool", call: Any, items: list | None) -> Session | None:
    """A live view of one blocking call (``map``, ``imap``), or ``None``.

    The caller calls :meth:`Session.poll` while it waits and
    :meth:`Session.finish` when the call is over.
    """
    mode = choose_mode(pool.live)
    if mode is None:
        return None
    return Session(pool, mode, False, call, items)


def watch_background(pool: "Pool", call: Any, items: list) -> None:
    """Show a submitted task in the pool's background view of this cell.

    The view ends by itself, with its summary, when all its futures are done.
    """
    mode = choose_mode(pool.live)
    if mode is None:
        return
    with _background_lock:
        session = _background.get(pool)
        if session is None or session._stop.is_set() or session.cell != _execution_count():
            _background[pool] = Session(pool, mode, True, call, items)
        else:
            session.add(call, items)


def _forget(session: Session) -> None:
    with _background_lock:
        for pool, current in list(_background.items()):
            if current is session:
                del _background[pool]


# ------------------------------------------------------------------ text view


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(value), 60)
    return f"{minutes}:{seconds:02d} min" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d} h"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def status_line(facts: Facts) -> str:
    """One line of facts: progress, workers, rate, time, failures."""
    busy = sum(1 for r in facts.rows if r.state == "busy")
    rate = f"{facts.rate:.1f} tasks/s" if facts.rate else "- tasks/s"
    eta = f", ETA {_seconds(facts.eta)}" if facts.eta is not None else ""
    return (
        f"mpnb {facts.name}: {facts.progress} | workers {facts.alive}/{facts.size} ({busy} busy) | "
        f"{rate} | {_seconds(facts.elapsed)}{eta} | {facts.failed} failed"
    )


def summary_text(facts: Facts) -> str:
    """The end-of-work summary as plain text: a headline, workers, failures."""
    state = "cancelled" if facts.cancelled else "done"
    rate = f", {facts.rate:.1f} tasks/s" if facts.rate else ""
    lines = [
        f"mpnb {facts.name} ({facts.backend}{', ' + facts.method if facts.method else ''}): {state}, "
        f"{facts.done} of {facts.total if facts.total is not None else '?'} tasks returned, "
        f"{facts.failed} failed, {_seconds(facts.elapsed)}{rate}"
    ]
    for row in facts.rows:
        lines.append(
            f"  pid {row.pid}: {row.state}, {row.done} done, {row.failed} failed"
            + (f", busy {_seconds(row.busy)}" if row.busy is not None else "")
            + (f", {row.task}" if row.state == "dead" else "")
            + (f", {row.address}" if row.address else "")
        )
    for failure in facts.failures:
        lines.append(f"  {failure.task} failed in pid {failure.pid}: {failure.error}")
    return "\n".join(lines)


class TextView:
    """Outside a notebook: a status line rewritten in place, then a summary."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._tty = _is_tty(stream)
        self._last = ""

    def update(self, facts: Facts) -> None:
        line = status_line(facts)
        if line == self._last or not self._tty:
            return
        self._last = line
        self._write("\r" + line[: _width() - 1] + "\x1b[K")

    def close(self, facts: Facts) -> None:
        self._write(("\r\x1b[K" if self._last else "") + summary_text(facts) + "\n")

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # the stream was closed
            pass


def _width() -> int:
    import shutil

    return shutil.get_terminal_size((100, 20)).columns


# ------------------------------------------------------------------ clicks while blocked


class _CommPump:
    """Handle comm messages for our widgets while the main thread is blocked.

    ipykernel reads shell messages (execute requests, completions, comm
    messages) in the main thread's event loop, which does not run while a
    cell waits in ``map``.  :meth:`pump` reads the messages waiting on the
    main thread's shell stream: ``comm_msg`` for one of our widgets is
    handled now, and every other message goes, in arrival order, to the
    handler the kernel registered for it, exactly as the event loop would
    pass it on.  ipykernel 6 reads the shell socket in the main thread; in
    ipykernel 7 a shell-channel thread forwards the main shell's messages
    through an in-process socket pair, whose receiving stream is used instead.
    """

    def __init__(self, stream: Any, session: Any, widgets: dict[str, Any]):
        self._stream = stream
        self._session = session
        self._widgets = widgets

    @classmethod
    def create(cls, kernel: Any, widgets: dict[str, Any]) -> "_CommPump | None":
        stream = _main_shell_stream(kernel)
        if stream is None or not hasattr(stream, "_recv_callback"):
            return None
        return cls(stream, kernel.session, widgets)

    def pump(self) -> None:
        import zmq

        stream = self._stream
        original, copy = stream._recv_callback, stream._recv_copy
        if original is None or stream.closed():
            return
        stream.on_recv(lambda message: self._route(message, original, copy), copy=copy)
        try:
            stream.flush(zmq.POLLIN)
        finally:
            stream.on_recv(original, copy=copy)

    def _route(self, message: list, original: Callable, copy: bool) -> Any:
        session = self._session
        try:
            idents, frames = session.feed_identities(message, copy=copy)
            peek = session.deserialize(frames, content=False, copy=copy)  # does not record the signature
            widget = None
            if peek["header"]["msg_type"] == "comm_msg":
                widget = self._widgets.get(session.unpack(peek["content"]).get("comm_id"))
        except Exception:
            widget = None
        if widget is None:
            return original(message)  # the kernel's own handler, in order
        widget._handle_msg(session.deserialize(frames, content=True, copy=copy))
        return None


def _main_shell_stream(kernel: Any) -> Any:
    """The stream on which the main thread receives shell messages (ipykernel 6 and 7)."""
    try:
        import ipykernel
    except ImportError:
        return None
    major = int(ipykernel.__version__.split(".")[0])
    if major == 7 and getattr(kernel, "shell_channel_thread", None) is not None:
        manager = kernel.shell_channel_thread.manager
        return manager.get_shell_channel_to_subshell_pair(None).to_stream
    if major in (6, 7):
        return getattr(kernel, "shell_stream", None)
    return None
