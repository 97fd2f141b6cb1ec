"""mpnb.Pool in a real Jupyter kernel: cell functions, output, interrupts,
kernel shutdown, restart and SIGKILL.  Each test checks with psutil (the
``tag`` fixture) that no process is left."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from kernel import Kernel, assert_no_leftovers, cell_text, notebook_errors, run_notebook

pytestmark = pytest.mark.kernel

SETUP = """
import os, time, logging, warnings
import mpnb
pool = mpnb.Pool(2)
pool.map(abs, range(4))   # workers warm
"""

SLOW = """
def slow(x):
    time.sleep(0.4)
    return x
"""

ENDLESS = """
def endless(x):
    while True:
        pass
futures = [pool.submit(endless, i) for i in range(2)]
time.sleep(1.0)
print(sorted(pool.pids))
"""


def _worker_pids(kernel: Kernel) -> list[int]:
    reply = kernel.run("print(sorted(pool.pids))").ok()
    return eval(reply.stdout.strip())


def test_cell_functions_print_into_their_cell_once_in_order(kernel):
    kernel.run(SETUP).ok()
    reply = kernel.run(
        "def chatty(x):\n"
        "    print(f'line {x}')\n"
        "    logging.getLogger('cell').warning('logged %s', x)\n"
        "    warnings.warn(f'careful {x}')\n"
        "    return x * 10\n"
        "pool.map(chatty, range(8), chunksize=1)\n"
    ).ok()
    assert reply.stdout.splitlines() == [f"line {i}" for i in range(8)]
    for i in range(8):
        assert reply.stderr.count(f"logged {i}") == 1
    assert "careful 0" in reply.stderr
    assert reply.results == [str([i * 10 for i in range(8)])]
    later = kernel.run("print('next cell')").ok()
    assert later.stdout == "next cell\n", "worker output must not leak into later cells"


def test_exception_shows_cell_source_and_task(kernel):
    kernel.run(SETUP).ok()
    reply = kernel.run("def inverse(x):\n    return 1 / (x - 2)\npool.map(inverse, range(5))\n")
    assert reply.status == "error" and reply.ename == "ZeroDivisionError"
    assert "return 1 / (x - 2)" in reply.traceback
    assert "task 2 (argument 2)" in reply.traceback
    # what ended before the failure is kept, each task's own result; which
    # tasks those are depends on the workers' timing (a task of the same
    # worker ran before task 2, so there is at least one)
    kept = kernel.run(
        "kept = {i: r for i, r in enumerate(pool.last_results) if not isinstance(r, BaseException)}\n"
        "print(len(kept) >= 1, all(r == 1 / (i - 2) for i, r in kept.items()))"
    ).ok()
    assert kept.stdout == "True True\n", kept.stdout


def _interrupt_and_check(kernel: Kernel, send_interrupt) -> None:
    kernel.run(SETUP + SLOW).ok()
    msg_id = kernel.submit("pool.map(slow, range(40), chunksize=1)")
    time.sleep(2.0)
    sent = time.monotonic()
    send_interrupt()
    reply = kernel.collect(msg_id, timeout=30)
    assert time.monotonic() - sent < 2.5, "control must return within about 2 s"
    assert reply.status == "error" and reply.ename == "KeyboardInterrupt"
    after = kernel.run(
        "done = [r for r in pool.last_results if not isinstance(r, BaseException)]\n"
        "print(len(done) > 0, done == list(range(len(done))))\n"
        "print([row.state for row in pool.monitor.snapshot() if row.state == 'busy'])\n"
        "print(pool.map(abs, [-1, -2]))\n"
    ).ok()
    assert after.stdout.splitlines() == ["True True", "[]", "[1, 2]"]


def test_interrupt_returns_quickly_and_keeps_results(kernel):
    _interrupt_and_check(kernel, kernel.interrupt)


def test_interrupt_to_the_process_group(kernel):
    pgid = os.getpgid(kernel.pid)
    if pgid != kernel.pid or pgid == os.getpgid(0):
        pytest.skip("the kernel does not lead its own process group here")
    _interrupt_and_check(kernel, lambda: os.killpg(pgid, signal.SIGINT))


def test_kernel_shutdown_leaves_no_worker(tag):
    kernel = Kernel(tag)
    try:
        kernel.run(SETUP + ENDLESS).ok()
    finally:
        kernel.shutdown()
    assert_no_leftovers(tag, within=5)


def test_kernel_sigkill_leaves_no_worker(tag):
    kernel = Kernel(tag)
    kernel.run(SETUP + ENDLESS).ok()
    kernel.kill()
    assert_no_leftovers(tag, within=5)


def test_kernel_restart_leaves_no_worker(kernel):
    kernel.run(SETUP + ENDLESS).ok()
    pids = _worker_pids(kernel)
    assert len(pids) == 2
    procs = [psutil.Process(p) for p in pids]
    kernel.restart()
    gone, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"workers outlived the restart: {alive}"


def test_pool_tour_notebook_runs_green(tag):
    nb = run_notebook("pool_tour.ipynb", tag=tag, timeout=180)
    assert notebook_errors(nb) == []
    text = "".join(cell_text(c) for c in nb.cells if c.cell_type == "code")
    assert "TaskTimeoutError" in text and "WorkerCrashedError" in text
    assert "hello from task 0" in text
