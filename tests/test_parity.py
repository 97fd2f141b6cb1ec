"""The engines agree: one table of cases, run through the public ``mpnb.Pool``
API on every engine.

- ``local``: ``mpnb.Pool(2)``, worker processes on this machine;
- ``dask``: ``mpnb.Pool(backend="dask")`` on a real scheduler and two
  one-thread workers on 127.0.0.1 (the ``cluster`` fixture of conftest.py);
- ``inline``: the pool a task gets inside a worker at the deepest nesting
  level (``MPNB_DEPTH`` = ``MPNB_MAX_DEPTH``): no processes, the tasks run in
  the caller's process, one at a time;
- ``threads``: ``mpnb.Pool(2, backend="threads")``, two threads of the
  caller's process: nothing travels, as inline, but two tasks run at once;
- ``interpreters``: ``mpnb.Pool(2, backend="interpreters")``, two
  subinterpreters of the caller's process (Python 3.14; skipped before):
  arguments, results and errors travel, as to another process.

Each row of the table is one function of a ``Run`` (the pool and the
engine's traits) with one set of assertions, the same on every engine.  Where
engines must differ, the row branches on a trait of the engine (does it run
the task in another process?) and says why; never on its name.

The task functions below are shipped by value (``cloudpickle``'s
``register_pickle_by_value``): the dask workers cannot import this module,
and every engine then gets exactly the same bytes.

Cancelling follows ``concurrent.futures``:

- a future whose task has not started is *pending*: ``future.cancel()``
  returns True, it reports ``cancelled()``, and its task never runs;
- a future whose task has started reports ``running()``;
  ``future.cancel()`` returns False and the task completes normally;
- ``pool.cancel()`` (the live view's Cancel, an interrupt) stops the work
  under way on every engine: pending futures are cancelled as above, and the
  future of a running task ends at once, without waiting for its task, with a
  ``CancelledError`` as its exception.  It had started, so it does not report
  ``cancelled()``.  Whether the task's code stops too is the engine's
  affair: the local engine kills the worker, dask, threads, interpreters and
  inline cannot stop a thread and drop the result; the pool serves the next call either way.

``submit()`` returns before its task ends on every engine: otherwise nothing
could ever be pending or running, and cancelling would mean nothing inline.

No assertion depends on speed: every wait is for a condition, with a
generous deadline.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import pytest

import mpnb
from kernel import TAG_VAR
from mpnb.pool import RemoteTraceback

# generous: these wait for conditions, never for a speed
DEADLINE = 60.0
# how long a future may take to report running() once its task has started
RUNNING_DEADLINE = 30.0


# ------------------------------------------------------------ task functions


def square(x):
    return x * x


def add(a, b):
    return a + b


def scale(x, factor=2):
    return x * factor


def fail_on(x, bad=2):
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x


def shout(x):
    print(f"out {x}")
    print(f"err {x}", file=sys.stderr)
    return x


def make_generator(n):
    return (i for i in range(n))


def touch(path):
    Path(path).touch()
    return path


def wait_for_file(path):
    deadline = time.monotonic() + DEADLINE
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def block(started, release, caller):
    """Say the task started, then wait until the test releases it.

    ``caller`` is the submitting thread: a task run there, inside
    ``submit()``, would block the test itself, so it fails at once instead.
    """
    if (os.getpid(), threading.get_ident()) == tuple(caller):
        raise RuntimeError("the task ran inside submit(), on the caller's thread: "
                           "submit() must return before its task ends")
    Path(started).touch()
    wait_for_file(release)
    return "released"


# ---------------------------------------------------------------- engines


@dataclass(frozen=True)
class Engine:
    name: str
    slots: int  # tasks that run at once
    elsewhere: bool  # tasks run in other processes: arguments, results and errors travel


ENGINES = {
    "local": Engine("local", slots=2, elsewhere=True),
    "dask": Engine("dask", slots=2, elsewhere=True),  # two workers of one thread each
    "inline": Engine("inline", slots=1, elsewhere=False),  # one task after the other
    "threads": Engine("threads", slots=2, elsewhere=False),  # two threads of this process
    "interpreters": Engine("interpreters", slots=2, elsewhere=True),  # two subinterpreters of this process
}


@dataclass
class Run:
    """One row on one engine: the pool, and helpers to hold its workers busy."""

    engine: Engine
    pool: mpnb.Pool
    tmp: Path
    capsys: Any
    _blocked: int = 0

    @property
    def release_file(self) -> Path:
        return self.tmp / "release"

    def release(self) -> None:
        self.release_file.touch()

    def block(self) -> tuple[Future, Path]:
        """Submit a task that runs until :meth:`release`, and the file it writes as it starts."""
        started = self.tmp / f"started-{self._blocked}"
        self._blocked += 1
        caller = (os.getpid(), threading.get_ident())
        future = self.pool.submit(block, str(started), str(self.release_file), caller)
        return future, started

    def busy(self, count: int) -> list[Future]:
        """``count`` blocking tasks, all started."""
        blockers = [self.block() for _ in range(count)]
        for future, started in blockers:
            _wait(lambda: started.exists() or future.done(), f"{started.name}: the blocking task starts")
            assert not future.done(), f"the blocking task ended before release: {future.exception(0)!r}"
        return [future for future, _ in blockers]


def _wait(condition: Callable[[], bool], what: str, within: float = DEADLINE) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(0.02)


@pytest.fixture(scope="module", autouse=True)
def by_value():
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def _pool(engine: Engine, request, tag: str, monkeypatch) -> mpnb.Pool:
    if engine.name == "dask":
        cluster = request.getfixturevalue("cluster")
        return mpnb.Pool(backend="dask", address=cluster.address, live=False)
    if engine.name == "inline":
        # as in a worker of a pool at the deepest level pools may nest
        monkeypatch.setenv(mpnb.limits.DEPTH_VAR, "1")
        monkeypatch.setenv("MPNB_MAX_DEPTH", "1")
        return mpnb.Pool(2, live=False)
    if engine.name == "threads":
        return mpnb.Pool(2, backend="threads", live=False)
    if engine.name == "interpreters":
        from mpnb.backends.interpreters import available

        if available() is not None:
            pytest.skip(available())
        return mpnb.Pool(2, backend="interpreters", live=False)
    return mpnb.Pool(2, live=False, env={TAG_VAR: tag})


@pytest.fixture(params=list(ENGINES))
def run(request, tag, tmp_path, monkeypatch, capsys):
    engine = ENGINES[request.param]
    pool = _pool(engine, request, tag, monkeypatch)
    state = Run(engine, pool, tmp_path, capsys)
    try:
        yield state
    finally:
        state.release()  # no blocking task outlives its row
        pool.shutdown(wait=True)


# ---------------------------------------------------------------- the table

TABLE: list[Callable[[Run], None]] = []


def row(case: Callable[[Run], None]) -> Callable[[Run], None]:
    TABLE.append(case)
    return case


def _note(exc: BaseException) -> str:
    notes = [n for n in getattr(exc, "__notes__", []) if n.startswith("mpnb: raised by ")]
    assert notes, f"no note names the task: {exc!r}"
    return notes[-1]


def _assert_trace(run: Run, exc: BaseException, function: str) -> None:
    """The task's own traceback: as ``__cause__`` when it ran elsewhere, else as raised."""
    if run.engine.elsewhere:
        assert isinstance(exc.__cause__, RemoteTraceback), repr(exc.__cause__)
        assert f"in {function}" in str(exc.__cause__)
    else:
        assert function in [frame.name for frame in traceback.extract_tb(exc.__traceback__)]


