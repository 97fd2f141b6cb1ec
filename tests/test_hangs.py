"""No hang: each fault below ends, and the pool (or its shutdown) goes on.

A table per kind of fault, in the style of test_pool.py: real worker
processes, the ``tag`` fixture proving that none is left.  A call that could
hang runs in a helper thread and must end within a generous deadline: the
assertion is that it ended, never a measured duration.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool

import pytest

import mpnb
from kernel import TAG_VAR, Kernel
from mpnb.pool import TaskTimeoutError

# generous: the suite must pass on a busy 2-core machine
DEADLINE = 60.0

CONTEXTS = ["exec", "loky", "spawn"]


# ------------------------------------------------------------ task functions


def square(x):
    return x * x


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def fail_first(x):
    if x == 0:
        raise ValueError("bad input 0")
    time.sleep(600)
    return x


def square_when_exists(x, path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x * x


def hang_forever():
    while True:
        time.sleep(1)


def _load_in_worker_only(owner: int, fault: str):
    """Loads in the worker that made it; raises ``fault`` anywhere else."""
    if os.getpid() != owner:
        if fault == "SystemExit":
            raise SystemExit(3)
        raise pickle.UnpicklingError("this value loads only where it was made")
    return LoadsOnlyInWorker(fault)


class LoadsOnlyInWorker:
    def __init__(self, fault: str):
        self.fault = fault

    def __reduce__(self):
        return (_load_in_worker_only, (os.getpid(), self.fault))


def unloadable_on(x, bad=1, fault="UnpicklingError"):
    return LoadsOnlyInWorker(fault) if x == bad else {"value": x}


class RaisesOnPickle:
    def __init__(self, error: BaseException):
        self.error = error

    def __reduce__(self):
        raise self.error


# ------------------------------------------------------------------ helpers


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run ``fn`` in a daemon thread; the dict gets its ``value`` or ``error``."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _ends(fn, *args, **kwargs) -> dict:
    """``fn``'s outcome; fails the test if it has not ended within DEADLINE."""
    thread, outcome = _in_thread(fn, *args, **kwargs)
    thread.join(DEADLINE)
    assert not thread.is_alive(), f"{getattr(fn, '__qualname__', fn)} did not end within {DEADLINE:g} s"
    return outcome


def _wait_for(condition, what: str):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not seen within {DEADLINE:g} s: {what}")


def _busy_pid(pool) -> int:
    rows = _wait_for(lambda: [r for r in pool.monitor.snapshot() if r.state == "busy"], "a busy worker")
    return rows[0].pid


@pytest.fixture(params=CONTEXTS)
def pool(request, tag):
    """A 2-worker pool, warm; afterwards it must still serve and leave nothing."""
    p = mpnb.Pool(2, context=request.param, live=False, env={TAG_VAR: tag})
    try:
        assert p.map(square, range(4)) == [0, 1, 4, 9]
        yield p
        assert p.submit(square, 3).result(timeout=DEADLINE) == 9, "the pool must still serve after the test"
    finally:
        _ends(p.shutdown)


# ------------------------------------------- calls that raised or were stopped


def test_shutdown_after_a_map_that_raised_does_not_wait_for_its_other_tasks(pool):
    with pytest.raises(ValueError, match="bad input 0"):
        pool.map(fail_first, range(2), chunksize=1)
    assert isinstance(pool.last_results[1], CancelledError)
    # the fixture's check that the pool still serves, then its bounded shutdown:
    # the task sleeping 600 s was stopped with the call that raised


