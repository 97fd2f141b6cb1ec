"""Progress from inside a task: ``mpnb.report``, ``mpnb.progress`` and tqdm
bars in workers feed the worker's row of the live view (widget, text line,
summary), locally and on dask; tqdm bars write nothing into the output.

Every task here waits for a file the test creates, so no check depends on
how fast the machine is.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time

import pytest

import mpnb
from kernel import TAG_VAR
from mpnb import reporting
from mpnb.facts import Facts, Row, status_line, summary_text, task_text
from mpnb.widget import Summary, rows_html
from test_widget import Frontend

# defined in a module no worker can import, so they travel by value (also to dask workers)
TASK_SOURCE = '''
import os, time, mpnb

def fit(flag, x=0.3):
    """Reports 340 of 1000, "fitting", until the test creates ``flag``."""
    while not os.path.exists(flag):
        mpnb.report(340, 1000, "fitting")
        time.sleep(0.02)
    return x

def loop(flag):
    """A loop wrapped in mpnb.progress that waits at its 5th item."""
    total = 0
    for i in mpnb.progress(range(8), desc="epochs"):
        while i == 5 and not os.path.exists(flag):
            time.sleep(0.02)
        total += i
    return total

def bad_report():
    """Reports once, then a done that is not a number, until that raises."""
    mpnb.report(1, 10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            mpnb.report("many", 10)
        except TypeError as exc:
            return str(exc)
        time.sleep(0.01)
    return "no TypeError"

def report_late():
    """Reports once, waits past the sending thread's look, reports 9 of 10,
    and returns at once: that last report is still unsent as the next task starts."""
    mpnb.report(1, 10, "first")
    time.sleep(2.5 * mpnb.reporting.INTERVAL)  # half a look before the next
    mpnb.report(9, 10, "first")
    return "reported"

def quiet(flag):
    """Reports nothing; waits until the test creates ``flag``."""
    while not os.path.exists(flag):
        time.sleep(0.02)
    return "quiet"

def bars(flag):
    """A tqdm bar that waits at 250 of 1000 until ``flag``, then prints once."""
    from tqdm.auto import tqdm
    with tqdm(total=1000, desc="tq") as bar:
        for i in range(1000):
            bar.update(1)
            while i == 249 and not os.path.exists(flag):
                bar.refresh()  # a display: each one reports
                time.sleep(0.02)
    print("after the bar")
    return "bars done"
'''
TASKS: dict = {"__name__": "progress_tasks_by_value"}
exec(compile(TASK_SOURCE, "progress_tasks.py", "exec"), TASKS)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def wait_for(condition, what: str, seen=lambda: "", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s; seen: {str(seen())[-600:]}"
        time.sleep(0.05)


@contextlib.contextmanager
def released(*flags):
    """Whatever happens, the tasks waiting for ``flags`` end, so the pool can shut down."""
    try:
        yield
    finally:
        for flag in flags:
            flag.touch()


# ------------------------------------------------------------ outside a worker


def test_outside_a_worker_report_is_silent_and_progress_is_tqdm():
    mpnb.report(3, 10, "nothing to feed")  # no worker: nothing happens, nothing raises
    from tqdm.auto import tqdm

    wrapped = mpnb.progress(range(3), desc="here")
    assert isinstance(wrapped, tqdm) and list(wrapped) == [0, 1, 2]
    assert _with_sink(lambda: mpnb.report(3, 10, "x")) == [(3.0, 10.0, "x")]
    with pytest.raises(TypeError, match=r"mpnb.report\('many', 10\): done and total must be numbers"):
        _with_sink(lambda: mpnb.report("many", 10))


def test_a_report_that_is_not_a_number_raises_in_the_task(tag):
    """In a worker the calls after the first only store the report, and a
    thread of the worker sends it: what that thread finds wrong is raised
    by the task's next call."""
    with mpnb.Pool(1, live=False, env={TAG_VAR: tag}) as pool:
        for _ in range(2):  # also once the sending thread runs
            assert pool.submit(TASKS["bad_report"]).result(timeout=120) == \
                "mpnb.report('many', 10): done and total must be numbers (how many units of work are done, and of how many)"


