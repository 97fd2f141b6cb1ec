"""Progress from inside a task: ``mpnb.progress`` and ``mpnb.report``.

(This module is not ``mpnb.progress``: importing a submodule of that name
would replace the function ``mpnb.progress`` with the module.)

::

    task (in a worker)                    worker                      parent
    ------------------                    ------                      ------
    for x in mpnb.progress(xs): ...
    mpnb.report(340, 1000, "fitting")
      └─ at most every INTERVAL s ──> the worker's sink ──(PROGRESS)──> monitor row
                                      (local: its pipe;                 ──> live view
                                       dask: an event on its topic)

In a worker, :func:`report` feeds the worker's row of the parent's live view:
``task 7 (argument 0.3) · fitting · 340/1000 (34%)``.  In a local worker a
call only stores its values and a thread of the worker sends the latest
(:func:`_send_latest`); on a dask worker's thread a call counts down and the
clock is read once per stride of calls: either way a task may call it in its
innermost loop.  Outside a worker :func:`report` does nothing, and
:func:`progress` is ``tqdm.auto.tqdm`` when tqdm is installed, otherwise the
plain iteration.

A worker routes ``tqdm`` bars the same way (:func:`quiet_tqdm`, run by the
worker once ``tqdm`` is imported): a bar made inside a task writes nothing
into the task's output, and its count, total and description go to the row.

A local worker runs one task at a time and sets its sink for the whole
process (:data:`process_sink`); a dask worker runs a task per thread and
sets it per thread (:func:`set_thread_sink`).  This module imports nothing
a worker has not loaded already.
"""

from __future__ import annotations

import _thread
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a worker 3 ms; threading, 1 ms (imported when a thread starts)
    import threading
    from types import CellType
    from typing import Any, Callable, Iterable, Iterator

    #: ``sink(done, total, note)`` sends one update to the parent
    Sink = Callable[[float, "float | None", "str | None"], None]

__all__ = ["INTERVAL", "progress", "report"]

#: at most one update per this many seconds leaves a worker
INTERVAL = 0.1
#: a note is cut to this many characters
MAX_NOTE = 80

#: ``(pid, sink, task)``: a local worker's; ``task()`` names the task
#: running now.  A process a task forked (another pid) must not write into
#: the worker's pipe.
process_sink: "tuple[int, Sink, Callable[[], Any]] | None" = None
_threads = _thread._local()  # .sink on a dask worker's thread running an mpnb task

# -- a local worker: report() stores, a thread sends
# (the cells report() writes, made with it below: _ON while the worker's
# sending thread runs, and the latest report)
#: what the sending thread found wrong in a report, raised by the task's next call
_local_error: "str | None" = None
_sender: "threading.Thread | None" = None
#: a sending thread with nothing to send for this long ends (the next report starts another)
SENDER_IDLE = 5.0

# -- a dask worker's thread: report() counts calls down and reads the clock
_next = 0.0  # the earliest time the next update may leave
_monotonic = time.monotonic
# report() reads the clock once every _stride calls (_box[0] counts them
# down): the stride doubles while that many calls take under STRIDE_SECONDS,
# and the flusher sets it back to 1 once the calls slow down; _box[1] is the
# last update held back by the throttle
_box: list = [1, None]
_stride = 1
_checked = 0.0
#: calls closer together than this (seconds, a stride of them) widen the stride ...
STRIDE_SECONDS = 0.001
#: ... up to this many calls between two readings of the clock
MAX_STRIDE = 256
_flusher: "threading.Thread | None" = None
#: a flusher with nothing to do for this long ends (the next update starts another)
FLUSHER_IDLE = 5.0


def set_thread_sink(sink: "Sink | None") -> None:
    """A dask worker: the task this thread runs now reports to ``sink``."""
    _threads.sink = sink


def _sink() -> "Sink | None":
    sink = getattr(_threads, "sink", None)
    if sink is not None:
        return sink
    found = process_sink
    if found is not None and found[0] == os.getpid():
        return found[1]
    return None


def in_task() -> bool:
    """Whether the code calling runs in an mpnb task, whose reports reach a live view."""
    return _sink() is not None


