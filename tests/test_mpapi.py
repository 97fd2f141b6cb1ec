"""mpnb.Pool as multiprocessing.Pool and ProcessPoolExecutor: their methods
and their arguments, with real worker processes.

Every pool carries the test's tag, so the ``tag`` fixture fails a test that
leaves a process behind.  Tasks that must still be running when the test
looks wait for a file the test creates (or never creates), never for a time.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import CancelledError

import psutil
import pytest

import mpnb
from kernel import TAG_VAR

DEADLINE = 60.0


# ------------------------------------------------------------ task functions


def square(x):
    return x * x


def scale(x, factor=2):
    return x * factor


def fail_on(x, bad=2):
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x


def wait_for(path, value=None):
    """Return ``value`` once ``path`` exists (at most a minute)."""
    deadline = time.monotonic() + DEADLINE
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def pid(_=None):
    return os.getpid()


def started_by_multiprocessing(_=None):
    """True in a worker that multiprocessing's spawn or forkserver started."""
    return multiprocessing.parent_process() is not None


def remember(value):
    os.environ["MPNB_TEST_INITIALIZED"] = str(value)


def initialized(_=None):
    return os.environ.get("MPNB_TEST_INITIALIZED")


def nested_with_limit(_=None):
    inner = mpnb.Pool(2, maxtasksperchild=1)
    try:
        return inner.map(square, range(4))
    finally:
        inner.shutdown()


# ---------------------------------------------------------------- the base


@pytest.fixture
def pool(tag):
    p = mpnb.Pool(2, env={TAG_VAR: tag}, live=False)
    try:
        yield p
    finally:
        p.terminate()


def _wait_until(condition, what):
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE} s: {what}")
        time.sleep(0.02)


# ------------------------------------------------------------------ apply


def test_apply_takes_args_and_kwds_as_multiprocessing_does(pool):
    assert pool.apply(len, ([1, 2],)) == 2  # the old apply(fn, *args) gave 1
    assert pool.apply(scale, (3,), {"factor": 4}) == 12
    assert pool.apply(scale, args=(3,), kwds={"factor": 5}) == 15
    assert pool.apply(pid) != os.getpid()
    with pytest.raises(TypeError, match=r"not a tuple of arguments.*apply\(fn, \(3,\)\)"):
        pool.apply(scale, 3)
    assert pool.submit(scale, 3, factor=4).result(timeout=DEADLINE) == 12  # submit keeps *args


# ----------------------------------------------------------- AsyncResult


def test_apply_async_calls_back_with_the_value_before_it_is_ready(pool, tmp_path):
    gate = tmp_path / "go"
    seen = []
    result = pool.apply_async(wait_for, (str(gate), 7), callback=lambda v: seen.append((v, result.ready())))
    assert not result.ready()
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.1)
    assert result.wait(0.1) is None and not result.ready()
    gate.touch()
    assert result.get(timeout=DEADLINE) == 7
    assert result.ready() and result.successful()
    assert seen == [(7, False)]  # the callback runs before ready() turns True, as multiprocessing's


def test_error_callback_gets_the_exception(pool):
    errors, values = [], []
    result = pool.apply_async(fail_on, (2,), callback=values.append, error_callback=errors.append)
    result.wait(DEADLINE)
    assert result.ready() and not result.successful()
    assert values == [] and len(errors) == 1 and isinstance(errors[0], ValueError)
    with pytest.raises(ValueError, match="bad input 2") as raised:
        result.get()
    assert raised.value is errors[0]
    assert any("task 0" in note for note in raised.value.__notes__)


def test_map_async_and_starmap_async_give_the_list(pool):
    lists = []
    assert pool.map_async(square, range(10), 3, callback=lists.append).get(DEADLINE) == [x * x for x in range(10)]
    assert pool.starmap_async(scale, [(1, 3), (2, 3)], None, lists.append).get(DEADLINE) == [3, 6]
    assert pool.map_async(square, []).get(DEADLINE) == []
    assert lists == [[x * x for x in range(10)], [3, 6]]
    collected = pool.map_async(fail_on, range(4), on_error="collect").get(DEADLINE)
    assert collected[:2] == [0, 1] and isinstance(collected[2], ValueError) and collected[3] == 3