def test_ctrl_c_in_future_result_stops_its_task_and_shutdown_does_not_wait(kernel):
    kernel.run("import mpnb, threading, time, sys\npool = mpnb.Pool(1, live=False)\npool.map(abs, range(2))\n").ok()
    # a helper in the kernel says when the main thread waits in result(), so
    # the interrupt reaches exactly that wait
    msg_id = kernel.submit(
        "future = pool.submit(time.sleep, 600)\n"
        "def _say_when_waiting(main=threading.main_thread()):\n"
        "    while True:\n"
        "        frame = sys._current_frames().get(main.ident)\n"
        "        while frame is not None and (frame.f_code.co_name, frame.f_globals.get('__name__')) \\\n"
        "                != ('result', 'mpnb.mpcompat'):\n"
        "            frame = frame.f_back\n"
        "        if frame is not None:\n"
        "            print('waiting in result', flush=True)\n"
        "            return\n"
        "        time.sleep(0.02)\n"
        "threading.Thread(target=_say_when_waiting, daemon=True).start()\n"
        "future.result()\n"
    )
    _read_until(kernel, msg_id, "waiting in result")
    kernel.interrupt()
    reply = kernel.collect(msg_id, timeout=DEADLINE)
    assert reply.ename == "KeyboardInterrupt", reply
    after = kernel.run(
        "from concurrent.futures import CancelledError\n"
        "pool.shutdown()\n"
        "print('stopped' if future.cancelled() or isinstance(future.exception(), CancelledError) else 'ran on')\n",
        timeout=DEADLINE,
    ).ok()
    assert after.stdout.strip() == "stopped"


def test_ctrl_c_while_a_caller_sends_its_chunks_is_raised_once_they_are_sent():
    """The local engine's submit sends the chunks from the caller's thread
    while its loop waits; a KeyboardInterrupt in the middle (a message half
    written to a worker) would break the engine, so SIGINT's handler runs
    at the end of that block, and once."""
    from mpnb.backends.local import _interrupts_held

    assert threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with _interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)
                for step in range(100_000):  # the handler would run at one of these
                    steps.append(step)
                steps.append("end of the block")
        assert steps[-1] == "end of the block"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_hold_swaps_handlers_with_the_signal_modules_own_functions():
    """``_interrupts_held`` runs for every call, so it uses ``_signal``'s
    functions, not ``signal.signal`` (which converts handlers to enums): on
    CPython they must be found, and agree with the public ones."""
    import _signal

    from mpnb.backends import local

    assert (local._getsignal, local._setsignal) == (_signal.getsignal, _signal.signal)
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        pass

    try:
        assert local._setsignal(signal.SIGINT, handler) is previous
        assert signal.getsignal(signal.SIGINT) is handler is local._getsignal(signal.SIGINT)
        assert local._setsignal(signal.SIGINT, int(signal.SIG_IGN)) is handler  # the C module's SIG_IGN
        assert local._getsignal(signal.SIGINT) == signal.SIG_IGN and not callable(local._getsignal(signal.SIGINT))
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_submit_dispatches_reaches_the_caller_and_the_pool_works_on(tag, monkeypatch):
    """SIGINT in the middle of the caller's own dispatch is raised to the
    caller once its chunks are sent: not taken for a fault of the engine."""
    assert threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    pool = mpnb.Pool(1, live=False, env={TAG_VAR: tag})
    try:
        engine = pool._engine
        pool.map(square, [1])  # the worker is up and idle: submit dispatches from this thread
        dispatch, hits, raised = engine._dispatch, [], []

        def interrupted_dispatch():
            if threading.current_thread() is threading.main_thread():  # the caller's own dispatch
                hits.append(True)
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, now
            dispatch()

        monkeypatch.setattr(engine, "_dispatch", interrupted_dispatch)
        deadline = time.monotonic() + DEADLINE
        while not hits and time.monotonic() < deadline:  # the loop may hold the engine at first
            try:
                assert pool.submit(square, 7).result(timeout=DEADLINE) == 49
            except KeyboardInterrupt:
                raised.append(True)
            time.sleep(0.05)
        monkeypatch.undo()
        assert hits and raised, "the caller's own dispatch ran, and its Ctrl-C reached it"
        assert not engine.stopped.is_set()
        assert pool.map(square, [2, 3]) == [4, 9]
    finally:
        signal.signal(signal.SIGINT, previous)
        _ends(pool.shutdown)


def _read_until(kernel: Kernel, msg_id: str, text: str) -> None:
    seen = ""
    deadline = time.monotonic() + DEADLINE
    while text not in seen:
        assert time.monotonic() < deadline, f"the kernel did not print {text!r}; so far {seen!r}"
        try:
            msg = kernel.kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "error":
            raise AssertionError(f"the cell failed: {msg['content']['evalue']}")