def _reporter() -> "tuple[Callable[..., None], dict[str, Any]]":
    """``report`` and the cells it writes, by name.  In a local worker a call
    only stores its three values, each in a cell of this closure, and a thread
    sends the latest (:func:`_send_latest`): a store to a cell costs about half
    what a store into a list does (measured: a call's cost over an empty
    function of the same signature, 13-17 ns against 21-25), and a call that
    stored a module global would change the module's dict and undo the
    interpreter's caching of every global the hot path reads."""
    on = False  # the worker's sending thread runs
    last_done: Any = None  # None: the running task has not reported
    last_total: Any = None
    last_note: Any = None

    def report(done: float, total: float | None = None, note: str | None = None) -> None:
        """Say how far the running task is: ``done`` of ``total`` (units of your
        choice), with an optional ``note`` (``"fitting"``).  Cheap enough for
        the innermost loop: at most one update every :data:`INTERVAL` seconds
        leaves the worker.  Outside a task it does nothing."""
        nonlocal last_done, last_total, last_note
        last_done = done  # in a local worker, all a call does: a thread sends it
        last_total = total
        last_note = note
        if on:
            return
        _report_elsewhere(done, total, note)

    assert report.__closure__ is not None
    return report, dict(zip(report.__code__.co_freevars, report.__closure__))


if TYPE_CHECKING:  # its signature, for type checkers
    def report(done: float, total: float | None = None, note: str | None = None) -> None: ...  # noqa: D103

report, _cells = _reporter()
report.__qualname__ = "report"  # pickled by reference as mpnb.reporting.report
_ON, _DONE, _TOTAL, _NOTE = (_cells[name] for name in ("on", "last_done", "last_total", "last_note"))
del _cells


def _latest() -> tuple:
    return _DONE.cell_contents, _TOTAL.cell_contents, _NOTE.cell_contents


def _report_elsewhere(done: Any, total: Any, note: Any) -> None:
    """``report`` where no sending thread runs: the first report of a local
    worker's task (sent now, then the thread starts), a dask worker's thread,
    or outside a worker (nothing)."""
    global _local_error
    if _local_error is not None:  # what the sending thread refused, raised in the task
        message, _local_error = _local_error, None
        raise TypeError(message)
    found = process_sink
    if found is not None and found[0] == os.getpid() and getattr(_threads, "sink", None) is None:
        _send(found[1], done, total, note)  # a TypeError reaches the task here
        _start_sender(found)
        return
    if getattr(_threads, "sink", None) is None:
        return  # not in a task
    box = _box
    box[0] -= 1
    if box[0]:
        box[1] = (done, total, note)  # a later call sends it
        return
    _on_clock(done, total, note)


def _start_sender(found: "tuple[int, Sink, Callable[[], Any]]") -> None:
    global _sender
    _ON.cell_contents = True
    if _sender is None or not _sender.is_alive():
        import threading

        _sender = threading.Thread(target=_send_latest, args=(found,), name="mpnb-progress", daemon=True)
        _sender.start()


def _send_latest(found: "tuple[int, Sink, Callable[[], Any]]") -> None:
    """A local worker's sending thread: every :data:`INTERVAL` seconds, send
    the latest report if it differs from the last one sent for the task
    running.  The worker empties ``_DONE`` as each task starts
    (:func:`task_starts`), so what is there is the running task's.  Ends
    after :data:`SENDER_IDLE` seconds without a new report."""
    global _local_error
    _, sink, running = found
    sent, seen, idle = (running(), _latest()), _DONE.cell_contents, 0.0
    while True:
        time.sleep(INTERVAL)
        latest = _latest()
        done = latest[0]
        if done is not seen:
            seen, idle = done, 0.0
            update = (running(), latest)
            if done is not None and update != sent:
                sent = update
                try:
                    _send(sink, *latest)
                except TypeError as exc:
                    _local_error, _ON.cell_contents = str(exc), False  # the task's next call raises it
            continue
        idle += INTERVAL
        if idle >= SENDER_IDLE:
            _ON.cell_contents = False
            if _DONE.cell_contents is seen:
                return
            _ON.cell_contents, idle = True, 0.0  # a report came as it was ending


def task_starts() -> "CellType":
    """For a local worker: the cell of the latest report's ``done``, which it
    sets to None as each task (or batch of fast tasks) starts, so that no
    task's report is shown as the next one's."""
    return _DONE


def _on_clock(done: Any, total: Any, note: Any) -> None:
    """A dask worker's thread: the calls of a stride are over: read the
    clock, adapt the stride, send if it is time."""
    global _stride, _checked, _next
    now = _monotonic()
    if now - _checked < STRIDE_SECONDS:
        _stride = min(MAX_STRIDE, 2 * _stride)
    else:
        _stride = 1
    _box[0], _checked = _stride, now
    _start_flusher()
    if now < _next:
        _box[1] = (done, total, note)
        return
    _next = now + INTERVAL
    _box[1] = None
    sink = _sink()
    if sink is not None:
        _send(sink, done, total, note)


def _send(sink: "Sink", done: Any, total: Any, note: Any) -> None:
    try:
        done = float(done)
        total = None if total is None else float(total)
    except (TypeError, ValueError):
        raise TypeError(f"mpnb.report({done!r}, {total!r}): done and total must be numbers "
                        "(how many units of work are done, and of how many)") from None
    if note is not None:
        note = str(note)[:MAX_NOTE]
    sink(done, total, note)


