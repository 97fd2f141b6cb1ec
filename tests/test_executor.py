"""mpnb.Pool keeps the ``concurrent.futures`` Executor contract.

``shutdown(cancel_futures=True)`` cancels the futures that have not started;
a plain script's exit waits for the work it submitted, while a kernel's
shutdown or restart still stops everything at once; ``imap`` yields the
results before an input iterator's error, then raises it.  Every test that
starts processes carries the ``tag`` fixture: no process may be left.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mpnb
from kernel import TAG_VAR, Kernel, assert_no_leftovers, wait_until

# generous: these wait for conditions, never for a speed
DEADLINE = 60.0


def wait_for_file(path: str) -> str:
    """Block until ``path`` exists (the test creates it), at most DEADLINE s."""
    deadline = time.monotonic() + DEADLINE
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)
    return path


def touch(path: str) -> str:
    Path(path).touch()
    return path


def square(x: int) -> int:
    return x * x


# ------------------------------------------------------------ cancel_futures


def test_shutdown_with_cancel_futures_cancels_pending_futures(tag, tmp_path):
    release = str(tmp_path / "release")
    pool = mpnb.Pool(1, live=False, env={TAG_VAR: tag})
    try:
        running = pool.submit(wait_for_file, release)
        wait_until(running.running, "the first task starts")
        pending = [pool.submit(touch, str(tmp_path / f"pending-{i}")) for i in range(3)]
        pool.shutdown(wait=False, cancel_futures=True)
        # (not cf.wait: a future cancelled by shutdown is not "notified", in
        # concurrent.futures too, so wait() would sit out its timeout)
        wait_until(lambda: all(f.cancelled() for f in pending), "the pending futures are cancelled")
        with pytest.raises(cf.CancelledError):
            pending[0].result(timeout=0)
        assert not running.cancelled(), "a running future is not cancelled"
        Path(release).touch()
        assert running.result(timeout=DEADLINE) == release
    finally:
        Path(release).touch()
        pool.shutdown(wait=True)
    assert not list(tmp_path.glob("pending-*")), "a cancelled future's task ran"


# ------------------------------------------------------------ exit of a script

SCRIPT = """
import sys, time, mpnb

def write(path):
    time.sleep(0.5)  # still queued when the script reaches its end
    with open(path, "w") as f:
        f.write("done")
    return path

if __name__ == "__main__":
    pool = mpnb.Pool(1, live=False)
    futures = [pool.submit(write, f"{sys.argv[1]}/task-{i}") for i in range(3)]
    print("submitted", flush=True)
"""


def test_script_exit_waits_for_pending_futures(tag, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, **{TAG_VAR: tag})
    done = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "submitted"
    assert sorted(p.name for p in out.iterdir()) == ["task-0", "task-1", "task-2"], done.stderr


KERNEL_WORK = """
import os, time, mpnb
pool = mpnb.Pool(1, live=False)
out = {out!r}

def hold(path):
    # out of the kernel's process group, so that ipykernel's own clean-up
    # of its children does not reach this worker: only the pool stops it
    os.setpgid(0, 0)
    open(path, "w").close()
    time.sleep(600)

def write(path):
    open(path, "w").close()

running = pool.submit(hold, os.path.join(out, "running"))
pending = [pool.submit(write, os.path.join(out, f"pending-{{i}}")) for i in range(3)]
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(out, "running")) and time.monotonic() < deadline:
    time.sleep(0.02)
print(os.path.exists(os.path.join(out, "running")))
"""


@pytest.mark.kernel
@pytest.mark.parametrize("how", ["shutdown", "restart"])
def test_kernel_shutdown_and_restart_still_stop_pending_work(tag, tmp_path, how):
    out = tmp_path / "out"
    out.mkdir()
    kernel = Kernel(tag)
    try:
        # the kernel must end by itself, however busy the machine: a pool that
        # waited for its work would keep it alive until the manager kills it
        kernel.km.shutdown_wait_time = DEADLINE
        reply = kernel.run(KERNEL_WORK.format(out=str(out))).ok()
        assert reply.stdout.strip() == "True", "the first task started"
        process = kernel.km.provisioner.process
        if how == "restart":
            kernel.restart()
            kernel.run("print('back')").ok()
        else:
            kernel.shutdown()
        assert process.wait(timeout=DEADLINE) == 0, "the kernel was killed instead of exiting"
    finally:
        kernel.shutdown()
    assert_no_leftovers(tag, within=30)
    assert sorted(p.name for p in out.iterdir()) == ["running"], "pending tasks ran"


# ------------------------------------------------------------ imap input errors


def items_then_error():
    yield from range(5)
    raise ValueError("the input broke after 5 items")


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 2])
def test_imap_yields_results_before_an_input_error_then_raises_it(tag, method, chunksize):
    with mpnb.Pool(2, live=False, env={TAG_VAR: tag}) as pool:
        got = []
        with pytest.raises(ValueError, match="the input broke after 5 items"):
            for value in getattr(pool, method)(square, items_then_error(), chunksize=chunksize):
                got.append(value)
        expected = [x * x for x in range(5)]
        assert (got if method == "imap" else sorted(got)) == expected
        assert pool.map(square, [3]) == [9], "the pool still serves"
