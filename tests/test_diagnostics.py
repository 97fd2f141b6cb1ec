"""Foreign pools failing on notebook definitions, in a real kernel.

Only a real kernel has the interactive ``__main__`` that spawned children
cannot import, so each test starts one (the ``kernel`` fixture checks that no
process it started is left).  Every cell has a timeout: a hang fails the test.
"""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool

import pytest

from mpnb.diagnostics import explain, fork_message

pytestmark = pytest.mark.kernel

SETUP = """
%load_ext mpnb
import multiprocessing as mp, concurrent.futures as cf

def work(x):
    return x * 2

class Point:
    pass
"""

# generous: a hang would run into the cell timeout, a message comes at once
NO_HANG = 20


def test_spawn_pool_with_a_cell_function_raises_instead_of_hanging(kernel):
    kernel.run(SETUP).ok()
    reply = kernel.run(
        "with mp.get_context('spawn').Pool(2) as pool:\n"
        "    pool.map(work, range(4))", timeout=NO_HANG)
    assert reply.ename == "PicklingProblem"
    assert reply.evalue.startswith("work (function) cannot be sent")
    assert "%%mppool" in reply.evalue and "mpnb.Pool" in reply.evalue
    assert "Can't get attribute 'work'" in reply.evalue
    # apply_async names the argument that would fail in the child
    reply = kernel.run(
        "with mp.get_context('forkserver').Pool(1) as pool:\n"
        "    pool.apply_async(print, (Point(),)).get()", timeout=NO_HANG)
    assert reply.ename == "PicklingProblem"
    assert reply.evalue.startswith("args[0].__class__ (type)")
    assert "class Point" in reply.evalue
    # what does not need __main__ still works, as do thread pools
    reply = kernel.run(
        "from multiprocessing.pool import ThreadPool\n"
        "with mp.get_context('spawn').Pool(2) as pool:\n"
        "    print(pool.map(abs, [-1, -2]))\n"
        "with ThreadPool(2) as pool:\n"
        "    print(pool.map(work, [1, 2]))", timeout=60).ok()
    assert "[1, 2]\n[2, 4]" in reply.stdout


def test_stdlib_pool_whose_workers_die_fails_within_seconds(kernel):
    kernel.run(SETUP).ok()
    # a generator is never consumed up front, so the workers really die
    reply = kernel.run(
        "pool = mp.get_context('spawn').Pool(2)\n"
        "pool.map(id, (Point() for _ in range(4)))", timeout=NO_HANG)
    assert reply.ename == "BrokenPool", reply.evalue
    assert "would wait forever" in reply.evalue
    assert "%%mppool" in reply.evalue
    assert reply.seconds < NO_HANG / 2
    # the broken pool refuses more work at once instead of starting workers
    reply = kernel.run("pool.map(abs, [1])", timeout=NO_HANG)
    assert reply.ename == "BrokenPool"
    kernel.run("pool.terminate(); pool.join()", timeout=NO_HANG).ok()
    # a notebook initializer kills every worker at start-up
    reply = kernel.run(
        "def init():\n    pass\n"
        "with mp.get_context('forkserver').Pool(2, initializer=init) as pool:\n"
        "    pool.map(abs, range(4))", timeout=NO_HANG)
    assert reply.ename == "BrokenPool"
    assert "initializer uses init" in reply.evalue


def test_process_pool_executor_names_the_function(kernel):
    kernel.run(SETUP).ok()
    reply = kernel.run(
        "with cf.ProcessPoolExecutor(2, mp_context=mp.get_context('spawn')) as ex:\n"
        "    list(ex.map(work, range(4)))", timeout=NO_HANG)
    assert reply.ename == "PicklingProblem"
    assert reply.evalue.startswith("work (function)")
    # the check leaves what it lets through unchanged
    reply = kernel.run(
        "with cf.ProcessPoolExecutor(2, mp_context=mp.get_context('spawn')) as ex:\n"
        "    print(list(ex.map(abs, [-1, -2, -3], chunksize=2)),\n"
        "          ex.submit(divmod, 7, 2).result())", timeout=60).ok()
    assert "[1, 2, 3] (3, 1)" in reply.stdout
    # an argument of a notebook class passes the parent and breaks the pool;
    # the note after the traceback names it
    reply = kernel.run(
        "points = [Point(), Point()]\n"
        "with cf.ProcessPoolExecutor(2, mp_context=mp.get_context('spawn')) as ex:\n"
        "    list(ex.map(id, points))", timeout=60)
    assert reply.ename == "BrokenProcessPool"
    assert "mpnb: a worker process died" in reply.stderr
    assert "This cell uses Point, points (holding Point)" in reply.stderr
    assert "%%mppool" in reply.stderr