def _due() -> None:
    """The next report is sent (as after a pause of the task)."""
    reporting._next, reporting._box[0] = 0.0, 1


def _with_sink(call):
    sent: list = []
    reporting.set_thread_sink(lambda *update: sent.append(update))
    try:
        _due()
        call()
    finally:
        reporting.set_thread_sink(None)
    return sent


def test_tqdm_internals_the_routing_relies_on(capsys):
    # a worker patches tqdm.std.tqdm's __init__ (file=) and display(): this
    # fails loudly when a tqdm release moves them
    import tqdm.std

    reporting.quiet_tqdm(tqdm.std)
    assert tqdm.std.tqdm._mpnb_quiet, "tqdm.std.tqdm has no display() to route"

    def bar():
        with tqdm.std.tqdm(total=40, desc="routed", mininterval=0) as progress:
            for _ in range(40):
                progress.update(1)
            _due()
            progress.refresh()

    sent = _with_sink(bar)
    assert (40.0, 40.0, "routed") in sent
    assert capsys.readouterr().err == "", "a bar inside a task writes nothing"

    # tqdm.notebook's widget bar, made inside a task, is a plain bar that reports
    import tqdm.notebook

    reporting.quiet_tqdm_notebook(tqdm.notebook)
    assert "_mpnb_quiet" in vars(tqdm.notebook.tqdm_notebook)

    def widget_bar():
        with tqdm.notebook.tqdm(total=10, desc="widget", mininterval=0) as progress:
            progress.update(4)
            _due()
            progress.refresh()
            progress.reset(total=20)

    sent = _with_sink(widget_bar)
    assert (4.0, 10.0, "widget") in sent
    out = capsys.readouterr()
    assert out.out == out.err == "", "no widget and no text from a bar inside a task"


def test_facts_text_widget_and_summary_show_a_report():
    row = Row(101, "busy", "task 7 (argument 0.3)", 1.0, task_done=340, task_total=1000, note="fitting")
    assert task_text(row) == "task 7 (argument 0.3) · fitting · 340/1000 (34%)"
    facts = Facts(name="pool", backend="local", method="exec", alive=1, size=1, done=3, failed=0, total=10,
                  elapsed=2.0, rows=(row,), failures=(), partial=row.fraction or 0.0)
    assert facts.progress == "3/10 (33%)" and facts.eta == pytest.approx(2.0 / 3.34 * (10 - 3.34))
    assert "fitting · 340/1000 (34%)" in status_line(facts)
    table = rows_html(facts.rows)
    assert 'class="mpnb-task-progress" data-done="340" data-total="1000"' in table and "width:34%" in table
    assert "fitting · 340/1000 (34%)" in summary_text(facts) and "mpnb-task-progress" in Summary(facts)._repr_html_()


# ------------------------------------------------------------ local workers