# -------------------------------------------------------- shutdown after cancel


def test_shutdown_right_after_a_cancelled_future_ends(tag, tmp_path):
    """As CPython's gh-94440: the cancelled task is dropped only when the busy
    worker frees up, after shutdown() began; nothing must be left to wait for."""
    pool = mpnb.Pool(1, live=False, env={TAG_VAR: tag})
    engine = pool._engine
    go = tmp_path / "go"
    try:
        busy = pool.submit(square_when_exists, 2, str(go))
        _busy_pid(pool)
        late = pool.submit(square, 3)
        assert late.cancel()
        pool.shutdown(wait=False)
        go.touch()
        assert engine.stopped.wait(DEADLINE), "shutdown after a cancelled future never ended"
        assert busy.result(timeout=DEADLINE) == 4 and late.cancelled()
    finally:
        engine.kill_now()


# --------------------------------------------------------- results that do not load


@pytest.mark.parametrize("fault", ["UnpicklingError", "SystemExit"])
def test_a_result_that_does_not_load_fails_its_task_alone(pool, fault):
    future = pool.submit(unloadable_on, 1, fault=fault)
    error = future.exception(timeout=DEADLINE)
    assert isinstance(error, pickle.UnpicklingError), error
    assert "task 0" in str(error) and "LoadsOnlyInWorker" in str(error) and fault in str(error)
    results = pool.map(unloadable_on, range(4), [1] * 4, [fault] * 4, chunksize=2, on_error="collect")
    assert [r for i, r in enumerate(results) if i != 1] == [{"value": 0}, {"value": 2}, {"value": 3}]
    assert isinstance(results[1], pickle.UnpicklingError) and "task 1" in str(results[1])


# ----------------------------------------------------------------- callbacks


@pytest.mark.parametrize("error", [SystemExit(5), KeyboardInterrupt(), ValueError("callback bug")],
                         ids=["SystemExit", "KeyboardInterrupt", "ValueError"])
def test_a_raising_done_callback_is_logged_and_the_pool_serves_on(pool, error, caplog, tmp_path):
    raised = threading.Event()

    def callback(_):
        raised.set()
        raise error

    go = tmp_path / "go"
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        # not done before the callback is added: the pool's thread runs it
        pool.submit(square_when_exists, 2, str(go)).add_done_callback(callback)
        go.touch()
        _wait_for(raised.is_set, "the callback")
        assert pool.submit(square, 4).result(timeout=DEADLINE) == 16
    logged = [r for r in caplog.records if r.name == "concurrent.futures"]
    assert logged and logged[0].getMessage().startswith("exception calling callback for")
    assert logged[0].exc_info[0] is type(error)


# ------------------------------------------------- arguments that fail to pickle


@pytest.mark.parametrize("error", [SystemExit(4), ValueError("no pickling")], ids=["SystemExit", "ValueError"])
def test_an_argument_whose_reduce_raises_fails_its_task(pool, error):
    future = pool.submit(square, RaisesOnPickle(error))
    failure = future.exception(timeout=DEADLINE)
    assert isinstance(failure, pickle.PicklingError) and "task 0" in _text(failure), failure
    results = pool.map(square, [1, RaisesOnPickle(error), 3], chunksize=3, on_error="collect")
    assert results[0] == 1 and results[2] == 9
    assert isinstance(results[1], pickle.PicklingError) and "task 1" in _text(results[1])


class UnpicklableFunction(RaisesOnPickle):
    def __call__(self, x):
        return x


@pytest.mark.parametrize("error", [SystemExit(4), ValueError("no pickling")], ids=["SystemExit", "ValueError"])
def test_a_function_whose_reduce_raises_is_refused_with_a_pickling_error(pool, error):
    # as concurrent.futures: submit() returns, its future holds the error
    outcome = _ends(pool.submit, UnpicklableFunction(error), 1)
    assert "error" not in outcome, outcome
    assert isinstance(outcome["value"].exception(timeout=DEADLINE), pickle.PicklingError), outcome
    # a blocking call raises it
    outcome = _ends(pool.map, UnpicklableFunction(error), [1])
    assert isinstance(outcome.get("error"), pickle.PicklingError), outcome
    assert pool.submit(square, 3).result(timeout=DEADLINE) == 9