def _start_flusher() -> None:
    global _flusher
    if _flusher is None or not _flusher.is_alive():
        import threading

        _flusher = threading.Thread(target=_flush, name="mpnb-progress-stride", daemon=True)
        _flusher.start()


def _flush() -> None:
    """A dask worker: once the calls of a stride are slower than
    :data:`INTERVAL`, set the stride back to 1, so that the next call
    reads the clock (a task's thread runs other tasks between reports)."""
    idle_since = _monotonic()
    while _monotonic() - idle_since < FLUSHER_IDLE:
        time.sleep(INTERVAL)
        if _monotonic() - _checked > INTERVAL:
            _box[0] = 1
        else:
            idle_since = _monotonic()


def progress(iterable: Iterable[Any], total: float | None = None, desc: str | None = None) -> Iterable[Any]:
    """Iterate over ``iterable``, showing how far the loop is.

    In a task it reports to the worker's row of the live view (``desc``
    reads as the note); elsewhere it is ``tqdm.auto.tqdm(iterable,
    total=total, desc=desc)`` when tqdm is installed, otherwise ``iterable``
    itself.  ``total`` defaults to ``len(iterable)`` when it has one."""
    if in_task():
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                pass
        return _reporting(iterable, total, desc)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc)


def _reporting(iterable: Iterable[Any], total: float | None, desc: str | None) -> Iterator[Any]:
    report(0, total, desc)  # throttled too: a loop in each of many short tasks sends no flood
    done = 0
    for item in iterable:
        yield item
        done += 1
        report(done, total, desc)


# ------------------------------------------------------------------ tqdm in a worker


class _Nowhere:
    """What a bar made inside a task writes to."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


_NOWHERE = _Nowhere()


def quiet_tqdm(std: Any) -> None:
    """Patch ``tqdm.std`` (the module) in a worker: a bar made inside a task
    writes nowhere and reports its count to the live view instead.

    Relies on two things of tqdm, checked by tests/test_progress.py: every
    bar class derives from ``tqdm.std.tqdm``, whose ``__init__`` takes
    ``file=`` and whose ``display()`` is called at each refresh with ``n``,
    ``total`` and ``desc`` set.  A bar whose ``file`` is not the task's
    output (a file the task opened) writes there as before."""
    cls = getattr(std, "tqdm", None)
    if cls is None or "_mpnb_quiet" in vars(cls) or not hasattr(cls, "display"):
        return
    init, display = cls.__init__, cls.display

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if in_task() and kwargs.get("file") in (None, sys.stdout, sys.stderr) and len(args) < 5:
            kwargs["file"] = _NOWHERE
        init(self, *args, **kwargs)

    def show(self: Any, *args: Any, **kwargs: Any) -> Any:
        if in_task():
            report(self.n, self.total, self.desc or None)
        return display(self, *args, **kwargs)

    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    show.__wrapped__ = display  # type: ignore[attr-defined]
    cls.__init__, cls.display = __init__, show
    cls._mpnb_quiet = True


def quiet_tqdm_notebook(notebook: Any) -> None:
    """Patch ``tqdm.notebook`` (the module) in a worker: its widget bar
    (``tqdm.notebook.tqdm``, what a notebook's ``tqdm.auto`` is, pickled
    with a task that uses it) made inside a task is a plain bar that writes
    nowhere and reports, as :func:`quiet_tqdm` makes them; outside a task it
    is left as it is.  Relies on ``tqdm_notebook`` deriving from
    ``tqdm.std.tqdm`` and overriding ``__init__``, ``display`` and
    ``reset``, checked by tests/test_progress.py."""
    cls = getattr(notebook, "tqdm_notebook", None)
    std = sys.modules.get("tqdm.std")
    if cls is None or std is None or "_mpnb_quiet" in vars(cls):  # not inherited: its own
        return
    quiet_tqdm(std)
    init, display, reset = cls.__init__, cls.display, cls.reset

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if not in_task():
            return init(self, *args, **kwargs)
        kwargs.pop("display", None)  # the widget's own option
        std.tqdm.__init__(self, *args, **kwargs)
        self.disp = lambda *_, **__: report(self.n, self.total, self.desc or None)

    def show(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not hasattr(self, "container"):  # made inside a task
            report(self.n, self.total, self.desc or None)
            return None
        return display(self, *args, **kwargs)

    def reset_bar(self: Any, total: Any = None) -> Any:
        if not hasattr(self, "container"):
            return std.tqdm.reset(self, total=total)
        return reset(self, total=total)

    cls.__init__, cls.display, cls.reset = __init__, show, reset_bar
    cls._mpnb_quiet = True