@row
def map_one_iterable(run: Run) -> None:
    assert run.pool.map(square, range(10)) == [x * x for x in range(10)]
    assert run.pool.map(square, range(5), chunksize=2) == [0, 1, 4, 9, 16]
    assert run.pool.map(square, []) == []


@row
def map_several_iterables(run: Run) -> None:
    assert run.pool.map(pow, [2, 3, 4], [5, 2, 1]) == [32, 9, 4]
    assert run.pool.map(add, [1, 2, 3], [10, 20]) == [11, 22]  # as zip: the shortest decides


@row
def starmap(run: Run) -> None:
    assert run.pool.starmap(divmod, [(7, 2), (9, 4)]) == [(3, 1), (2, 1)]
    assert run.pool.starmap(add, ([i, i] for i in range(3))) == [0, 2, 4]


@row
def imap_in_order(run: Run) -> None:
    assert list(run.pool.imap(square, range(7))) == [x * x for x in range(7)]
    assert list(run.pool.imap(square, iter(range(5)), chunksize=2)) == [0, 1, 4, 9, 16]


@row
def imap_unordered(run: Run) -> None:
    assert sorted(run.pool.imap_unordered(square, range(7))) == sorted(x * x for x in range(7))


@row
def submit_with_keywords(run: Run) -> None:
    assert run.pool.submit(scale, 3, factor=4).result(timeout=DEADLINE) == 12
    assert run.pool.submit(int, "ff", base=16).result(timeout=DEADLINE) == 255


