"""Live status of a pool's work: the one place that decides how it is shown.

::

    caller (the cell's thread)           refresher thread              frontend
    --------------------------           ----------------              --------
    map / imap / submit
      | watch(Watched) -> Session -- starts --> after DELAY s: display(widget)
      |                                     every INTERVAL s:
      |                                       Facts <- Watched.monitor
      |                                       render(facts): ≤ 3 comm ---> widget
      | wait loop: Session.poll()             messages, none if unchanged
      |   our widgets' comm_msg <---------------------------------------- Cancel click
      |   (others stay queued)  --> Watched.cancel()
      | Session.finish() -------- stops --> summary replaces the widget --> static HTML

A view knows nothing of the pool: what it needs from whoever runs the work is
a :class:`Watched` (the monitor, a few labels, and callables that describe a
task, find its traceback and cancel the work).  It reads progress, worker
rows and task events from the monitor alone, builds :class:`mpnb.facts.Facts`
and hands them to the widget (:mod:`mpnb.widget`) or the text line.

:func:`choose_mode` decides between the ipywidgets view (a kernel with a
frontend), a text line on a terminal, and nothing.  Work that ends within
:data:`DELAY` shows nothing at all; a ``map``'s caller starts the refresher
from its wait only once DELAY has passed, so a quick map starts no thread
(other work starts it at once).  The caller does no per-task work: a
refresher thread reads the monitor a few times a second, builds the facts
and hands them to the view, which sends only what changed.  With at most
three widgets changing per tick and :data:`INTERVAL` between ticks (so at
most three ticks in any second), a live view sends at most nine comm
messages per second whatever the task rate.

A Cancel click reaches the kernel as a ``comm_msg`` on the shell channel,
which the kernel reads only between cells; while a blocking call waits in
the main thread, :class:`mpnb.comms.CommPump` hands such clicks to the widget.
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
from mpnb.facts import Facts, FailedTask, Row, status_line, summary_text

if TYPE_CHECKING:  # pragma: no cover
    from mpnb.comms import CommPump
    from mpnb.monitor import Monitor, WorkerStatus

__all__ = ["Session", "TextView", "Watched", "check_live", "choose_mode", "watch", "watch_background"]

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


# ------------------------------------------------------------------ what a view watches

# A session keeps the monitor and the callables for as long as it shows the
# work, but the owner only weakly: a pool dropped while its view runs must be
# free to go (its finalizer shuts it down).  The callables should therefore
# not hold the owner strongly either.


@dataclass(frozen=True)
class Watched:
    """What a live view needs from the pool whose work it shows; never the pool itself."""
    monitor: Monitor                          # events and worker rows
    size: int                                 # workers the pool wants
    backend: str                              # "local", "dask", "inline"
    method: str                               # start method ("exec", "loky", ...), or ""
    describe: Callable[[int, int], str]       # (call id, task index) -> "task 3 (argument 7)"
    traceback: Callable[[int, int], str]      # (call id, task index) -> worker traceback or ""
    cancel: Callable[[], None]                # what the Cancel button does
    owner: Any = None                         # weakly held; its variable name titles the view


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
    """The live view of some calls of one pool, from their start to their summary.

    ``done`` is given for a submitted future: the session then ends by
    itself once ``done()`` is true for each of its calls.  Without it the
    caller ends the session with :meth:`finish`.
    """

    def __init__(self, watched: Watched, call_id: int, mode: str, done: Callable[[], bool] | None = None,
                 polled: bool = False):
        self.monitor: Monitor = watched.monitor
        self.mode = mode
        self.background = done is not None
        self.cell = _execution_count()
        self.name = _owner_name(watched.owner)
        self.backend, self.method, self.size = watched.backend, watched.method, watched.size
        self._cancel_work = watched.cancel
        self._lock = threading.Lock()
        self._calls: dict[int, Watched] = {}  # call id -> how to describe its tasks (no owner)
        self._done: dict[int, Callable[[], bool]] = {}
        self.add(watched, call_id, done)
        self._started = time.monotonic()
        self._reading = threading.Lock()  # one reader of the events at a time
        self._cursor = self.monitor.cursor()  # only what happens from now on
        self._failures: list[FailedTask] = []
        self._cancelled_tasks = 0
        self._dead: dict[int, Row] = {}
        # (worker, pid) -> (done, failed, seconds): threads of one process share a pid
        self._work: dict[tuple[int | None, int | None], tuple[int, int, float]] = {}
        self._cancelled = False
        self._stop = threading.Event()
        self._pump: CommPump | None = None
        self._next_pump = 0.0
        # clicks can be taken from a blocked caller only in the main thread
        self._caller_waits_in_main = not self.background and threading.current_thread() is threading.main_thread()
        self.view: View | None = None  # made by the refresher once DELAY has passed
        self._thread = threading.Thread(target=self._refresh, name="mpnb-live", daemon=True)
        # polled: the caller waits in a loop that calls poll() until finish(),
        # and poll() starts the refresher once DELAY has passed (a quick call starts no thread)
        self._polled = polled
        if not polled:
            self._thread.start()

    def _make_view(self) -> View:
        if self.mode == "widget":
            from mpnb.comms import CommPump
            from mpnb.widget import LiveWidget

            view = LiveWidget(self.facts(), self.cancel)
            if self._caller_waits_in_main:
                self._pump = CommPump.create(_kernel(), view.comm_widgets())
            return view
        return TextView(sys.stderr)

    # -- what the caller calls

    def add(self, watched: Watched, call_id: int, done: Callable[[], bool] | None = None) -> None:
        """Show call ``call_id`` too; ``watched`` describes its tasks."""
        with self._lock:
            self._calls[call_id] = replace(watched, owner=None)
            if done is not None:
                self._done[call_id] = done

    def poll(self) -> None:
        """From a waiting caller: start the refresher of a polled session once
        :data:`DELAY` has passed; handle clicks on this view (main thread only)."""
        if self._polled and time.monotonic() - self._started >= DELAY:
            self._polled = False
            self._thread.start()
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
        if self._polled:  # never started: nothing was shown
            self._polled = False
        elif threading.current_thread() is not self._thread:
            self._thread.join()

    def cancel(self) -> None:
        """The Cancel button: stop the work, as a kernel interrupt does."""
        self._cancelled = True
        self._cancel_work()

    # -- the refresher

    def _refresh(self) -> None:
        try:
            # a polled session's refresher starts once DELAY has passed: it makes the view at once
            while not self._stop.wait(INTERVAL if self.view is not None else
                                      max(0.0, self._started + DELAY - time.monotonic())):
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
            done = list(self._done.values())
        return all(is_done() for is_done in done)

    def facts(self, finished: bool = False) -> Facts:
        """Read the monitor: progress, workers and failures of these calls now."""
        with self._lock:
            calls = dict(self._calls)
        statuses = [s for s in self.monitor.calls() if s.call in calls]
        with self._reading:
            self._read_events(calls)
            failures, dead = tuple(self._failures), list(self._dead.values())
            cancelled_tasks = self._cancelled_tasks
        total: int | None = 0
        for status in statuses:
            total = None if total is None or status.total is None else total + status.total
        samples = self.monitor.sample()
        rows = [self._row(status, calls) for status in samples]
        # running tasks of these calls count by how far they said they are
        partial = sum(row.fraction or 0.0 for status, row in zip(samples, rows) if status.call in calls)
        alive = len(rows)
        rows = [self._with_work(row) for row in rows + dead]
        return Facts(
            name=self.name, backend=self.backend, method=self.method, alive=alive, size=self.size,
            done=sum(s.done for s in statuses), failed=sum(s.failed for s in statuses) - cancelled_tasks,
            total=total, elapsed=time.monotonic() - min((s.started for s in statuses), default=self._started),
            rows=tuple(rows), failures=failures, finished=finished, cancelled=self._cancelled,
            cached=sum(s.cached for s in statuses),
            partial=0.0 if finished else partial,
        )

    def _read_events(self, calls: dict[int, Watched]) -> None:
        events, self._cursor = self.monitor.events(self._cursor)
        for event in events:
            if isinstance(event, WorkerStopped):
                if event.reason != "stopped":
                    self._dead[event.pid] = Row(event.pid, "dead", task=_death(event.reason), worker=event.worker)
                    while len(self._dead) > MAX_DEAD_ROWS:
                        self._dead.pop(next(iter(self._dead)))
            elif isinstance(event, (TaskFinished, TaskFailed)) and event.call in calls:
                failed = isinstance(event, TaskFailed)
                if isinstance(event, TaskFailed) and event.error.startswith("CancelledError"):
                    self._cancelled_tasks += 1  # cancelled, not failed: no row counts it
                    continue
                key = (event.worker, event.pid)
                done, fails, seconds = self._work.get(key, (0, 0, 0.0))
                self._work[key] = (done + (not failed), fails + failed,
                                   seconds + event.finished - event.started)
                if isinstance(event, TaskFailed):
                    self._on_failure(event, calls[event.call])

    def _on_failure(self, event: TaskFailed, watched: Watched) -> None:
        if len(self._failures) < MAX_FAILURES:
            self._failures.append(FailedTask(event.index, watched.describe(event.call, event.index), event.pid,
                                          event.error, watched.traceback(event.call, event.index)))

    def _with_work(self, row: Row) -> Row:
        done, failed, seconds = self._work.get((row.worker, row.pid), (0, 0, None))
        return replace(row, done=done, failed=failed, busy=seconds)

    def _row(self, status: WorkerStatus, calls: dict[int, Watched]) -> Row:
        state = status.state
        if state == "starting" and status.worker >= self.size:
            state = "restarting"  # replaces a worker that died
        task = ""
        if status.index is not None and status.call is not None:
            watched = calls.get(status.call)
            if watched is None:
                task = f"task {status.index} (another call)"
            else:
                task = watched.describe(status.call, status.index)
        return Row(
            pid=status.pid, state=state, task=task, running=status.elapsed, cpu=status.cpu_percent, rss=status.rss,
            address=status.address, worker=status.worker, device=status.device, memory_limit=status.memory_limit,
            task_done=status.task_done, task_total=status.task_total, note=status.note,
        )


def _death(reason: str) -> str:
    if reason == "cancel":
        return "killed by Cancel"
    if reason == "timeout":
        return "killed: task timed out"
    if reason == "stopped-by-signal":
        return "killed at shutdown: stopped by a signal"
    if reason == "start-timeout":
        return "killed: did not start in time"
    if reason == "memory":
        return "killed: past max_memory"
    return f"died ({reason})"


def _owner_name(owner: Any) -> str:
    """The owner's variable name in the notebook, or ``pool``."""
    shell = _shell()
    if owner is None or shell is None:
        return "pool"
    return next((k for k, v in shell.user_ns.items() if v is owner and not k.startswith("_")), "pool")


