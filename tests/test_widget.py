"""The live status view: widget state and message rate, the static summary,
the text view, a view built from a monitor alone, Pool.cancel(), and the
widget in a real kernel.

Without a browser, ipywidgets talks to a recording comm (ipywidgets 8
creates its comms through ``comm.create_comm``) and the tests read what
each widget sent.  In a real kernel the test reads the iopub messages a
frontend would receive, and clicks Cancel by sending the button's
``comm_msg`` on the shell channel while the cell is blocked in ``map``.
"""

from __future__ import annotations

import gc
import importlib
import io
import itertools
import json
import os
import queue
import re
import threading
import time
import weakref
from concurrent.futures import CancelledError

import comm
import pytest

import mpnb
from kernel import TAG_VAR, Kernel
from mpnb import facts as facts_module, view
from mpnb.facts import Facts, FailedTask, Row
from mpnb.monitor import Monitor
from mpnb.widget import LiveWidget, Summary


def slow(x, seconds=0.05):
    time.sleep(seconds)
    return x


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def fail_on_3(x):
    time.sleep(0.1)
    if x == 3:
        raise ValueError(f"bad input {x}")
    return x


# ------------------------------------------------------------ recording comm


class RecordingComm:
    """Stands in for a kernel comm: records what each widget sends, and when."""

    log: list[tuple[float, str, dict]] = []
    _ids = itertools.count()

    def __init__(self, **kwargs):
        self.comm_id = f"comm-{next(self._ids)}"
        self.kernel = "recording"
        self.log.append((time.monotonic(), self.comm_id, {"method": "open", **kwargs.get("data", {})}))

    def open(self, *args, **kwargs):
        pass

    def on_msg(self, callback):
        self.callback = callback

    def send(self, data=None, metadata=None, buffers=None):
        self.log.append((time.monotonic(), self.comm_id, data or {}))

    def close(self, *args, **kwargs):
        pass


@pytest.fixture
def recorded(monkeypatch):
    """Widgets created in the test send to a :class:`RecordingComm`; yields the log."""
    log: list[tuple[float, str, dict]] = []
    monkeypatch.setattr(RecordingComm, "log", log)
    monkeypatch.setattr(comm, "create_comm", lambda **kwargs: RecordingComm(**kwargs))
    return log


def facts(**changes) -> Facts:
    base = dict(
        name="pool", backend="local", method="loky", alive=2, size=2, done=3, failed=1, total=8, elapsed=2.0,
        rows=(Row(101, "busy", "task 4 (argument 4)", 0.5, 2, 0, 95.0, 40 << 20),
              Row(102, "idle", "", None, 1, 1, 0.0, 38 << 20)),
        failures=(FailedTask(3, "task 3 (argument 3)", 102, "ValueError: bad input 3", "Traceback ...\n  line"),),
    )
    base.update(changes)
    return Facts(**base)


def updates(log, since=0):
    return [entry for entry in log[since:] if entry[2].get("method") == "update"]


# ------------------------------------------------------------ widget state


def test_widget_state_follows_the_facts_and_sends_nothing_unchanged(recorded):
    live = LiveWidget(facts(), on_cancel=lambda: None)
    assert "mpnb-live" in live.root.get_state()["_dom_classes"]
    assert "mpnb-cancel" in live.cancel.get_state()["_dom_classes"]
    assert "mpnb-errors" in live.errors.get_state()["_dom_classes"]
    status = live.status.get_state()["value"]
    assert 'class="mpnb-progress" data-done="4" data-total="8"' in status and "4/8 (50%)" in status
    assert '<tr class="mpnb-worker" data-pid="101" data-state="busy">' in status
    assert "task 4 (argument 4)" in status and "40.0 MiB" in status
    assert "ValueError: bad input 3" in live.errors.get_state()["value"]

    live.update(facts())
    since = len(recorded)
    live.update(facts())
    assert len(recorded) == since, "an unchanged view must send nothing"

    live.update(facts(done=4, elapsed=2.5))
    changed = [entry[1] for entry in updates(recorded, since)]
    assert sorted(changed) == sorted([live.status.comm.comm_id, live.bar.comm.comm_id])
    assert live.bar.get_state()["value"] == 5