def test_fork_in_threaded_kernel_warns_once_and_uninstall_removes_all(kernel):
    kernel.run(SETUP).ok()
    run_fork_pool = ("with mp.get_context('fork').Pool(1) as pool:\n"
                     "    print(pool.map(work, [1]))")
    first = kernel.run(run_fork_pool, timeout=60).ok()
    assert "[2]" in first.stdout
    assert "ForkInThreadedKernelWarning" in first.stderr
    assert "IOPub" in first.stderr and "forkserver" in first.stderr
    second = kernel.run(run_fork_pool, timeout=60).ok()
    assert "ForkInThreadedKernelWarning" not in second.stderr

    # the kernel's shutdown hook (mpnb.shutdown) comes off too
    hooked = "print('do_shutdown' in vars(get_ipython().kernel))"
    assert kernel.run(hooked).ok().stdout.split() == ["True"]
    reply = kernel.run(
        "%unload_ext mpnb\n"
        "import multiprocessing.pool as mpp, concurrent.futures.process as cfp\n"
        "print(mpp.Pool._join_exited_workers.__module__, mpp.Pool.apply_async.__module__,\n"
        "      cfp.ProcessPoolExecutor.submit.__module__)\n" + hooked).ok()
    assert reply.stdout.split() == ["multiprocessing.pool"] * 2 + ["concurrent.futures.process", "False"]
    reply = kernel.run("raise cf.process.BrokenProcessPool('gone')")
    assert reply.ename == "BrokenProcessPool" and "mpnb:" not in reply.stderr


def test_diagnose_in_a_notebook(kernel):
    reply = kernel.run(
        "import mpnb.pickling as mp_pickling, threading\n"
        "def work(x):\n    return x\n"
        "lock = threading.Lock()\n"
        "def guarded(x):\n    with lock:\n        return x\n"
        "print(mp_pickling.diagnose(work, name='work').kind)\n"
        "print(mp_pickling.diagnose(work, by_value=True))\n"
        "print(mp_pickling.diagnose(guarded, by_value=True, name='guarded').path)").ok()
    assert reply.stdout.splitlines() == ["main", "None", "guarded.__globals__['lock']"]


def test_dataloader_worker_error_is_explained(kernel):
    # PyTorch is not a dependency: the cell raises the error DataLoader raises
    kernel.run(SETUP).ok()
    reply = kernel.run(
        "dataset = Point()\n"
        "raise RuntimeError('DataLoader worker (pid(s) 4242) exited unexpectedly')")
    assert "mpnb: a DataLoader worker died" in reply.stderr
    assert "dataset (a Point)" in reply.stderr
    assert "num_workers=0" in reply.stderr


# ------------------------------------------------ explain(), no kernel


def test_explain_names_the_missing_attribute():
    error = AttributeError("Can't get attribute 'square' on <module '__main__' (built-in)>")
    note = explain(error)
    assert note is not None and "could not find square" in note and "%%mppool" in note


def test_explain_follows_the_cause_and_ignores_other_errors():
    try:
        try:
            raise pickle.PicklingError("Can't pickle <function <lambda>>")
        except pickle.PicklingError as inner:
            raise ValueError("while sending") from inner
    except ValueError as outer:
        note = explain(outer)
    assert note is not None and "mpnb.diagnose(obj)" in note
    assert explain(BrokenProcessPool("x"), ["f"]).count("This cell uses f,") == 1
    assert explain(KeyError("x")) is None
    assert explain(TypeError("unsupported operand")) is None


def test_fork_message_lists_threads():
    text = fork_message(["IOPub", "Heartbeat"])
    assert "2 other threads run (IOPub, Heartbeat)" in text