def _text(exc: BaseException) -> str:
    """The message and the notes: the task is named in one of them."""
    return " ".join([str(exc), *getattr(exc, "__notes__", [])])


# ------------------------------------------------------------ a stopped manager


def test_a_pool_whose_manager_stopped_refuses_work_at_once(tag):
    pool = mpnb.Pool(1, live=False, env={TAG_VAR: tag})
    engine = pool._engine
    pool.map(square, [1])
    running = pool.submit(sleep_for, 600)
    _busy_pid(pool)
    engine.cancel(None)  # a fault inside the engine thread (no such call)
    # work sent while it stops, or after, fails; none waits forever
    outcome = _ends(lambda: pool.submit(square, 2).result(timeout=DEADLINE))
    assert isinstance(outcome.get("error"), BrokenProcessPool), outcome
    # and so does the task that was running: one exception type for all of them
    assert isinstance(running.exception(timeout=DEADLINE), BrokenProcessPool)
    assert engine.stopped.wait(DEADLINE)
    with pytest.raises(BrokenProcessPool, match="create a new mpnb.Pool"):
        pool.submit(square, 3)
    _ends(pool.shutdown)


def test_a_fault_met_while_a_caller_dispatches_breaks_the_pool_as_one_in_the_loop(tag):
    # the caller's thread sends its chunks itself while the loop waits, and acts on
    # what other threads asked first: a fault there is the engine's, not the caller's
    from mpnb.backends.base import Cancel

    pool = mpnb.Pool(1, live=False, env={TAG_VAR: tag})
    engine = pool._engine
    pool.map(square, [1])  # then idle: the loop waits for nothing but its wake pipe
    engine.inbox.put(Cancel(None, threading.Event()))  # a fault for whoever reads the inbox next, unwoken
    outcome = _ends(lambda: pool.submit(square, 2).result(timeout=DEADLINE))
    assert isinstance(outcome.get("error"), BrokenProcessPool), outcome
    assert engine.stopped.wait(DEADLINE)
    with pytest.raises(BrokenProcessPool, match="create a new mpnb.Pool"):
        pool.submit(square, 3)
    _ends(pool.shutdown)


# -------------------------------------------------------------- worker start-up


@pytest.mark.parametrize("context", ["exec", "spawn"])
def test_an_initializer_that_never_returns_fails_the_waiting_work(tag, monkeypatch, context):
    monkeypatch.setenv("MPNB_START_TIMEOUT", "3")
    pool = mpnb.Pool(2, context=context, initializer=hang_forever, live=False, env={TAG_VAR: tag})
    try:
        outcome = _ends(pool.map, square, [1, 2], timeout=3)
        error = outcome.get("error")
        assert isinstance(error, BrokenProcessPool), outcome
        assert "test_hangs.hang_forever" in str(error) and "MPNB_START_TIMEOUT" in str(error)
    finally:
        _ends(pool.shutdown)


def test_start_timeout_must_be_a_positive_number(monkeypatch):
    monkeypatch.setenv("MPNB_START_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MPNB_START_TIMEOUT='soon'"):
        mpnb.Pool(1)


