"""mpnb.Pool with real worker processes, under each start method.

Every pool here carries the test's tag in its workers' environment, so the
``tag`` fixture fails the test if any worker outlives it.  Functions live in
this module (imported by reference in the workers) or are lambdas and
closures (shipped by value); the notebook ``__main__`` case runs in a real
kernel (test_pool_kernel.py).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import signal
import threading
import time
import warnings
from concurrent.futures import Executor

import psutil
import pytest

import mpnb
from kernel import TAG_VAR
from mpnb.events import TaskFailed, TaskFinished, TaskStarted, WorkerStarted
from mpnb.pool import RemoteTraceback, TaskTimeoutError, WorkerCrashedError


# ------------------------------------------------------------ task functions


def square(x):
    return x * x


def add(a, b):
    return a + b


def slow_square(x, seconds=0.05):
    time.sleep(seconds)
    return x * x


def touch(path):
    open(path, "w").close()
    return path


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def fail_on(x, bad=2):
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x


def chatty(x):
    print(f"out {x}")
    print(f"err {x}", file=os.sys.stderr)
    logging.getLogger("chatty").warning("log %s", x)
    warnings.warn(f"warn {x}", UserWarning, stacklevel=1)
    return x


def worker_env(_=None):
    return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MPNB_DEPTH")}


def nested_map(x):
    inner = mpnb.Pool(4)
    pids = inner.map(lambda _: os.getpid(), range(3))
    inner.shutdown()
    # the worker's guardian is its one child of its own
    started = [c for c in psutil.Process().children() if c.name() != mpnb._worker.GUARDIAN_NAME]
    return os.getpid(), pids, len(started)


def pid_then_sleep(x):
    if x == 2:
        time.sleep(60)
    return x


# faults: what the task does, the exception expected, words in its message
def segfault(x):
    import ctypes

    return ctypes.string_at(0) if x == 2 else x


def hard_exit(x):
    return os._exit(3) if x == 2 else x


def memory_error(x):
    return bytearray(1 << 62) if x == 2 else x


def endless(x):
    while x == 2:
        pass
    return x


class Scaler:
    def __init__(self, k):
        self.k = k

    def scale(self, x):
        return self.k * x


# ---------------------------------------------------------------- the base

CONTEXTS = ["exec", "loky", "spawn"]


@pytest.fixture(params=CONTEXTS)
def pool(request, tag):
    """A 2-worker pool; afterwards it must still serve and leave nothing."""
    p = mpnb.Pool(2, context=request.param, env={TAG_VAR: tag})
    try:
        yield p
        assert p.map(square, [3]) == [9], "the pool must still serve after the test"
    finally:
        p.shutdown()


def _wait_ready(pool, n=2, within=30.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if sum(row.state != "starting" for row in pool.monitor.snapshot()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"workers not ready: {pool.monitor.snapshot()}")


class TestPool:
    def test_map_returns_a_list_in_input_order(self, pool):
        assert isinstance(pool, Executor)
        assert pool.map(slow_square, range(20)) == [x * x for x in range(20)]
        assert pool.map(square, range(50), chunksize=7) == [x * x for x in range(50)]
        assert pool.map(add, [1, 2], [10, 20]) == [11, 22]
        assert pool.map(square, []) == []

    def test_multiprocessing_style_methods(self, pool):
        assert list(pool.imap(square, iter(range(10)))) == [x * x for x in range(10)]
        assert sorted(pool.imap_unordered(square, range(10), chunksize=3)) == sorted(x * x for x in range(10))
        assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert pool.apply(slow_square, (4,), {"seconds": 0.01}) == 16
        assert pool.submit(add, 2, b=5).result(timeout=30) == 7

    def test_lambdas_closures_partials_and_bound_methods(self, pool):
        k = 10
        assert pool.map(lambda x: x + k, [1, 2]) == [11, 12]
        assert pool.map(functools.partial(add, 100), [1, 2]) == [101, 102]
        assert pool.map(Scaler(3).scale, [1, 2]) == [3, 6]

        class Local:  # defined here: shipped by value
            def __init__(self, v):
                self.v = v

        out = pool.map(lambda v: Local(v * 2), [1, 2])
        assert [o.v for o in out] == [2, 4] and all(type(o) is Local for o in out)

    def test_reuse_starts_no_new_process(self, pool):
        pool.map(square, range(4))
        before = sorted(pool.pids)
        for _ in range(3):
            pool.map(square, range(10))
        assert sorted(pool.pids) == before

    def test_exception_carries_remote_traceback_index_and_argument(self, pool):
        with pytest.raises(ValueError, match="bad input 2") as info:
            pool.map(fail_on, range(5), chunksize=1)
        exc = info.value
        assert isinstance(exc.__cause__, RemoteTraceback)
        assert 'raise ValueError(f"bad input {x}")' in str(exc.__cause__)
        assert "in fail_on" in str(exc.__cause__)
        assert any("task 2 (argument 2)" in note for note in exc.__notes__)
        done = [r for r in pool.last_results if not isinstance(r, BaseException)]
        assert set(done) <= {0, 1, 3, 4} and isinstance(pool.last_results[2], ValueError)

    def test_collect_returns_exceptions_in_place(self, pool, tag):
        results = pool.map(fail_on, range(5), on_error="collect")
        assert results[:2] == [0, 1] and results[3:] == [3, 4]
        assert isinstance(results[2], ValueError)
        collecting = mpnb.Pool(1, on_error="collect", env={TAG_VAR: tag})
        try:
            assert isinstance(collecting.map(fail_on, [2])[0], ValueError)
        finally:
            collecting.shutdown()

    def test_output_is_replayed_in_task_order(self, pool, capsys):
        pool.map(chatty, range(6), chunksize=1)
        out, err = capsys.readouterr()
        assert out.splitlines() == [f"out {i}" for i in range(6)]
        for i in range(6):
            assert f"err {i}" in err and f"log {i}" in err
        assert err.index("err 0") < err.index("err 5")
        assert "warn 0" in err

    def test_submit_output_shows_with_the_result(self, pool, capsys):
        future = pool.submit(chatty, 7)
        assert future.result(timeout=30) == 7
        assert "out 7" in capsys.readouterr().out

    def test_workers_cap_native_threads(self, pool):
        env = pool.apply(worker_env)
        expected = str(max(1, mpnb.limits.cpu_count() // 2))
        assert env["OMP_NUM_THREADS"] == expected and env["OPENBLAS_NUM_THREADS"] == expected
        assert env["MPNB_DEPTH"] == "1"

    def test_pool_inside_a_worker_runs_inline(self, pool):
        worker_pid, inner_pids, children = pool.apply(nested_map, (0,))
        assert inner_pids == [worker_pid] * 3
        assert children == 0

    def test_timeout_fails_only_that_task_and_replaces_the_worker(self, pool):
        _wait_ready(pool)
        # the 600 s task ends by its timeout, or the test's own timeout fails it
        results = pool.map(sleep_for, [0.05, 600, 0.05, 0.05], timeout=1.0, chunksize=1, on_error="collect")
        assert results[0] == 0.05 and results[2:] == [0.05, 0.05]
        assert isinstance(results[1], TaskTimeoutError) and isinstance(results[1], TimeoutError)
        assert "task 1 (argument 600)" in str(results[1]) and "timeout of 1 s" in str(results[1])

    def test_timeout_inside_a_chunk_names_the_right_task(self, pool):
        results = pool.map(endless, range(6), timeout=1.0, chunksize=6, on_error="collect")
        assert [r for i, r in enumerate(results) if i != 2] == [0, 1, 3, 4, 5]
        assert isinstance(results[2], TaskTimeoutError) and "task 2 (argument 2)" in str(results[2])

    @pytest.mark.parametrize(
        "fn, error, words",
        [
            (segfault, WorkerCrashedError, ["SIGSEGV", "segmentation fault"]),
            (hard_exit, WorkerCrashedError, ["exit code 3", "os._exit"]),
            (memory_error, MemoryError, []),
        ],
        ids=["segfault", "os._exit", "MemoryError"],
    )
    def test_fault_fails_its_task_alone(self, pool, fn, error, words):
        results = pool.map(fn, range(6), chunksize=2, on_error="collect")
        assert [r for i, r in enumerate(results) if i != 2] == [0, 1, 3, 4, 5]
        assert isinstance(results[2], error), results[2]
        text = str(results[2]) + " ".join(getattr(results[2], "__notes__", []))
        assert "task 2 (argument 2)" in text
        for word in words:
            assert word in text
        with pytest.raises(error):
            pool.map(fn, range(4), chunksize=1)

    def test_sigkill_from_outside_fails_the_running_task(self, pool):
        _wait_ready(pool)
        future = pool.submit(pid_then_sleep, 2)
        deadline = time.monotonic() + 30
        victim = None
        while victim is None and time.monotonic() < deadline:
            busy = [row for row in pool.monitor.snapshot() if row.state == "busy"]
            victim = busy[0].pid if busy else None
            time.sleep(0.05)
        assert victim is not None
        others = pool.map(square, range(4))
        # a done-callback runs as the future fails: the dead worker is already unlisted
        listed, called = [], threading.Event()
        future.add_done_callback(lambda f: (listed.append(victim in pool.pids), called.set()))
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match="SIGKILL") as info:
            future.result(timeout=10)
        assert "memory" in str(info.value)
        assert others == [0, 1, 4, 9]
        assert called.wait(10) and listed == [False] and victim not in pool.pids

    def test_events_reach_the_monitor(self, pool):
        # both workers up first: else the first one ready may run both chunks and the
        # map end before the second has started
        _wait_ready(pool)
        pool.map(fail_on, range(4), chunksize=2, on_error="collect")
        events, cursor = pool.monitor.events()
        assert cursor >= len(events) > 0
        started = {e.pid for e in events if isinstance(e, WorkerStarted)}
        assert len(started) == 2
        finished = sorted(e.index for e in events if isinstance(e, TaskFinished))
        assert finished == [0, 1, 3]
        failed = [e for e in events if isinstance(e, TaskFailed)]
        assert [e.index for e in failed] == [2] and "bad input 2" in failed[0].error
        assert sorted(e.index for e in events if isinstance(e, TaskStarted)) == [0, 1, 2, 3]
        for e in events:
            assert pickle.loads(pickle.dumps(e)) == e
        later, _ = pool.monitor.events(cursor)
        assert later == []
        call = pool.monitor.calls()[-1]
        assert (call.total, call.done, call.failed) == (4, 3, 1)

    def test_snapshot_shows_the_running_task(self, pool):
        _wait_ready(pool)
        future = pool.submit(slow_square, 5, seconds=2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            busy = [row for row in pool.monitor.snapshot() if row.state == "busy"]
            if busy and busy[0].elapsed > 0.2:
                break
            time.sleep(0.05)
        assert busy and busy[0].index == 0 and busy[0].call is not None
        rows = pool.monitor.sample()
        assert all(row.rss and row.rss > 0 for row in rows)
        assert future.result(timeout=30) == 25


# ------------------------------------------------------------ no processes


def test_pool_in_with_block_leaves_no_worker(tag):
    with mpnb.Pool(2, env={TAG_VAR: tag}) as p:
        assert p.map(square, range(4)) == [0, 1, 4, 9]
        pids = p.pids
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    with pytest.raises(RuntimeError, match="shut down"):
        p.map(square, [1])


def test_dropped_pool_stops_its_workers(tag):
    p = mpnb.Pool(2, env={TAG_VAR: tag})
    p.map(square, range(2))
    del p  # the tag fixture then checks that no worker is left


def test_worker_limit_names_its_override(monkeypatch):
    monkeypatch.setenv("MPNB_MAX_WORKERS", "2")
    with pytest.raises(ValueError, match="MPNB_MAX_WORKERS"):
        mpnb.Pool(3)
    monkeypatch.setenv("MPNB_THREADS_PER_WORKER", "3")
    assert mpnb.limits.thread_env(2)["OMP_NUM_THREADS"] == "3"


def test_bad_arguments_read_as_sentences():
    with pytest.raises(ValueError, match="on_error='ignore'"):
        mpnb.Pool(1, on_error="ignore")
    with pytest.raises(ValueError, match="timeout"):
        mpnb.Pool(1, timeout=-1)


def test_default_size_is_the_cgroup_aware_cpu_count():
    from loky import cpu_count

    assert mpnb.limits.resolve_workers(None) == min(cpu_count(), mpnb.limits.max_workers())


def test_import_mpnb_starts_nothing():
    import subprocess
    import sys

    code = (
        "import sys, threading, mpnb; "
        "assert 'IPython' not in sys.modules and 'mpnb.pool' not in sys.modules; "
        "assert threading.active_count() == 1; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_killed_parent_leaves_no_worker(tag, tmp_path):
    """SIGKILL of the process that owns the pool, while tasks run."""
    import subprocess
    import sys

    script = tmp_path / "owner.py"
    script.write_text(
        "import time, mpnb\n"
        "def forever(x):\n"
        "    while True: pass\n"
        "if __name__ == '__main__':\n"
        "    p = mpnb.Pool(2)\n"
        "    p.submit(forever, 1); p.submit(forever, 2)\n"
        "    print('running', flush=True)\n"
        "    time.sleep(600)\n"
    )
    env = dict(os.environ, **{TAG_VAR: tag})
    owner = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "running"
        deadline = time.monotonic() + 30
        while len(psutil.Process(owner.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = psutil.Process(owner.pid).children(recursive=True)
        assert len(workers) >= 2
        owner.kill()
        owner.wait()
        gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"processes outlived their parent: {alive}"
    finally:
        owner.kill()


def test_a_future_cancelled_before_it_starts_never_runs(tag, tmp_path):
    marker = tmp_path / "ran"
    with mpnb.Pool(1, live=False, env={TAG_VAR: tag}) as pool:
        busy = pool.submit(sleep_for, 1.0)
        waiting = pool.submit(touch, str(marker))
        assert waiting.cancel() and waiting.cancelled()
        busy.result(timeout=60)
        assert pool.submit(square, 3).result(timeout=60) == 9  # the queue has moved past it
    assert not marker.exists(), "a cancelled future's task ran"
