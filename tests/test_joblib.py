"""The joblib backend "mpnb": joblib's batches on an mpnb.Pool.

Real worker processes and a real kernel; every test that starts processes
carries the ``tag`` fixture (the pools get it through the backend's ``env``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from joblib import Parallel, delayed, parallel_config

import mpnb  # registers the backend with joblib
from kernel import TAG_VAR

DEADLINE = 60.0


def hang_on_three(x: int) -> int:
    if x == 3:
        time.sleep(10_000)
    return 2 * x


def caught(x: int) -> object:
    try:
        return hang_on_three(x)
    except TimeoutError as exc:
        return exc


def fail_or_hang(x: int) -> int:
    if x == 0:
        raise ValueError("task 0 fails")
    time.sleep(10_000)
    return x


def pids_inside(x: int) -> tuple[int, list[int]]:
    inner = Parallel(n_jobs=2)(delayed(os.getpid)() for _ in range(4))
    return os.getpid(), inner


def test_import_mpnb_does_not_import_joblib_and_registers_it_in_either_order():
    code = ("import sys, mpnb; assert 'joblib' not in sys.modules; import joblib.parallel as p; "
            "assert 'mpnb' in p.BACKENDS; assert 'mpnb.joblib_backend' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=DEADLINE)
    code = "import joblib.parallel as p, mpnb; assert 'mpnb' in p.BACKENDS"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=DEADLINE)


def test_timeout_is_raised_inside_the_hanging_task_and_the_others_finish(tag):
    with parallel_config(backend="mpnb", n_jobs=2, timeout=3, live=False, env={TAG_VAR: tag}):
        results = Parallel()(delayed(caught)(i) for i in range(6))
    assert [r for i, r in enumerate(results) if i != 3] == [0, 2, 4, 8, 10]
    assert isinstance(results[3], mpnb.pool.TaskTimeoutError)
    assert "caught(3)" in str(results[3]) and "timeout=3" in str(results[3])


def test_a_crash_names_the_joblib_task(tag):
    with parallel_config(backend="mpnb", n_jobs=2, live=False, env={TAG_VAR: tag}):
        with pytest.raises(mpnb.pool.WorkerCrashedError) as info:
            Parallel(batch_size=1)(delayed(os._exit)(7) for _ in range(2))
    assert any("joblib task was _exit(7)" in note for note in info.value.__notes__)


def test_a_failure_stops_the_running_tasks_and_leaves_no_process(tag):
    # without abort_everything the pool's shutdown would wait for the sleepers
    with parallel_config(backend="mpnb", n_jobs=2, live=False, env={TAG_VAR: tag}):
        with pytest.raises(ValueError, match="task 0 fails"):
            Parallel(batch_size=1)(delayed(fail_or_hang)(i) for i in range(4))


def test_nested_parallel_in_a_worker_runs_in_that_worker(tag):
    with parallel_config(backend="mpnb", n_jobs=2, live=False, env={TAG_VAR: tag}):
        results = Parallel()(delayed(pids_inside)(i) for i in range(2))
    for worker, inner in results:
        assert inner == [worker] * 4
    assert all(worker != os.getpid() for worker, _ in results)


def test_options_are_checked_by_name():
    with pytest.raises(TypeError, match="no option bogus"):
        with parallel_config(backend="mpnb", bogus=1):
            pass
    with pytest.raises(ValueError, match="timeout=-1"):
        with parallel_config(backend="mpnb", timeout=-1):
            pass


GRID_SEARCH = """
import time
import warnings
import numpy as np
from joblib import parallel_config
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import GridSearchCV

class Sleepy(BaseEstimator, ClassifierMixin):
    def __init__(self, hang=False):
        self.hang = hang
    def fit(self, X, y):
        if self.hang:
            time.sleep(10_000)
        self.classes_ = np.unique(y)
        return self
    def predict(self, X):
        return np.full(len(X), self.classes_[0])

X = np.arange(40.0).reshape(20, 2)
y = np.array([0, 1] * 10)
search = GridSearchCV(Sleepy(), {"hang": [False, True]}, cv=2, n_jobs=2, error_score=np.nan)
with warnings.catch_warnings(record=True) as caught, parallel_config(backend="mpnb", timeout=5):
    warnings.simplefilter("always")
    search.fit(X, y)
print("scores", [float(s) for s in search.cv_results_["mean_test_score"]])
print("timed out", any("TaskTimeoutError" in str(w.message) for w in caught))
"""


@pytest.mark.kernel
def test_grid_search_shows_the_live_view_and_a_hanging_fit_is_timed_out(kernel):
    pytest.importorskip("sklearn")
    kernel.run("import mpnb").ok()
    reply = kernel.run(GRID_SEARCH, timeout=300).ok()
    assert "scores [0.5, nan]" in reply.stdout, reply.text
    assert "timed out True" in reply.stdout, reply.text
    assert any("application/vnd.jupyter.widget-view+json" in shown for shown in reply.displays), reply.displays


@pytest.mark.kernel
def test_the_joblib_notebook_runs(tag):
    pytest.importorskip("sklearn")
    from kernel import cell_text, notebook_errors, run_notebook

    nb = run_notebook("joblib.ipynb", tag=tag, timeout=300)
    assert notebook_errors(nb) == []
    assert "nan" in cell_text(nb.cells[-1])