# ---------------------------------------------------------- a stopped worker


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_stopped_worker_shows_times_out_and_is_killed_at_shutdown(tag, context):
    pool = mpnb.Pool(2, context=context, live=False, env={TAG_VAR: tag})
    engine = pool._engine
    try:
        pool.map(square, range(4))
        # a task timeout fires for a stopped worker like for any other
        thread, timed = _in_thread(pool.map, sleep_for, [600], timeout=10)
        victim = _busy_pid(pool)
        os.kill(victim, signal.SIGSTOP)
        _wait_for(lambda: [r for r in pool.monitor.snapshot() if r.pid == victim and r.state == "stopped"],
                  "the stopped worker's row")
        thread.join(DEADLINE)
        assert isinstance(timed.get("error"), TaskTimeoutError), timed
        # shutdown kills a stopped worker instead of waiting for its task
        running = pool.submit(sleep_for, 600)
        victim = _busy_pid(pool)
        os.kill(victim, signal.SIGSTOP)
        pool.shutdown(wait=False)
        assert engine.stopped.wait(DEADLINE), "shutdown waited for a stopped worker"
        error = running.exception(timeout=DEADLINE)
        assert isinstance(error, BrokenProcessPool) and "stopped by a signal" in str(error), error
    finally:
        engine.kill_now()


def test_a_fork_while_workers_start_does_not_hold_their_pipes(tag):
    """A process forked while a worker starts (a fork Pool made next to
    mpnb's, a library that forks) copies every descriptor open at that
    moment. Had it copied the new worker's start pipe, the start would wait
    for the forked process to end; the pool must start and serve anyway."""
    import warnings

    stop, children = threading.Event(), []

    def fork_until_stopped():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
            while not stop.is_set() and len(children) < 400:
                pid = os.fork()
                if pid == 0:  # lives until the test ends, holding what it copied
                    time.sleep(DEADLINE * 2)
                    os._exit(0)
                children.append(pid)
                time.sleep(0.001)

    forker = threading.Thread(target=fork_until_stopped, daemon=True)
    results: list = []
    try:
        forker.start()
        with mpnb.Pool(2, env={TAG_VAR: tag}, context="exec", live=False) as pool:
            done = threading.Thread(target=lambda: results.append(pool.map(square, range(8))), daemon=True)
            done.start()
            done.join(DEADLINE)
            assert results == [[x * x for x in range(8)]], "the pool's workers never started"
    finally:
        stop.set()
        forker.join(DEADLINE)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


FORKED = """
import multiprocessing as mp, os, signal, sys, time
import numpy, mpnb

def nothing():
    pass

def ended(pid, wait):
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"

if __name__ == "__main__":
    context, wait = sys.argv[1], float(sys.argv[2])
    pool = mpnb.Pool(2, context=context, live=False)
    assert pool.map(abs, [-1, -2]) == [1, 2]
    workers = sorted(pool.pids)
    array = mpnb.shared_array((4,))
    child = mp.get_context("fork").Process(target=nothing)
    child.start()
    child.join(wait)
    if child.exitcode is None:
        child.kill()
        child.join()
    print("Process", child.exitcode, flush=True)
    pid = os.fork()
    if pid == 0:
        try:
            pool.map(abs, [-3])
        except RuntimeError as exc:
            print("refused:", exc, flush=True)
        sys.exit(0)  # the interpreter's own exit: threading's hooks, atexit, finalizers
    print("fork", ended(pid, wait), flush=True)
    print("map", pool.map(abs, [-3, -4]), sorted(pool.pids) == workers)
    print("array", os.path.exists(array.base.path))
    pool.shutdown()
"""


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_process_forked_from_a_pools_owner_ends_and_leaves_the_pool_alone(tag, tmp_path, context):
    """A fork Pool's worker, a DataLoader worker, a library's os.fork(): the
    copy inherits every exit hook of the pool's process. Run there, they
    waited for engine threads the fork did not copy (the forked process never
    ended), and killed the owner's workers or removed its shared arrays. The
    copy of the pool refuses work, naming the fix, instead of waiting forever."""
    script = tmp_path / "forked.py"
    script.write_text(FORKED)
    env = dict(os.environ, **{TAG_VAR: tag})
    done = subprocess.run([sys.executable, str(script), context, str(DEADLINE / 4)], env=env, capture_output=True,
                          text=True, timeout=2 * DEADLINE)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Process 0", done.stdout
    assert lines[1].startswith("refused: this mpnb.Pool belongs to process "), done.stdout
    assert "create a new mpnb.Pool in this process" in lines[1], done.stdout
    assert lines[2:] == ["fork 0", "map [3, 4] True", "array True"], done.stdout