def test_every_tick_sends_at_most_three_messages(recorded):
    live = LiveWidget(facts(done=0, failed=0, failures=()), on_cancel=lambda: None)
    since = len(recorded)
    live.update(facts(done=5, elapsed=3.0, rows=(Row(101, "dead", "killed by Cancel"),)))
    assert len(recorded) - since == 3, "status, bar and errors changed: one message each"


def test_cancel_button_disables_itself_and_calls_back(recorded):
    clicks = []
    live = LiveWidget(facts(), on_cancel=lambda: clicks.append(1))
    live.cancel.click()
    assert clicks == [1]
    state = live.cancel.get_state()
    assert state["disabled"] and state["description"] == "Cancelling…"


def test_map_refreshes_under_the_rate_limit(recorded, monkeypatch, tag):
    monkeypatch.setattr(view, "choose_mode", lambda live: None if live is False else "widget")
    closed: list[Facts] = []
    close = LiveWidget.close
    monkeypatch.setattr(LiveWidget, "close", lambda self, f: (closed.append(f), close(self, f)))
    with mpnb.Pool(2, env={TAG_VAR: tag}) as pool:
        pool.map(slow, range(60), chunksize=1)  # about 1.5 s of work
        pids = set(pool.pids)
    times = [t for t, _, data in recorded if data.get("method") == "update"]
    assert len({round(t, 1) for t in times}) >= 2, "the view must refresh while the map runs"
    for start in times:  # any one-second window
        assert sum(1 for t in times if start <= t < start + 1.0) <= 9
    rows = "".join(str(data["state"].get("value")) for _, _, data in updates(recorded))
    for pid in pids:
        assert f'data-pid="{pid}"' in rows
    [final] = closed
    assert (final.done, final.total, final.failed, final.finished) == (60, 60, 0, True)
    assert {row.pid for row in final.rows} == pids and sum(row.done for row in final.rows) == 60


def test_live_false_and_env_turn_the_view_off(recorded, monkeypatch, tag):
    monkeypatch.setattr(view, "_kernel", lambda: object())  # as in a kernel
    assert view.choose_mode(None) == "widget"
    assert view.choose_mode(False) is None
    monkeypatch.setenv("MPNB_LIVE", "0")
    assert view.choose_mode(None) is None
    monkeypatch.setenv("MPNB_LIVE", "yes")
    with pytest.raises(ValueError, match="MPNB_LIVE='yes': set it to 0"):
        view.choose_mode(None)
    with pytest.raises(ValueError, match=r"live='on': give True"):
        mpnb.Pool(1, live="on")
    monkeypatch.delenv("MPNB_LIVE")
    with mpnb.Pool(1, live=False, env={TAG_VAR: tag}) as pool:
        # 0.9 s of work: well past the delay after which a view would appear
        assert pool.map(slow, range(3), [0.3] * 3) == [0, 1, 2]
    assert recorded == [], "live=False must create no widget"


# ------------------------------------------------------------ summary and text


def test_summary_reads_without_a_kernel():
    summary = Summary(facts(done=7, failed=1, finished=True, rows=(
        Row(101, "idle", done=4, busy=1.2), Row(102, "dead", "died (signal SIGSEGV)", done=3, failed=1, busy=0.9))))
    page = summary._repr_html_()
    assert page.startswith('<div class="mpnb-summary" data-done="7" data-total="8" data-failed="1"')
    assert page.count('<tr class="mpnb-worker"') == 2 and 'data-state="dead"' in page
    assert 'class="mpnb-errors"' in page and "ValueError: bad input 3" in page
    text = repr(summary)
    assert text.splitlines()[0] == "mpnb pool (local, loky): done, 7 of 8 tasks returned, 1 failed, 2.0 s, 4.0 tasks/s"
    assert "pid 102: dead, 3 done, 1 failed, busy 0.9 s, died (signal SIGSEGV)" in text
    assert "task 3 (argument 3) failed in pid 102: ValueError: bad input 3" in text


