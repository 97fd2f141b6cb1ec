"""``mpnb.Pool(backend="interpreters")``: tasks in subinterpreters of this
process (Python 3.14 and later; skipped before).  The engine parity table
(test_parity.py) runs on it as on every engine; here is what is its own: the
tasks run in subinterpreters and no process starts, the initializer runs in
each, a library that refuses subinterpreters gets mpnb's note, a timeout fails
its task while the subinterpreter runs on, and none is left after shutdown.

The task functions travel by value (they live in a module no subinterpreter
can import), as a notebook's ``%%mppool`` functions that capture values do.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

import mpnb
from mpnb.backends.interpreters import available
from mpnb.pool import TaskTimeoutError

needs_314 = pytest.mark.skipif(available() is not None, reason=str(available()))


@pytest.mark.skipif(available() is None, reason="this Python runs subinterpreters")
def test_before_3_14_the_pool_refuses_to_start_and_says_why():
    with pytest.raises(RuntimeError, match=r"backend='interpreters' needs Python 3.14 or later.*Use backend='local'"):
        mpnb.Pool(2, backend="interpreters")

TASK_SOURCE = '''
import os, time

def where(x):
    from concurrent import interpreters
    return interpreters.get_current().id, os.getpid(), x * x

def shout(x):
    print("task", x)
    return x

def needs_numpy(x):
    import numpy
    return x

def remember(value):
    import builtins
    builtins.mpnb_test_value = value

def remembered(x):
    import builtins
    return getattr(builtins, "mpnb_test_value", None)

def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.02)
    return "released"
'''
TASKS: dict = {"__name__": "interpreter_tasks_by_value"}
exec(compile(TASK_SOURCE, "interpreter_tasks.py", "exec"), TASKS)


def _subinterpreters() -> list:
    from concurrent import interpreters

    main = interpreters.get_main().id
    return [interp for interp in interpreters.list_all() if interp.id != main]


@pytest.fixture
def clean():
    """No subinterpreter is left once the test's pools are shut down."""
    before = {interp.id for interp in _subinterpreters()}
    yield
    deadline = time.monotonic() + 30
    while {interp.id for interp in _subinterpreters()} - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not {interp.id for interp in _subinterpreters()} - before, "subinterpreters left behind"


@needs_314
def test_tasks_run_in_subinterpreters_of_this_process(clean, capsys):
    from concurrent import interpreters

    with pytest.raises(ValueError, match=r"backend='interpreters'\) does not take env=.*Leave it out"):
        mpnb.Pool(2, backend="interpreters", env={"A": "1"})
    with mpnb.Pool(2, backend="interpreters", live=False) as pool:
        assert pool.pids == []
        results = pool.map(TASKS["where"], range(20), chunksize=1)
        assert [square for _, _, square in results] == [x * x for x in range(20)]
        assert {pid for _, pid, _ in results} == {os.getpid()}
        ids = {interp for interp, _, _ in results}
        assert interpreters.get_main().id not in ids and 1 <= len(ids) <= 2, ids
        capsys.readouterr()
        assert pool.map(TASKS["shout"], range(5)) == list(range(5))
        assert capsys.readouterr().out == "".join(f"task {i}\n" for i in range(5))


@needs_314
def test_the_initializer_runs_in_each_subinterpreter(clean):
    with mpnb.Pool(2, backend="interpreters", live=False, initializer=TASKS["remember"], initargs=(7,)) as pool:
        assert pool.map(TASKS["remembered"], range(6), chunksize=1) == [7] * 6


@needs_314
@pytest.mark.skipif(importlib.util.find_spec("numpy") is None, reason="numpy is not installed")
def test_a_library_that_refuses_subinterpreters_gets_the_fix(clean):
    with mpnb.Pool(1, backend="interpreters", live=False) as pool:
        error = pool.submit(TASKS["needs_numpy"], 1).exception(timeout=120)
        assert isinstance(error, ImportError), repr(error)
        text = " ".join(getattr(error, "__notes__", []))
        assert "mpnb: numpy cannot be loaded in a subinterpreter" in text
        assert "cannot run in mpnb.Pool(backend='interpreters')" in text and "Fix: run these tasks in processes" in text
        assert pool.submit(TASKS["where"], 3).result(timeout=120)[2] == 9  # the pool serves on


@needs_314
def test_a_timeout_fails_its_task_and_the_slot_gets_a_new_subinterpreter(clean, tmp_path):
    release = tmp_path / "release"
    with mpnb.Pool(1, backend="interpreters", live=False, timeout=0.5) as pool:
        try:
            stuck = pool.submit(TASKS["wait_for"], str(release))
            error = stuck.exception(timeout=120)
            assert isinstance(error, TaskTimeoutError), repr(error)
            assert "cannot be stopped" in str(error)
            # the stuck task's subinterpreter is busy: the next task runs in another
            assert pool.submit(TASKS["where"], 4).result(timeout=120)[2] == 16
        finally:
            release.touch()  # the stuck task returns, and its subinterpreter is closed
