"""pool.timeline(): one bar per task, in its worker's lane, failures marked."""

from __future__ import annotations

import re
import time

import pytest

import mpnb
from kernel import TAG_VAR
from mpnb.timeline import Task, Timeline


def nap_or_fail(x):
    time.sleep(0.02 * (x % 3))
    if x == 3:
        raise ZeroDivisionError("division by zero")
    return x


def test_timeline_of_the_last_map(tag):
    with mpnb.Pool(2, live=False, env={TAG_VAR: tag}) as pool:
        with pytest.raises(ValueError, match=r"has not run a map or imap yet; run one first"):
            pool.timeline()
        pool.map(nap_or_fail, range(8), chunksize=1, on_error="collect")
        workers = {row.worker: row.pid for row in pool.monitor.snapshot()}
        timeline = pool.timeline()
        with pytest.raises(ValueError, match=r"timeline\(call=99\): the pool has no record of that call"):
            pool.timeline(call=99)
    svg = timeline._repr_svg_()
    assert svg.startswith('<svg class="mpnb-timeline"') and svg.endswith("</svg>")
    rects = re.findall(r'<rect class="([^"]+)" data-worker="(\d+)" data-index="(\d+)"', svg)
    assert sorted(int(index) for _, _, index in rects) == list(range(8)), "one bar per task"
    assert [int(i) for c, _, i in rects if "mpnb-failed" in c] == [3]
    assert {int(w) for _, w, _ in rects} <= set(workers)
    assert f"worker 0 · {workers[0]}" in svg and "ZeroDivisionError: division by zero" in svg
    assert timeline._repr_html_().count("<svg") == 1
    assert re.fullmatch(r"<Timeline of call \d+: 8 tasks on 2 workers over [\d.]+ s; 1 failed \(task 3\); "
                        r"busiest pid \d+ [\d.]+ s, least pid \d+ [\d.]+ s>", repr(timeline))


def test_bars_sit_on_a_seconds_axis():
    timeline = Timeline(0, [Task(0, 10, 0, 0.0, 1.0), Task(1, 11, 1, 0.5, 2.3),
                            Task(0, 10, 2, 1.0, 1.2, "CancelledError: task 2 was cancelled")])
    svg = timeline._repr_svg_()
    ticks = re.findall(r'text-anchor="middle">([^<]+)<', svg)
    assert ticks == ["0.0", "0.5", "1.0", "1.5", "2.0", "2.5 s"]
    widths = {int(i): float(w) for i, w in re.findall(r'data-index="(\d)" x="[\d.]+" y="\d+" width="([\d.]+)"', svg)}
    assert widths[1] == pytest.approx(1.8 * widths[0], rel=0.01), "bar length is proportional to run time"
    assert 'class="mpnb-task mpnb-cancelled"' in svg and "mpnb-failed" not in svg
    assert repr(timeline).startswith("<Timeline of call 0: 3 tasks on 2 workers over 2.30 s;")
    assert "no task of this call ran" in Timeline(5, [])._repr_svg_()


def test_the_event_log_keeps_the_last_events_of_the_history_only():
    """One-task records (chunksize 1), then a record of a whole large chunk:
    the log drops old entries a few at a time, but ``events`` returns the
    last ``EVENT_HISTORY`` events, the newest last, and counts every one."""
    from mpnb.monitor import EVENT_HISTORY, Monitor, TaskFinished, TaskStarted

    monitor = Monitor()
    monitor.worker_starting(0, 1, lambda: (-1, -1, 0.0))
    for index in range(EVENT_HISTORY):  # 2 events each
        monitor.tasks_ended(0, 1, 7, [index], [float(index)], index + 0.5, {})
    big = range(EVENT_HISTORY, EVENT_HISTORY + 3000)
    monitor.runs_ended(0, 1, [(7, big, {0: 1e5}, 2e5, {}, None)])
    events, cursor = monitor.events()
    assert cursor == 2 * EVENT_HISTORY + 6000  # every event is counted
    assert len(events) == EVENT_HISTORY
    assert isinstance(events[-1], TaskFinished) and events[-1].index == big[-1]
    assert isinstance(events[0], TaskStarted) and events[0].index == EVENT_HISTORY + 3000 - EVENT_HISTORY // 2
    assert monitor.events(cursor)[0] == []