@row
def apply_positional_and_keyword(run: Run) -> None:
    assert run.pool.apply(scale, (3,)) == 6
    assert run.pool.apply(scale, (3, 4)) == 12
    assert run.pool.apply(scale, (3,), {"factor": 4}) == 12
    assert run.pool.apply(add, (1,), {"b": 2}) == 3
    assert run.pool.apply(len, ([1, 2],)) == 2  # multiprocessing.Pool.apply's meaning


@row
def raising_task_in_map(run: Run) -> None:
    with pytest.raises(ValueError, match="bad input 2") as info:
        run.pool.map(fail_on, range(4), chunksize=1)
    assert _note(info.value).startswith("mpnb: raised by task 2 (argument 2)")
    _assert_trace(run, info.value, "fail_on")
    assert isinstance(run.pool.last_results[2], ValueError)
    assert run.pool.map(square, [3]) == [9]  # the pool serves on


@row
def raising_task_in_submit(run: Run) -> None:
    future = run.pool.submit(fail_on, 2)
    error = future.exception(timeout=DEADLINE)
    assert isinstance(error, ValueError) and str(error) == "bad input 2"
    assert _note(error).startswith("mpnb: raised by task 0 (arguments (2))")
    _assert_trace(run, error, "fail_on")
    with pytest.raises(ValueError, match="bad input 2"):
        future.result(timeout=0)


@row
def printing_task_in_map(run: Run) -> None:
    run.capsys.readouterr()
    assert run.pool.map(shout, range(4), chunksize=1) == [0, 1, 2, 3]
    out, err = run.capsys.readouterr()
    assert out.splitlines() == [f"out {i}" for i in range(4)]  # in task order
    assert err.splitlines() == [f"err {i}" for i in range(4)]


@row
def printing_task_in_submit(run: Run) -> None:
    run.capsys.readouterr()
    assert run.pool.submit(shout, 7).result(timeout=DEADLINE) == 7
    out, err = run.capsys.readouterr()
    assert out == "out 7\n" and err == "err 7\n"


@row
def unpicklable_result(run: Run) -> None:
    """A result that cannot travel fails with an error naming its type and
    the fix, on an engine that runs the task elsewhere.  An engine that runs
    it in the caller's process returns the object itself: nothing travels, so
    nothing is refused, and pickling each result only to check it would cost
    every task time.  The outer task's result is still checked when it
    travels back to the notebook."""
    outcome = run.pool.submit(make_generator, 3)
    if run.engine.elsewhere:
        error = outcome.exception(timeout=DEADLINE)
        assert isinstance(error, mpnb.PicklingProblem), repr(error)
        assert "return value" in str(error) and "(generator) does not pickle" in str(error)
        assert "Fix: return list(...)" in str(error)
    else:
        assert list(outcome.result(timeout=DEADLINE)) == [0, 1, 2]
    assert run.pool.submit(square, 3).result(timeout=DEADLINE) == 9


@row
def collect_errors(run: Run) -> None:
    results = run.pool.map(fail_on, range(5), on_error="collect")
    assert results[:2] == [0, 1] and results[3:] == [3, 4]
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad input 2"
    assert _note(results[2]).startswith("mpnb: raised by task 2 (argument 2)")
    assert run.pool.last_results == results