def test_map_async_fails_with_its_first_failure(pool):
    errors = []
    result = pool.map_async(fail_on, range(6), 1, callback=errors.append, error_callback=errors.append)
    with pytest.raises(ValueError, match="bad input 2"):
        result.get(DEADLINE)
    assert not result.successful()
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert pool.map(square, [3]) == [9]  # the pool serves on


def test_a_callback_that_raises_is_logged_and_the_result_still_ends(pool, caplog):
    def bad_callback(value):
        raise RuntimeError("callback broke")

    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        result = pool.apply_async(square, (3,), callback=bad_callback)
        assert result.get(DEADLINE) == 9
    assert "callback broke" in caplog.text
    assert pool.apply(square, (4,)) == 16


def test_pool_cancel_stops_a_background_map(pool, tmp_path):
    result = pool.map_async(wait_for, [str(tmp_path / "never")] * 4, 1)
    _wait_until(lambda: any(row.index is not None for row in pool.monitor.snapshot()), "a task running")
    pool.cancel()
    with pytest.raises(CancelledError):
        result.get(DEADLINE)
    assert pool.map(square, [2]) == [4]


def test_ctrl_c_in_get_stops_the_background_work(pool, tmp_path):
    result = pool.map_async(wait_for, [str(tmp_path / "never")] * 2, 1)
    _wait_until(lambda: any(row.index is not None for row in pool.monitor.snapshot()), "a task running")
    # started inside the block: wherever the signal lands, it is in there, and get() waits for it
    with pytest.raises(KeyboardInterrupt):
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        result.get()
    with pytest.raises(CancelledError):
        result.get(DEADLINE)


# ------------------------------------------------------ close, join, terminate


def test_close_lets_queued_work_finish_and_join_waits(tag, tmp_path):
    pool = mpnb.Pool(1, env={TAG_VAR: tag}, live=False)
    gate = tmp_path / "go"
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    results = [pool.apply_async(wait_for, (str(gate), i)) for i in range(4)]
    workers = pool.pids or [None]
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        pool.apply_async(square, (1,))
    with pytest.raises(RuntimeError, match="closed"):  # concurrent.futures raises a RuntimeError
        pool.submit(square, 1)
    with pytest.raises(ValueError, match="closed"):
        with pool:
            pass
    gate.touch()
    pool.join()
    assert [r.get(0) for r in results] == [0, 1, 2, 3]
    assert not any(p is not None and psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for p in workers)


def test_terminate_fails_unfinished_work_and_stops_the_workers(tag, tmp_path):
    pool = mpnb.Pool(2, env={TAG_VAR: tag}, live=False)
    never = str(tmp_path / "never")
    results = [pool.apply_async(wait_for, (never, i)) for i in range(5)]
    mapped = pool.map_async(wait_for, [never] * 3)
    _wait_until(lambda: sum(row.index is not None for row in pool.monitor.snapshot()) == 2, "two tasks running")
    workers = pool.pids
    pool.terminate()
    for result in results + [mapped]:
        assert result.ready()
        with pytest.raises(CancelledError):
            result.get(0)
    pool.join()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in workers)


# --------------------------------------------------------- positional chunksize


def test_chunksize_is_taken_positionally(pool):
    # one chunk of all the items runs on one worker
    assert len(set(pool.map(pid, range(8), 8))) == 1
    assert len(set(pool.imap(pid, range(8), 8))) == 1
    assert len(set(pool.imap_unordered(pid, range(8), 8))) == 1
    assert len(set(pool.starmap(pid, [(i,) for i in range(8)], 8))) == 1
    assert pool.map(scale, [1, 2], [3, 4]) == [3, 8]  # several iterables still zip
    with pytest.raises(TypeError, match="chunksize twice"):
        pool.map(square, range(3), 2, chunksize=2)
    with pytest.raises(TypeError, match="argument 4 is 2, not an iterable"):
        pool.map(scale, range(3), range(3), 2)