def test_text_view_line_on_a_terminal_summary_always():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        text = view.TextView(stream)
        text.update(facts())
        text.update(facts())
        text.close(facts(finished=True))
    assert terminal.getvalue().count("\r") == 2, "one line written in place, then cleared"
    assert "mpnb pool: 4/8 (50%) | workers 2/2 (1 busy)" in terminal.getvalue()
    assert pipe.getvalue().startswith("mpnb pool (local, loky): done, 3 of 8 tasks returned"), "no status line off a terminal"


def test_script_with_live_true_prints_the_summary(capsys, tag):
    with mpnb.Pool(2, live=True, env={TAG_VAR: tag}) as pool:
        results = pool.map(fail_on_3, range(6), on_error="collect")
    assert isinstance(results[3], ValueError)
    err = capsys.readouterr().err
    assert "done, 5 of 6 tasks returned, 1 failed" in err
    assert "task 3 (argument 3) failed in pid" in err and "ValueError: bad input 3" in err


# ------------------------------------------------------------ a view of a monitor alone


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def watched_record(monitor: Monitor, cancels: list, owner=None) -> view.Watched:
    return view.Watched(
        monitor, size=2, backend="local", method="exec",
        describe=lambda call, index: f"task {index} (argument {index * 10}) of call {call}",
        traceback=lambda call, index: "Traceback (most recent call last):\n  worker frame" if index == 1 else "",
        cancel=lambda: cancels.append("cancel"), owner=owner,
    )


def test_a_view_needs_only_a_monitor_and_a_watched_record(capsys):
    # no pool and no process: this process stands in as worker 0, a made-up pid as worker 1
    monitor, cancels, me, gone = Monitor(), [], os.getpid(), 2**22 + 1
    session = view.watch(watched_record(monitor, cancels), 5, live=True)
    assert session is not None and session.name == "pool"
    now = time.monotonic()
    monitor.call_started(5, 3)
    monitor.worker_starting(0, me, lambda: (1, 2, now))  # slot: chunk 1, position 2 runs now
    monitor.worker_started(0, me, now)
    monitor.worker_starting(1, gone, lambda: (0, -1, 0.0))
    monitor.chunk_sent(0, 1, 5, [0, 1, 2], now)
    monitor.tasks_ended(0, me, 5, [0, 1], [now, now + 0.5], now + 1.0, {1: "ValueError: bad input 10"})
    monitor.tasks_ended(0, me, 9, [0], [now], now + 0.1, {0: "KeyError: another call's"})
    monitor.worker_stopped(1, gone, -9, "timeout")

    seen = session.facts()
    assert (seen.name, seen.backend, seen.method, seen.size) == ("pool", "local", "exec", 2)
    assert (seen.done, seen.failed, seen.total, seen.alive) == (1, 1, 3, 1)
    assert seen.failures == (FailedTask(1, "task 1 (argument 10) of call 5", me, "ValueError: bad input 10",
                                     "Traceback (most recent call last):\n  worker frame"),)
    busy, dead = seen.rows
    assert (busy.pid, busy.state, busy.task, busy.done, busy.failed) == (me, "busy", "task 2 (argument 20) of call 5", 1, 1)
    assert busy.busy == pytest.approx(1.0) and busy.rss is not None
    assert (dead.pid, dead.state, dead.task) == (gone, "dead", "killed: task timed out")

    wait_for(lambda: session.view is not None, "text view")
    session.cancel()
    assert cancels == ["cancel"]
    session.finish()
    summary = capsys.readouterr().err
    assert "mpnb pool (local, exec): cancelled, 1 of 3 tasks returned, 1 failed" in summary
    assert f"task 1 (argument 10) of call 5 failed in pid {me}: ValueError: bad input 10" in summary
    assert f"pid {gone}: dead, 0 done, 0 failed, killed: task timed out" in summary


class Owner:
    """Anything that runs work; the view holds it weakly."""