@row
def cancel_before_start(run: Run) -> None:
    blockers = run.busy(run.engine.slots)
    marker = run.tmp / "ran"
    waiting = run.pool.submit(touch, str(marker))
    assert not waiting.running()
    assert waiting.cancel() and waiting.cancelled()
    run.release()
    assert [b.result(timeout=DEADLINE) for b in blockers] == ["released"] * run.engine.slots
    assert run.pool.submit(square, 3).result(timeout=DEADLINE) == 9
    run.pool.shutdown(wait=True)  # whatever was queued has run by now
    assert not marker.exists(), "a cancelled future's task ran"
    with pytest.raises(CancelledError):
        waiting.result(timeout=0)


@row
def running_while_it_runs(run: Run) -> None:
    [future] = run.busy(1)
    _wait(future.running, "the future of a started task reports running()", RUNNING_DEADLINE)
    assert not future.done()
    run.release()
    assert future.result(timeout=DEADLINE) == "released"
    assert future.done() and not future.running() and not future.cancelled()


@row
def cancel_of_a_running_future_fails(run: Run) -> None:
    [future] = run.busy(1)
    _wait(future.running, "the future of a started task reports running()", RUNNING_DEADLINE)
    assert future.cancel() is False
    assert not future.cancelled()
    run.release()
    assert future.result(timeout=DEADLINE) == "released"  # completes normally


@row
def pool_cancel_stops_running_and_pending(run: Run) -> None:
    blockers = run.busy(run.engine.slots)
    for blocker in blockers:
        # a task that has started but whose future does not know it yet counts
        # as pending (dask's start event travels apart from the task)
        _wait(blocker.running, "the future of a started task reports running()", RUNNING_DEADLINE)
    marker = run.tmp / "ran"
    pending = run.pool.submit(touch, str(marker))
    run.pool.cancel()
    # ends without its task being released: the pool stopped waiting for it
    for blocker in blockers:
        _wait(blocker.done, "pool.cancel() ends the future of a running task")
        assert not blocker.cancelled(), "it had started: only pending futures report cancelled()"
        assert isinstance(blocker.exception(timeout=0), CancelledError)
    _wait(pending.done, "pool.cancel() ends a pending future")
    assert pending.cancelled()
    run.release()
    assert run.pool.submit(square, 3).result(timeout=DEADLINE) == 9  # the pool serves on
    run.pool.shutdown(wait=True)
    assert not marker.exists(), "a cancelled future's task ran"


@row
def a_forked_copy_refuses_work(run: Run) -> None:
    """A process forked from the pool's owner (a fork Pool's worker, a
    DataLoader worker) holds a copy of the pool whose engine did not come
    with it: the copy refuses work at once, naming the fix, where it would
    otherwise have queued it for no one."""
    import warnings

    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # the copy: reports what submit did, and leaves without any exit hook
        try:
            run.pool.submit(square, 3)
            message = "accepted"
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}"
        os.write(write, message.encode()[:4000])
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + DEADLINE
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    assert message.startswith("RuntimeError: this mpnb.Pool belongs to process "), message
    assert message.endswith("create a new mpnb.Pool in this process"), message
    assert run.pool.submit(square, 3).result(timeout=DEADLINE) == 9  # the owner's pool serves on


@pytest.mark.parametrize("case", TABLE, ids=[case.__name__ for case in TABLE])
def test_parity(run, case):
    case(run)


def test_engine_contract_a_cancelled_call_gives_every_task_an_outcome(run):
    """The promise the pool's waiting rests on (docs/architecture.md): after
    ``engine.cancel(call)``, every task of the call gets an outcome, those
    running and those still queued alike, without any release.  Asked of
    the engine directly: the pool's own callers fill in what is missing."""
    pool, engine = run.pool, run.pool._engine
    total = run.engine.slots + 2
    caller = (os.getpid(), threading.get_ident())
    items = [(str(run.tmp / f"contract-{i}"), str(run.release_file), caller) for i in range(total)]
    call = pool._new_call(block, None, mpnb._protocol.Mode.STAR)
    call.total = total
    engine.submit([chunk for _, chunk in pool._chunks(call, items, 1)])
    _wait(lambda: sum((run.tmp / f"contract-{i}").exists() for i in range(total)) >= run.engine.slots,
          "the first tasks start")
    engine.cancel(call)
    _wait(lambda: len(call.results) == total, "an outcome for every task of the cancelled call")
    assert all(isinstance(call.results[i], CancelledError) for i in range(total)), call.results
    assert sorted(call.failed) == list(range(total))
