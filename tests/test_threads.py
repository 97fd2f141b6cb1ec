"""The thread engine, ``mpnb.Pool(backend="threads")``: what the parity table
(tests/test_parity.py) does not ask of every engine.

In a real kernel: a cell's functions run with no ``%%mppool``, what tasks
print lands in the cell in task order, Ctrl-C cancels the tasks not started,
and after shutdown no thread of the pool is left (and no process was ever
started: the ``tag`` fixture).  Here: timeouts fail the task while its thread
runs on, the worker rows, the options a thread pool refuses, and the GIL
line of ``%mpdoctor``.

No assertion depends on speed: every wait is for a condition, with a
generous deadline.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest

import mpnb
import mpnb._protocol
from mpnb import view
from mpnb.backends.threads import default_size, gil_enabled
from mpnb.doctor import doctor, gil_check
from mpnb.pool import TaskTimeoutError

from kernel import wait_until

DEADLINE = 60.0

CELL = """
import threading, time, sys
import mpnb

pool = mpnb.Pool(2, backend="threads")
LATE = {0: 0.5}   # a notebook global: the task reads it, nothing is pickled

def shout(x):
    time.sleep(LATE.get(x, 0))   # task 0 ends after task 1
    print(f"out {x}")
    print(f"err {x}", file=sys.stderr)
    return x
"""

INTERRUPTED = """
release = threading.Event()
ran = []

def hold(x):
    ran.append(x)
    open(os.path.join(STARTED, str(x)), "w").close()
    release.wait(60)
    return x

pool.map(hold, range(10), chunksize=1)
"""

AFTER = """
release.set()
print(pool.map(abs, [-1, -2]))
pool.shutdown(wait=True)
# the threads that ran tasks have returned once shutdown returns; the engine's own ends just after
print([t.name for t in threading.enumerate() if t.name.startswith("mpnb-threads-task")])
deadline = time.monotonic() + 60
while any(t.name.startswith("mpnb-threads") for t in threading.enumerate()) and time.monotonic() < deadline:
    time.sleep(0.05)
