# The helpers below are copied, trimmed, from CPython 3.13's test suite
# (Lib/test/support/__init__.py, Lib/test/support/script_helper.py,
# Lib/test/_test_multiprocessing.py, Lib/test/test_concurrent_futures/util.py).
#
# Copyright (c) 2001-2024 Python Software Foundation; All Rights Reserved.
# Licensed under the PSF License Agreement, version 2
# (https://docs.python.org/3/license.html#psf-license).
#
# ``test.support`` ships only inside the interpreter's own tree (many
# distributions leave it out), so the ported tests use these copies instead.
"""The few CPython test helpers the ported Pool and Executor tests use."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import subprocess
import sys
import time
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING, Future

# test.support: timeouts as CPython sets them by default
SHORT_TIMEOUT = 30.0
LONG_TIMEOUT = 5 * 60.0
# test.support.PIPE_MAX_SIZE: larger than a pipe's buffer on every platform
PIPE_MAX_SIZE = 4 * 1024 * 1024 + 1

# _test_multiprocessing: CHECK_TIMINGS is False there, and so here
DELTA = 0.1
TIMEOUT1, TIMEOUT2, TIMEOUT3 = 0.1, 0.1, 0.1


def gc_collect():
    """test.support.gc_collect: collect until nothing more goes."""
    gc.collect()
    gc.collect()
    gc.collect()


@contextlib.contextmanager
def captured_output(stream_name):
    """test.support.captured_output: swap sys.<stream_name> for a StringIO."""
    orig_stdout = getattr(sys, stream_name)
    setattr(sys, stream_name, io.StringIO())
    try:
        yield getattr(sys, stream_name)
    finally:
        setattr(sys, stream_name, orig_stdout)


def captured_stderr():
    return captured_output("stderr")


def sleeping_retry(timeout, err_msg=None, /, *, init_delay=0.010, max_delay=1.0, error=True):
    """test.support.sleeping_retry: yield until the caller breaks out, sleeping
    longer each time; fail after ``timeout`` seconds."""
    delay = init_delay
    deadline = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() >= deadline:
            if error:
                msg = "timeout" if err_msg is None else f"timeout ({err_msg})"
                raise AssertionError(msg)
            break
        time.sleep(delay)
        delay = min(delay * 2, max_delay)


def assert_python_ok(*args, env=None):
    """script_helper.assert_python_ok: run ``python *args``; fail unless it
    exits with 0.  Returns (rc, stdout, stderr) as bytes.

    Not isolated (-I) as CPython's is, so that the child imports the same
    mpnb as the tests; ``env`` is added to this process's environment."""
    cmd = [sys.executable, "-X", "faulthandler", *args]
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, env=full_env, timeout=LONG_TIMEOUT)
    if proc.returncode != 0:
        raise AssertionError(
            f"Process return code is {proc.returncode}\ncommand line: {cmd!r}\n\n"
            f"stdout:\n---\n{proc.stdout.decode(errors='replace')}\n---\n\n"
            f"stderr:\n---\n{proc.stderr.decode(errors='replace')}\n---"
        )
    return proc.returncode, proc.stdout, proc.stderr


class TimingWrapper:
    """_test_multiprocessing.TimingWrapper: call ``func`` and keep how long it took."""

    def __init__(self, func):
        self.func = func
        self.elapsed = None

    def __call__(self, *args, **kwds):
        t = time.monotonic()
        try:
            return self.func(*args, **kwds)
        finally:
            self.elapsed = time.monotonic() - t


# test_concurrent_futures/util.py: futures in a given state, no executor behind them
def create_future(state=PENDING, exception=None, result=None):
    f = Future()
    f._state = state
    f._exception = exception
    f._result = result
    return f


PENDING_FUTURE = create_future(state=PENDING)
RUNNING_FUTURE = create_future(state=RUNNING)
CANCELLED_FUTURE = create_future(state=CANCELLED)
CANCELLED_AND_NOTIFIED_FUTURE = create_future(state=CANCELLED_AND_NOTIFIED)
EXCEPTION_FUTURE = create_future(state=FINISHED, exception=OSError())
SUCCESSFUL_FUTURE = create_future(state=FINISHED, result=42)


# test_concurrent_futures/test_shutdown.py: a task the shutdown scripts submit;
# here so that a child interpreter imports it without importing pytest
def sleep_and_print(t, msg):
    time.sleep(t)
    print(msg)
    sys.stdout.flush()


def shut_down_open_pools(keep=()):
    """Shut down every ``mpnb.Pool`` a test left open, as CPython's tearDown
    reaps the children a failed test leaves; what a shut-down pool leaves
    behind is still the tag fixture's to find."""
    import mpnb

    for obj in gc.get_objects():
        if isinstance(obj, mpnb.Pool) and not obj.closed and not any(obj is k for k in keep):
            obj.shutdown(wait=True, cancel_futures=True)


# CPython's task function of _test_multiprocessing, here rather than in the
# test module so that the workers that unpickle it import only this light
# module, not pytest and the kernel helpers the test module imports (a pool
# that replaces its workers, maxtasksperchild, pays that at every start)
def sqr(x, wait=0.0, event=None):
    if event is None:
        time.sleep(wait)
    else:
        event.wait(wait)
    return x*x