# ------------------------------------------------------------------ options


def test_processes_and_max_workers_are_names_of_workers(tag):
    for options in ({"processes": 2}, {"max_workers": 2}):
        p = mpnb.Pool(**options, env={TAG_VAR: tag}, live=False)
        try:
            assert p.workers == 2
        finally:
            p.shutdown()
    with pytest.raises(TypeError, match=r"workers=2, processes=3\): these are two names of the same option"):
        mpnb.Pool(2, processes=3)
    with pytest.raises(TypeError, match="two names of the same option"):
        mpnb.Pool(processes=2, max_workers=2)


def test_mp_context_picks_the_start_method(tag):
    spawn = multiprocessing.get_context("spawn")
    # multiprocessing.Pool's keywords, then ProcessPoolExecutor's positional order
    for p in (mpnb.Pool(1, mp_context=spawn, env={TAG_VAR: tag}, live=False),
              mpnb.Pool(1, spawn, remember, ("ppe",), env={TAG_VAR: tag}, live=False)):
        try:
            assert p.apply(started_by_multiprocessing) is True
        finally:
            p.shutdown()
    assert p.workers == 1
    p = mpnb.Pool(1, remember, ("mp",), None, "spawn", env={TAG_VAR: tag}, live=False)
    try:
        assert p.apply(initialized) == "mp" and p.apply(started_by_multiprocessing) is True
    finally:
        p.shutdown()
    with pytest.raises(ValueError, match="never forks the kernel.*get_context\\('spawn'\\)"):
        mpnb.Pool(1, mp_context=multiprocessing.get_context("fork"))
    with pytest.raises(TypeError, match="two names of the same option"):
        mpnb.Pool(1, context="spawn", mp_context=spawn)


def test_a_worker_is_replaced_after_max_tasks_per_child(tag):
    pool = mpnb.Pool(2, maxtasksperchild=2, env={TAG_VAR: tag}, live=False)
    try:
        pids = [r.get(DEADLINE) for r in [pool.apply_async(pid) for _ in range(8)]]
        assert max(collections.Counter(pids).values()) <= 2 and len(set(pids)) >= 4
        # a map's fast tasks are sent ahead to a worker, but never beyond its limit
        pids = pool.map(pid, range(30), 1)
        assert max(collections.Counter(pids).values()) <= 2
    finally:
        pool.shutdown()
    with pytest.raises(ValueError, match="at least 1 task"):
        mpnb.Pool(1, max_tasks_per_child=0)
    with pytest.raises(ValueError, match="at least 1 task"):  # as multiprocessing.Pool: a ValueError
        mpnb.Pool(1, max_tasks_per_child="2")


def test_replaced_workers_finish_work_queued_before_close(tag):
    # CPython's test_pool_worker_lifetime_early_close: workers retire while the pool closes
    pool = mpnb.Pool(3, max_tasks_per_child=1, env={TAG_VAR: tag}, live=False)
    results = [pool.apply_async(scale, (i, 3)) for i in range(6)]
    pool.close()
    pool.join()
    assert [r.get(0) for r in results] == [3 * i for i in range(6)]


def test_a_nested_pool_ignores_max_tasks_per_child(pool):
    assert pool.apply(nested_with_limit) == [0, 1, 4, 9]


def test_a_dask_pool_refuses_max_tasks_per_child():
    pytest.importorskip("distributed")
    with pytest.raises(ValueError, match="does not take max_tasks_per_child=2.*Leave it out"):
        mpnb.Pool(backend="dask", address="tcp://127.0.0.1:9", max_tasks_per_child=2)


def test_initializer_that_is_not_callable_is_refused_at_construction(tag):
    before = len(psutil.Process().children(recursive=True))
    with pytest.raises(TypeError, match=r"mpnb.Pool\(initializer=1\): initializer must be a function"):
        mpnb.Pool(initializer=1)
    assert len(psutil.Process().children(recursive=True)) <= before