def test_background_view_gathers_an_owners_submits_and_ends_when_they_are_done(capsys):
    monitor, cancels, owner = Monitor(), [], Owner()
    finished: list[int] = []
    for call in (1, 2):
        monitor.call_started(call, 1)
        view.watch_background(watched_record(monitor, cancels, owner), call, True, lambda c=call: c in finished)
    session = view._background[owner]
    assert set(session._calls) == {1, 2}, "a second submit of the same owner joins the running view"
    wait_for(lambda: session.view is not None, "text view")
    now = time.monotonic()
    monitor.tasks_ended(0, 101, 1, [0], [now], now + 0.2, {})
    finished.append(1)
    monitor.tasks_ended(0, 101, 2, [0], [now], now + 0.2, {0: "ZeroDivisionError: division by zero"})
    finished.append(2)
    wait_for(lambda: owner not in view._background, "end of the background view")
    session._thread.join(60)
    summary = capsys.readouterr().err
    assert "mpnb pool (local, exec): done, 1 of 2 tasks returned, 1 failed" in summary
    assert "task 0 (argument 0) of call 2 failed in pid 101: ZeroDivisionError" in summary
    assert all(c.owner is None for c in session._calls.values()), "the session must not hold its owner"
    watcher = view.watch_background(watched_record(monitor, cancels, owner), 3, False, lambda: True)
    assert watcher is None and owner not in view._background, "live=False shows nothing"
    held = weakref.ref(owner)
    del owner
    gc.collect()
    assert held() is None, "nothing in the view keeps the owner alive"


def test_sizes_read_in_one_unit_style():
    size = facts_module.byte_size
    assert [size(None), size(0), size(1023), size(1024), size(40 << 20), size(23.5 * 2**30)] == [
        "-", "0 B", "1023 B", "1.0 KiB", "40.0 MiB", "23.5 GiB"]
    assert re.fullmatch(r"\d+\.\d [KMGT]iB in the machine, \d+\.\d [KMGT]iB available.*",
                        importlib.import_module("mpnb.doctor")._memory().found)
    assert facts_module.seconds(2) == "2.0 s" and facts_module.seconds(125) == "2:05 min"


# ------------------------------------------------------------ Pool.cancel


def test_cancel_from_another_thread_interrupts_map_and_keeps_results(tag):
    with mpnb.Pool(2, live=False, env={TAG_VAR: tag}) as pool:
        def cancel_after_some_results():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(s.done >= 2 for s in pool.monitor.calls()):
                    pool.cancel()
                    return
                time.sleep(0.05)

        threading.Thread(target=cancel_after_some_results).start()
        with pytest.raises(KeyboardInterrupt) as raised:
            pool.map(slow, [(i) for i in range(200)], chunksize=1)
        assert "results finished and are kept in pool.last_results" in "".join(raised.value.__notes__)
        kept = {i: r for i, r in enumerate(pool.last_results) if not isinstance(r, BaseException)}
        assert len(kept) >= 2 and all(i == r for i, r in kept.items())
        assert isinstance(pool.last_results[-1], CancelledError)
        assert pool.map(slow, [1, 2]) == [1, 2], "the pool serves after a cancel"


def test_cancel_reaches_an_imap_whose_consumer_is_slower_than_the_workers(tag):
    with mpnb.Pool(2, live=False, env={TAG_VAR: tag}) as pool:
        got = []
        with pytest.raises(KeyboardInterrupt):
            for value in pool.imap(slow, range(200)):  # results are always ready: the consumer lags
                got.append(value)
                if len(got) == 5:
                    threading.Thread(target=pool.cancel).start()
                time.sleep(0.05)
        assert 5 <= len(got) < 100, got
        assert pool.map(slow, [1, 2]) == [1, 2], "the pool serves after a cancel"


def test_cancel_stops_background_futures_and_their_workers(tag):
    with mpnb.Pool(2, live=False, env={TAG_VAR: tag}) as pool:
        futures = [pool.submit(sleep_for, 60) for _ in range(3)]
        deadline = time.monotonic() + 60
        while sum(row.state == "busy" for row in pool.monitor.snapshot()) < 2:
            assert time.monotonic() < deadline, pool.monitor.snapshot()
            time.sleep(0.05)
        busy = set(pool.pids)
        pool.cancel()
        # the waiting one is cancelled; the running ones end with a CancelledError
        assert futures[2].cancelled()
        for future in futures:
            with pytest.raises(CancelledError):
                future.result(timeout=30)
        while busy & set(pool.pids) or len(pool.pids) < 2:  # killed and replaced
            assert time.monotonic() < deadline, (busy, pool.pids)
            time.sleep(0.05)
        assert pool.submit(sleep_for, 0).result(timeout=60) == 0