print(sorted(ran))
print([t.name for t in threading.enumerate() if t.name.startswith("mpnb-threads")])
"""


@pytest.mark.kernel
def test_in_a_kernel_output_interrupt_and_no_thread_left(kernel, tmp_path):
    kernel.run(CELL + f"import os\nSTARTED = {str(tmp_path)!r}\n").ok()
    reply = kernel.run("print(pool.map(shout, range(4), chunksize=1))").ok()
    assert reply.stdout.splitlines() == ["out 0", "out 1", "out 2", "out 3", "[0, 1, 2, 3]"], reply.stdout
    assert reply.stderr.splitlines() == ["err 0", "err 1", "err 2", "err 3"], reply.stderr

    msg_id = kernel.submit(INTERRUPTED)
    # both threads hold a task: the other eight are pending
    wait_until(lambda: len(list(tmp_path.iterdir())) >= 2, "two tasks start")
    kernel.interrupt()
    reply = kernel.collect(msg_id, timeout=DEADLINE)
    assert reply.status == "error" and reply.ename == "KeyboardInterrupt", reply

    after = kernel.run(AFTER).ok()
    # the pending tasks never ran, and no thread of the pool is left
    assert after.stdout.splitlines() == ["[1, 2]", "[]", "[0, 1]", "[]"], after.stdout
    assert kernel.descendants() == [], "a thread pool starts no process"


def test_timeout_fails_the_task_while_its_thread_runs_on():
    release = threading.Event()
    started = threading.Event()

    def hold(x):
        started.set()
        release.wait(DEADLINE)
        print("late")  # after the timeout: dropped with the result
        return x

    pool = mpnb.Pool(2, backend="threads", live=False)
    try:
        results = pool.map(hold, [1], timeout=0.2, on_error="collect")
        [error] = results
        assert isinstance(error, TaskTimeoutError)
        assert "a thread cannot be stopped, so it goes on until the task returns" in str(error)
        assert started.is_set()
        runners = [t for t in threading.enumerate() if t.name.startswith("mpnb-threads-task")]
        assert runners, "the timed-out task's thread runs on"
        assert pool.map(abs, [-3]) == [3]  # the pool serves on
        release.set()
        wait_until(lambda: not any(t.is_alive() for t in runners), "the timed-out task's thread ends")
    finally:
        release.set()
        pool.shutdown(wait=True)


def test_worker_rows_are_the_threads_and_end_at_shutdown():
    release = threading.Event()
    pool = mpnb.Pool(3, backend="threads", live=False)
    try:
        assert pool.workers == 3 and pool.pids == []
        futures = [pool.submit(release.wait, DEADLINE) for _ in range(3)]
        wait_until(lambda: [row.state for row in pool.monitor.snapshot()] == ["busy"] * 3, "three busy rows")
        assert [row.worker for row in pool.monitor.snapshot()] == [0, 1, 2]
        release.set()
        assert [f.result(timeout=DEADLINE) for f in futures] == [True] * 3
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert pool.monitor.snapshot() == []
    # the threads that ran tasks have returned once shutdown returns; the engine's own ends just after
    assert not [t for t in threading.enumerate() if t.name.startswith("mpnb-threads-task")]
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("mpnb-threads")],
          "no thread of the pool after shutdown")


def test_default_size_and_refused_options():
    pool = mpnb.Pool(backend="threads", live=False)
    try:
        cpus, cap = mpnb.limits.cpu_count(), mpnb.limits.max_workers()
        assert pool.workers == default_size() == min(cpus + 4, 32, cap)
        assert "backend='threads'" in repr(pool) and "running" in repr(pool)
    finally:
        pool.shutdown(wait=True)
    for given, words in [({"env": {"A": "1"}}, "env="), ({"context": "spawn"}, "context='spawn'"),
                         ({"max_tasks_per_child": 3}, "max_tasks_per_child=3"),
                         ({"address": "tcp://127.0.0.1:8786"}, "pass backend='dask'")]:
        with pytest.raises(ValueError, match="Leave it out|pass backend='dask'") as info:
            mpnb.Pool(backend="threads", **given)
        assert words in str(info.value)


def test_doctor_says_whether_threads_run_python_in_parallel():
    line = doctor()["gil"]
    assert gil_enabled() == (not hasattr(sys, "_is_gil_enabled") or sys._is_gil_enabled())
    assert line.found.startswith("enabled" if gil_enabled() else "disabled")
    free = gil_check(False, True)
    assert "mpnb.Pool(backend='threads') for CPU-bound tasks" in free.advice
    held = gil_check(True, False)
    assert "use processes (mpnb.Pool) for CPU-bound" in held.advice


def test_the_live_view_counts_each_threads_tasks():
    """The rows share the process's pid: each counts its own thread's tasks.
    The view is made as the pool makes it for a blocking call, and its facts
    are read once the call's tasks have ended."""
    pool = mpnb.Pool(2, backend="threads", live=False)
    try:
        call = pool._new_call(abs, None, mpnb._protocol.Mode.ARG)
        call.total = 4
        watched = view.Watched(pool.monitor, 2, "threads", "", lambda c, i: f"task {i}", lambda c, i: "",
                               lambda: None)
        session = view.Session(watched, call.id, "text")
        pool._engine.submit([chunk for _, chunk in pool._chunks(call, range(-4, 0), 1)])
        wait_until(lambda: len(call.results) == 4, "the four tasks end")
        facts = session.facts()
        session.finish()
    finally:
        pool.shutdown(wait=True)
    assert len(facts.rows) == 2
    assert sum(row.done for row in facts.rows) == 4, facts.rows


def test_output_is_shown_in_task_order_whatever_writes_it(capsys):
    """Task 0 writes after task 1 has ended; the cell still reads task 0's
    lines first, ``writelines`` included."""
    one_done = threading.Event()

    def write(x):
        if x == 0:
            one_done.wait(DEADLINE)
        sys.stdout.writelines([f"a{x}\n", f"b{x}\n"])
        print(f"c{x}", file=sys.stderr)
        if x == 1:
            one_done.set()
        return x

    pool = mpnb.Pool(2, backend="threads", live=False)
    try:
        capsys.readouterr()
        assert pool.map(write, [0, 1], chunksize=1) == [0, 1]
    finally:
        pool.shutdown(wait=True)
    out, err = capsys.readouterr()
    assert out.splitlines() == ["a0", "b0", "a1", "b1"] and err.splitlines() == ["c0", "c1"]


def test_a_task_that_exits_fails_alone():
    """``sys.exit()`` in a task ends that task, as in ``ThreadPoolExecutor``,
    not the thread that serves the pool."""
    pool = mpnb.Pool(1, backend="threads", live=False)
    try:
        error = pool.submit(sys.exit, 3).exception(timeout=DEADLINE)
        assert isinstance(error, SystemExit) and error.code == 3
        assert pool.map(abs, [-1, -2]) == [1, 2]  # the same slot serves on
    finally:
        pool.shutdown(wait=True)