def test_text_view_shows_a_tasks_report_and_the_header_counts_it(tag, tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("COLUMNS", "400")  # the line is cut at the terminal's width
    flag, flag2 = tmp_path / "fit", tmp_path / "loop"
    with mpnb.Pool(2, live=True, env={TAG_VAR: tag}) as pool, released(flag, flag2):
        future = pool.submit(TASKS["fit"], str(flag))
        wait_for(lambda: "fitting · 340/1000 (34%)" in terminal.getvalue(), "report in the status line",
                 terminal.getvalue)
        assert "mpnb pool: 0/1 (34%)" in terminal.getvalue(), "the header counts the running task's part"
        flag.touch()
        assert future.result(timeout=60) == 0.3
        looped = pool.submit(TASKS["loop"], str(flag2))
        wait_for(lambda: any(r.note == "epochs" and r.task_done == 5 and r.task_total == 8
                             for r in pool.monitor.snapshot()), "mpnb.progress in the worker's row",
                 pool.monitor.snapshot)
        flag2.touch()
        assert looped.result(timeout=60) == sum(range(8))


def test_a_tasks_report_is_never_shown_as_the_next_tasks(tag, tmp_path):
    # one worker: task 0 reports 9/10 just before it returns; task 1 reports
    # nothing, so its row must never show task 0's report
    flag = tmp_path / "quiet"
    with mpnb.Pool(1, env={TAG_VAR: tag}) as pool, released(flag):
        first = pool.submit(TASKS["report_late"])
        second = pool.submit(TASKS["quiet"], str(flag))
        assert first.result(timeout=60) == "reported"
        wait_for(second.running, "the quiet task sent to the worker", pool.monitor.snapshot)
        # the sending thread looks every INTERVAL: give it ten looks while task 1 runs
        deadline = time.monotonic() + 10 * reporting.INTERVAL
        while time.monotonic() < deadline:
            shown = [(r.note, r.task_done) for r in pool.monitor.snapshot() if r.task_done is not None]
            assert not shown, f"the quiet task's row shows the task before's report: {shown}"
            time.sleep(reporting.INTERVAL / 4)
        flag.touch()
        assert second.result(timeout=60) == "quiet"


def test_widget_shows_reports_and_tqdm_bars_stay_out_of_the_cell(kernel, tmp_path):
    kernel.run(f"import mpnb\npool = mpnb.Pool(2)\n{TASK_SOURCE}").ok()
    frontend = Frontend(kernel)
    flag = tmp_path / "fit"
    msg_id = kernel.submit(f"r = pool.map(fit, [{str(flag)!r}], [0.3])")
    row = "task 0 ("
    assert frontend.read(msg_id, until=lambda f: "fitting · 340/1000 (34%)" in f.all_values()) is None
    shown = frontend.all_values()
    assert row in shown and 'class="mpnb-task-progress" data-done="340" data-total="1000"' in shown
    assert 'class="mpnb-progress" data-done="0" data-total="1">0/1 (34%)' in shown
    flag.touch()
    assert frontend.read(msg_id) is None

    frontend, flag = Frontend(kernel), tmp_path / "bars"
    msg_id = kernel.submit(f"print(pool.map(bars, [{str(flag)!r}]))")
    assert frontend.read(msg_id, until=lambda f: "tq · 250/1000 (25%)" in f.all_values()) is None
    flag.touch()
    reply = kernel.collect(msg_id)
    assert reply.status == "ok" and "after the bar" in reply.stdout and "['bars done']" in reply.stdout
    assert "\r" not in reply.stdout + reply.stderr and "it/s" not in reply.stdout + reply.stderr, reply


# ------------------------------------------------------------ dask


def test_dask_tasks_report_to_the_row_and_tqdm_stays_quiet(cluster, tag, tmp_path, capsys):
    flag, flag2 = tmp_path / "fit", tmp_path / "bars"
    with mpnb.Pool(backend="dask", address=cluster.address, live=False) as pool, released(flag, flag2):
        future = pool.submit(TASKS["fit"], str(flag))
        wait_for(lambda: any(r.note == "fitting" and r.task_done == 340 and r.task_total == 1000
                             for r in pool.monitor.snapshot()), "the dask worker's report")
        flag.touch()
        assert future.result(timeout=60) == 0.3
        bars = pool.submit(TASKS["bars"], str(flag2))
        wait_for(lambda: any(r.note == "tq" and r.task_done == 250 for r in pool.monitor.snapshot()),
                 "the tqdm bar's count on the dask worker's row")
        flag2.touch()
        assert bars.result(timeout=60) == "bars done"
    out = capsys.readouterr()
    assert "after the bar" in out.out
    assert "\r" not in out.out + out.err and "it/s" not in out.out + out.err