def _shell() -> Any:
    """The running IPython shell, without importing IPython in a plain script."""
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()


def _execution_count() -> int | None:
    return getattr(_shell(), "execution_count", None)


# ------------------------------------------------------------------ entry points

# the background session of each owner, reused by later submits of the same cell
_background: "weakref.WeakKeyDictionary[Any, Session]" = weakref.WeakKeyDictionary()
_background_lock = threading.Lock()


def watch(watched: Watched, call_id: int, live: bool | None, polled: bool = False) -> Session | None:
    """A live view of one blocking call (``map``, ``imap``), or ``None``.

    ``live`` is the owner's option (see :func:`choose_mode`).  The caller
    calls :meth:`Session.poll` while it waits and :meth:`Session.finish` when
    the call is over.  ``polled``: the caller waits in one loop until the end
    and calls :meth:`Session.poll` at least every :data:`DELAY` (``map``; not
    ``imap``, whose consumer may do long work between two results), so the
    refresher thread starts only if the call lasts.
    """
    mode = choose_mode(live)
    if mode is None:
        return None
    return Session(watched, call_id, mode, polled=polled)


def watch_background(watched: Watched, call_id: int, live: bool | None, done: Callable[[], bool]) -> None:
    """Show a submitted task (call ``call_id``) in its owner's background view of this cell.

    ``done()`` says whether the task is done; the view ends by itself, with
    its summary, when all its tasks are.  Later submits of the same owner in
    the same cell join the view while it runs.
    """
    mode = choose_mode(live)
    if mode is None:
        return
    key = _background_key(watched)
    with _background_lock:
        session = _background.get(key)
        if session is None or session._stop.is_set() or session.cell != _execution_count():
            _background[key] = Session(watched, call_id, mode, done)
        else:
            session.add(watched, call_id, done)


def _background_key(watched: Watched) -> Any:
    """The owner, or its monitor when there is no owner that a weak reference can hold."""
    try:
        weakref.ref(watched.owner)
    except TypeError:  # None, or a value such as an int
        return watched.monitor
    return watched.owner


def _forget(session: Session) -> None:
    with _background_lock:
        for key, current in list(_background.items()):
            if current is session:
                del _background[key]


# ------------------------------------------------------------------ text view


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