# ------------------------------------------------------------ a real kernel

SETUP = """
import time, mpnb
pool = mpnb.Pool(2)
def slow(x):
    time.sleep(0.1)
    return x
pool.map(slow, range(2))
"""


class Frontend:
    """Reads what a frontend would: widget comms and displays of one cell."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.opened: dict[str, dict] = {}  # comm id -> initial state
        self.values: dict[str, list[str]] = {}  # comm id -> "value"s sent
        self.displays: list[dict] = []

    def read(self, msg_id: str, until=lambda frontend: False, timeout: float = 60) -> dict | None:
        """Read iopub messages of ``msg_id`` until ``until(self)`` or the cell
        ends; returns the cell's error, if it raised."""
        deadline = time.monotonic() + timeout
        error = None
        while time.monotonic() < deadline:
            if until(self):
                return None
            try:
                msg = self.kernel.kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "comm_open":
                self.opened[content["comm_id"]] = content["data"]["state"]
            elif kind == "comm_msg" and content["data"].get("method") == "update":
                value = content["data"]["state"].get("value")
                if isinstance(value, str):
                    self.values.setdefault(content["comm_id"], []).append(value)
            elif kind in ("display_data", "update_display_data"):
                self.displays.append(content)
            elif kind == "error":
                error = content
            elif kind == "status" and content["execution_state"] == "idle":
                return error
        raise AssertionError(f"nothing conclusive within {timeout} s: {self.displays}")

    def comm_with_class(self, css: str) -> str:
        return next(i for i, state in self.opened.items() if css in state.get("_dom_classes", ()))

    def all_values(self) -> str:
        return "".join(v for values in self.values.values() for v in values) + "".join(
            s.get("value", "") for s in self.opened.values() if isinstance(s.get("value"), str))


def test_widget_in_a_real_kernel_shows_pids_and_leaves_a_summary(kernel):
    kernel.run(SETUP).ok()
    frontend = Frontend(kernel)
    msg_id = kernel.submit("r = pool.map(slow, range(16), chunksize=1)\nprint(pool.pids)")
    assert frontend.read(msg_id) is None
    stdout = kernel.run("print(sorted(pool.pids))").ok().stdout
    pids = json.loads(stdout)
    root = frontend.comm_with_class("mpnb-live")
    assert root and frontend.comm_with_class("mpnb-cancel")
    for pid in pids:
        assert f'<tr class="mpnb-worker" data-pid="{pid}"' in frontend.all_values()
    [shown] = [d for d in frontend.displays if "application/vnd.jupyter.widget-view+json" in d["data"]]
    display_id = shown["transient"]["display_id"]
    [final] = [d for d in frontend.displays if d.get("transient", {}).get("display_id") == display_id
               and "text/html" in d["data"]]
    page = final["data"]["text/html"]
    assert 'class="mpnb-summary" data-done="16" data-total="16" data-failed="0"' in page
    for pid in pids:
        assert f'data-pid="{pid}"' in page
    assert "done, 16 of 16 tasks returned, 0 failed" in final["data"]["text/plain"]


def test_comm_pump_finds_the_kernels_shell_stream(kernel):
    # Cancel clicks during a blocking call rely on ipykernel's private shell
    # stream; this fails loudly when a new ipykernel moves it
    reply = kernel.run(
        "from mpnb.comms import CommPump, main_shell_stream\n"
        "k = get_ipython().kernel\n"
        "stream = main_shell_stream(k)\n"
        "print(stream is not None, hasattr(stream, '_recv_callback'), CommPump.create(k, {}) is not None)\n"
    ).ok()
    assert reply.stdout == "True True True\n", reply.stdout


def test_cancel_click_stops_a_blocking_map_in_a_real_kernel(kernel):
    kernel.run(SETUP).ok()
    frontend = Frontend(kernel)
    msg_id = kernel.submit("pool.map(slow, range(400), chunksize=1)")
    frontend.read(msg_id, until=lambda f: any("mpnb-cancel" in s.get("_dom_classes", ()) for s in f.opened.values())
                  and any('data-state="busy"' in v for vs in f.values.values() for v in vs))
    button = frontend.comm_with_class("mpnb-cancel")
    click = kernel.kc.session.msg("comm_msg", {"comm_id": button,
                                              "data": {"method": "custom", "content": {"event": "click"}}})
    kernel.kc.shell_channel.send(click)
    error = frontend.read(msg_id)
    assert error is not None and error.get("ename") == "KeyboardInterrupt", error
    assert any("kept in pool.last_results" in line for line in error["traceback"])
    after = kernel.run(
        # the tasks that ended hold their own results; with two workers they
        # need not be a prefix (one worker may be a task ahead of the other)
        "done = {i: r for i, r in enumerate(pool.last_results) if not isinstance(r, BaseException)}\n"
        "print(0 < len(done) < 400, all(r == i for i, r in done.items()))\n"
        "print(pool.map(abs, [-1, -2]))\n"
    ).ok()
    assert after.stdout.splitlines() == ["True True", "[1, 2]"]
    summaries = [d["data"]["text/html"] for d in frontend.displays if "text/html" in d["data"]]
    assert summaries and "cancelled" in summaries[-1]


def test_mppool_no_live_and_background_futures_in_a_real_kernel(kernel):
    kernel.run("%load_ext mpnb").ok()
    frontend = Frontend(kernel)
    quiet = kernel.submit("%%mppool -n 2 --no-live\nimport time\ndef nap(x):\n    time.sleep(0.3)\n    return x\n"
                          "pool.map(nap, range(8))")
    assert frontend.read(quiet) is None
    assert frontend.opened == {} and frontend.displays == [], "--no-live must show no widget"

    background = kernel.submit("%%mppool -n 2\nfutures = [pool.submit(nap, i) for i in range(6)]")
    assert frontend.read(background) is None  # the cell ends at once; the work goes on
    deadline = time.monotonic() + 60
    summary = None
    while summary is None:  # the view appears after the cell ended, then its summary replaces it
        assert time.monotonic() < deadline, frontend.displays
        try:
            msg = kernel.kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["msg_type"] == "comm_open":
            frontend.opened[msg["content"]["comm_id"]] = msg["content"]["data"]["state"]
        elif msg["msg_type"] == "update_display_data":
            summary = msg["content"]["data"]
    assert frontend.comm_with_class("mpnb-live") and frontend.comm_with_class("mpnb-cancel")
    assert 'class="mpnb-summary" data-done="6" data-total="6" data-failed="0"' in summary["text/html"]
    assert kernel.run("print([f.result() for f in futures])").ok().stdout == "[0, 1, 2, 3, 4, 5]\n"


def _refreshers() -> int:
    return sum(thread.name == "mpnb-live" for thread in threading.enumerate())


def test_a_polled_view_starts_its_refresher_only_once_the_call_lasts(capsys):
    # map's caller polls its view while it waits: a call quicker than DELAY
    # costs no thread and shows nothing; a longer one gets its view and summary
    monitor, cancels = Monitor(), []
    before = _refreshers()
    quick = view.watch(watched_record(monitor, cancels), 5, live=True, polled=True)
    assert quick is not None
    monitor.call_started(5, 1)
    quick.poll()
    assert _refreshers() == before
    quick.finish()
    assert capsys.readouterr().err == ""

    slow = view.watch(watched_record(monitor, cancels), 6, live=True, polled=True)
    monitor.call_started(6, 2)
    time.sleep(view.DELAY)
    slow.poll()
    assert _refreshers() == before + 1
    wait_for(lambda: slow.view is not None, "text view")
    slow.finish()
    assert _refreshers() == before
    assert "mpnb pool (local, exec): done, 0 of 2 tasks returned" in capsys.readouterr().err
