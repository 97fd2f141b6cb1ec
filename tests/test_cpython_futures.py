"""CPython 3.13's tests of ``concurrent.futures.ProcessPoolExecutor``, run
against ``mpnb.Pool``.

Ported from ``Lib/test/test_concurrent_futures/`` (``executor.py``,
``test_process_pool.py``, ``test_shutdown.py``, ``test_wait.py``,
``test_as_completed.py``, ``test_init.py``, ``test_deadlock.py``), Copyright
(c) 2001-2024 Python Software Foundation, PSF License Agreement version 2.
The assertions are CPython's; ``executor_type`` is ``mpnb.Pool``, made with the
same arguments (``max_workers=``, ``mp_context=``, ``max_tasks_per_child=``,
``initializer=``, ``initargs=``).  The classes run with the ``spawn`` context,
as CPython's ``ProcessPoolSpawn*Test`` classes do.  Every process a test starts
carries its ``tag`` (tests/conftest.py), so a worker left behind fails it.

Tests not run as CPython wrote them:

| test | how | why |
|---|---|---|
| ``ExecutorTest.test_map_exception`` | skipped | documented difference: ``map`` returns a list, not an iterator (the test calls ``__next__``) |
| ``ExecutorTest.test_map_timeout`` | skipped | documented difference: ``map``'s ``timeout`` is per task and ``map`` returns a list, not a total wait over an iterator |
| ``ExecutorTest.test_free_reference`` | skipped | documented difference: ``map`` returns a list (and ``pool.last_results`` keeps it), so results stay referenced |
| ``ProcessPoolExecutorTest.test_killed_child`` | skipped | documented difference: a worker that dies fails only its task (``WorkerCrashedError``, a ``BrokenProcessPool``); the pool replaces it and keeps serving; also reads ``_processes`` |
| ``ProcessPoolExecutorTest.test_traceback`` | skipped | asserts the private class ``concurrent.futures.process._RemoteTraceback`` |
| ``ProcessPoolExecutorTest.test_idle_process_reuse_one``, ``_multiple`` | skipped | read ``_processes`` to count workers started on demand; mpnb starts all its workers at construction |
| ``ProcessPoolExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context`` | skipped | reads the private ``_mp_context``; mpnb's default start method is its own launcher (documented) |
| ``ProcessPoolExecutorTest.test_python_finalization_error`` | skipped | patches ``threading._start_joinable_thread`` to break the executor's internal thread |
| ``ProcessPoolExecutorTest.test_max_workers_too_large`` | skipped on this platform | Windows only, as in CPython |
| ``ProcessPoolExecutorTest.test_saturation`` | adapted | ``_max_workers`` reads ``workers``; ``len(_processes)`` reads ``len(pids)`` once the pool's workers are alive (up to 30 s) |
| ``ProcessPoolExecutorTest.test_max_tasks_per_child`` | adapted | ``len(executor._processes)`` reads ``executor.workers`` |
| ``ProcessPoolShutdownTest.test_processes_terminate`` | skipped | reads ``_processes`` to count workers started on demand (3 of 5); mpnb starts all its workers at construction |
| ``ProcessPoolShutdownTest.test_context_manager_shutdown``, ``test_del_shutdown``, ``test_shutdown_no_wait`` | adapted | ``_processes``, ``_call_queue`` and ``_executor_manager_thread`` are joined by waiting (up to 30 s) for the processes in ``pids`` to end |
| ``ExecutorShutdownTest.test_submit_after_interpreter_shutdown`` (and the two skipped above) | adapted | the child script imports ``Pool`` from ``mpnb`` and ``sleep_and_print`` from ``cpython_support``; ``test_hang_gh83386``'s script also imports ``multiprocessing``, which it names (CPython skips this test for ``ProcessPoolExecutor``, which hangs; mpnb does not) |
| ``ExecutorShutdownTest.test_hang_gh94440`` | adapted | the alarm is 60 s, not 5 s: a deadline on a busy machine |
| ``ExecutorShutdownTest.test_cancel_futures`` | skipped | documented difference: ``shutdown(cancel_futures=True)`` cancels every future whose task has not started; while the spawn workers are still starting that is all 50, and the test wants at least one to finish (CPython keeps the few already queued to workers) |
| ``ExecutorShutdownTest.test_interpreter_shutdown``, ``test_hang_gh83386`` | skipped | documented difference: what a task prints is shown in the caller when its result is fetched; the child script exits 0 and its task runs (checked by hand: a task writing a file does write it), but ``apple`` is never printed |
| ``ProcessPoolExecutorTest.test_ressources_gced_in_workers`` | adapted | waits up to 30 s, not 1 s, for the worker's release of the argument to reach the Manager's event on a busy machine |
| ``WaitTests.test_first_completed`` | adapted | the second task sleeps 10 s, not 1.5 s: the worker of the first loads this test module (and pytest) before its task, which took longer than 1.5 s on a busy machine |
| ``WaitTests.test_first_exception`` | adapted | the third task sleeps 10 s, not 3 s: its margin over the failing 1.5 s task was lost once when the spawn workers started unevenly |
| ``FailingInitializerMixin.test_initializer`` | adapted | waits until ``submit`` raises ``BrokenExecutor`` instead of reading the private ``_broken`` |
| ``FailingInitializerResourcesTest`` | not ported | stops ``multiprocessing``'s private resource tracker to read its exit code |
| ``ExecutorDeadlockTest._fail_on_deadlock`` | adapted | kills the processes in ``pids``, not ``_processes`` |
| ``ExecutorDeadlockTest.test_shutdown_deadlock_pickle`` | adapted | does not join the private ``_executor_manager_thread`` |
| ``ExecutorDeadlockTest.test_gh105829_should_not_deadlock_if_wakeup_pipe_full`` | skipped | patches ``ProcessPoolExecutor``'s private ``_ExecutorManagerThread`` and ``_ThreadWakeup`` |
| ``ExecutorDeadlockTest.test_exit_at_task_unpickle``, ``test_error_at_task_unpickle``, ``test_error_during_result_unpickle_in_result_handler``, ``test_exit_during_result_unpickle_in_result_handler`` | skipped | documented difference: what cannot be loaded on the other side fails that task alone, with an error that names it; CPython breaks the whole pool |
| ``ExecutorDeadlockTest.test_exit_during_result_pickle_on_worker`` | skipped | documented difference: a result whose pickling raises (``SystemExit`` too) fails its task with the pickle doctor's ``PicklingError``, the ``SystemExit`` as its cause |
| ``FailingInitializerMixin.test_initializer`` (replaces the row above) | skipped | documented difference: a failing initializer fails the waiting work; new work starts workers again, so the pool never stays broken |
| ``test_future.py`` | not ported | tests ``Future`` objects on their own; no executor |
| ``ThreadPool*`` classes, ``test_thread_pool.py`` | not ported | ``ThreadPoolExecutor`` |
| ``ProcessPoolFork*`` classes | not ported | documented difference: mpnb never forks |
| ``ProcessPoolForkserver*`` classes | not ported | forkserver workers inherit the fork server's environment, not the test's tag, so leftovers could not be checked; the spawn classes run the same tests |

``support.requires_resource('walltime')`` and ``support.cpython_only`` tests run.
"""

import contextlib
import itertools
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import unittest
import weakref
from concurrent import futures
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED, BrokenExecutor, Future
from concurrent.futures.process import BrokenProcessPool
from logging.handlers import QueueHandler
from multiprocessing import resource_tracker
from pickle import PicklingError

import logging
import psutil
import pytest

import mpnb
from cpython_support import (
    CANCELLED_AND_NOTIFIED_FUTURE,
    CANCELLED_FUTURE,
    EXCEPTION_FUTURE,
    LONG_TIMEOUT,
    PENDING_FUTURE,
    PIPE_MAX_SIZE,
    RUNNING_FUTURE,
    SHORT_TIMEOUT,
    SUCCESSFUL_FUTURE,
    assert_python_ok,
    captured_stderr,
    create_future,
    gc_collect,
    shut_down_open_pools,
    sleeping_retry,
)
from kernel import TAG_VAR

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", autouse=True)
def _resource_tracker():
    """multiprocessing's resource tracker is one process for the whole test run,
    started by the first spawn: start it before any test's tag is set, so that
    it does not count as that test's leftover."""
    resource_tracker.ensure_running()


@pytest.fixture(autouse=True)
def _tagged(request, tag, monkeypatch):
    """Every process a test starts inherits its tag from this environment."""
    monkeypatch.setenv(TAG_VAR, tag)
    yield
    # a test that failed half-way leaves its pool open; a later test must
    # not see that pool's workers
    shut_down_open_pools(keep=())


def wait_for_pids(pool, n):
    """The pids of ``pool``'s workers once ``n`` of them are alive."""
    for _ in sleeping_retry(SHORT_TIMEOUT, f"{n} workers alive"):
        pids = pool.pids
        if len(pids) == n:
            return pids


def join_pids(pids):
    """Wait (up to SHORT_TIMEOUT) for these processes to end, as ``p.join()`` does."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=SHORT_TIMEOUT)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive


# ------------------------------------------------------------------ util.py


class BaseTestCase(unittest.TestCase):
    # CPython's setUp/tearDown check for dangling threads and reap children;
    # here the tag fixture checks that no process is left
    pass


class ExecutorMixin:
    worker_count = 5
    executor_kwargs = {}

    def setUp(self):
        super().setUp()

        self.t1 = time.monotonic()
        if hasattr(self, "ctx"):
            self.executor = self.executor_type(
                max_workers=self.worker_count,
                mp_context=self.get_context(),
                **self.executor_kwargs)
        else:
            self.executor = self.executor_type(
                max_workers=self.worker_count,
                **self.executor_kwargs)

    def tearDown(self):
        self.executor.shutdown(wait=True)
        self.executor = None

        dt = time.monotonic() - self.t1
        self.assertLess(dt, 300, "synchronization issue: test lasted too long")

        super().tearDown()

    def get_context(self):
        return multiprocessing.get_context(self.ctx)


class ProcessPoolSpawnMixin(ExecutorMixin):
    executor_type = mpnb.Pool
    ctx = "spawn"


def create_executor_tests(remote_globals, mixin, bases=(BaseTestCase,),
                          executor_mixins=(ProcessPoolSpawnMixin,)):
    def strip_mixin(name):
        if name.endswith(('Mixin', 'Tests')):
            return name[:-5]
        elif name.endswith('Test'):
            return name[:-4]
        else:
            return name

    module = remote_globals['__name__']
    for exe in executor_mixins:
        name = ("%s%sTest"
                % (strip_mixin(exe.__name__), strip_mixin(mixin.__name__)))
        cls = type(name, (mixin,) + (exe,) + bases, {'__module__': module})
        remote_globals[name] = cls


# ------------------------------------------------------------------ executor.py


def mul(x, y):
    return x * y

def capture(*args, **kwargs):
    return args, kwargs


class MyObject(object):
    def my_method(self):
        pass


def make_dummy_object(_):
    return MyObject()


class ExecutorTest:
    # Executor.shutdown() and context manager usage is tested by
    # ExecutorShutdownTest.
    def test_submit(self):
        future = self.executor.submit(pow, 2, 8)
        self.assertEqual(256, future.result())

    def test_submit_keyword(self):
        future = self.executor.submit(mul, 2, y=8)
        self.assertEqual(16, future.result())
        future = self.executor.submit(capture, 1, self=2, fn=3)
        self.assertEqual(future.result(), ((1,), {'self': 2, 'fn': 3}))
        with self.assertRaises(TypeError):
            self.executor.submit(fn=capture, arg=1)
        with self.assertRaises(TypeError):
            self.executor.submit(arg=1)

    def test_map(self):
        self.assertEqual(
                list(self.executor.map(pow, range(10), range(10))),
                list(map(pow, range(10), range(10))))

        self.assertEqual(
                list(self.executor.map(pow, range(10), range(10), chunksize=3)),
                list(map(pow, range(10), range(10))))

    @pytest.mark.skip(reason="documented difference: map returns a list, not an iterator")
    def test_map_exception(self):
        i = self.executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
        self.assertEqual(i.__next__(), (0, 1))
        self.assertEqual(i.__next__(), (0, 1))
        self.assertRaises(ZeroDivisionError, i.__next__)

    @pytest.mark.skip(reason="documented difference: map's timeout is per task, and map returns a list")
    def test_map_timeout(self):
        results = []
        try:
            for i in self.executor.map(time.sleep,
                                       [0, 0, 6],
                                       timeout=5):
                results.append(i)
        except futures.TimeoutError:
            pass
        else:
            self.fail('expected TimeoutError')

        self.assertEqual([None, None], results)

    def test_shutdown_race_issue12456(self):
        # Issue #12456: race condition at shutdown where trying to post a
        # sentinel in the call queue blocks (the queue is full while processes
        # have exited).
        self.executor.map(str, [2] * (self.worker_count + 1))
        self.executor.shutdown()

    def test_no_stale_references(self):
        # Issue #16284: check that the executors don't unnecessarily hang onto
        # references.
        my_object = MyObject()
        my_object_collected = threading.Event()
        def set_event():
            my_object_collected.set()
        my_object_callback = weakref.ref(my_object, lambda obj: set_event())
        # Deliberately discarding the future.
        self.executor.submit(my_object.my_method)
        del my_object

        collected = my_object_collected.wait(timeout=SHORT_TIMEOUT)
        self.assertTrue(collected,
                        "Stale reference not collected within timeout.")

    def test_max_workers_negative(self):
        for number in (0, -1):
            with self.assertRaisesRegex(ValueError,
                                        "max_workers must be greater "
                                        "than 0"):
                self.executor_type(max_workers=number)

    @pytest.mark.skip(reason="documented difference: map returns a list (kept in pool.last_results), "
                             "which holds the results")
    def test_free_reference(self):
        # Issue #14406: Result iterator should not keep an internal
        # reference to result objects.
        for obj in self.executor.map(make_dummy_object, range(10)):
            wr = weakref.ref(obj)
            del obj
            gc_collect()  # For PyPy or other GCs.
            self.assertIsNone(wr())


# ------------------------------------------------------------------ test_process_pool.py


class EventfulGCObj():
    def __init__(self, mgr):
        self.event = mgr.Event()

    def __del__(self):
        self.event.set()


class ProcessPoolExecutorTest(ExecutorTest):

    @unittest.skipUnless(sys.platform=='win32', 'Windows-only process limit')
    def test_max_workers_too_large(self):
        with self.assertRaisesRegex(ValueError,
                                    "max_workers must be <= 61"):
            self.executor_type(max_workers=62)

    @pytest.mark.skip(reason="documented difference: a worker that dies fails only its task; the pool "
                             "replaces it and keeps serving (also reads the private _processes)")
    def test_killed_child(self):
        # When a child process is abruptly terminated, the whole pool gets
        # "broken".
        futures = [self.executor.submit(time.sleep, 3)]
        # Get one of the processes, and terminate (kill) it
        p = next(iter(self.executor._processes.values()))
        p.terminate()
        for fut in futures:
            self.assertRaises(BrokenProcessPool, fut.result)
        # Submitting other jobs fails as well.
        self.assertRaises(BrokenProcessPool, self.executor.submit, pow, 2, 8)

    def test_map_chunksize(self):
        def bad_map():
            list(self.executor.map(pow, range(40), range(40), chunksize=-1))

        ref = list(map(pow, range(40), range(40)))
        self.assertEqual(
            list(self.executor.map(pow, range(40), range(40), chunksize=6)),
            ref)
        self.assertEqual(
            list(self.executor.map(pow, range(40), range(40), chunksize=50)),
            ref)
        self.assertEqual(
            list(self.executor.map(pow, range(40), range(40), chunksize=40)),
            ref)
        self.assertRaises(ValueError, bad_map)

    @classmethod
    def _test_traceback(cls):
        raise RuntimeError(123) # some comment

    @pytest.mark.skip(reason="asserts the private class concurrent.futures.process._RemoteTraceback")
    def test_traceback(self):
        # We want ensure that the traceback from the child process is
        # contained in the traceback raised in the main process.
        future = self.executor.submit(self._test_traceback)
        with self.assertRaises(Exception) as cm:
            future.result()

        exc = cm.exception
        self.assertIs(type(exc), RuntimeError)
        self.assertEqual(exc.args, (123,))
        cause = exc.__cause__
        self.assertIs(type(cause), futures.process._RemoteTraceback)
        self.assertIn('raise RuntimeError(123) # some comment', cause.tb)

        with captured_stderr() as f1:
            try:
                raise exc
            except RuntimeError:
                sys.excepthook(*sys.exc_info())
        self.assertIn('raise RuntimeError(123) # some comment',
                      f1.getvalue())

    def test_ressources_gced_in_workers(self):
        # Ensure that argument for a job are correctly gc-ed after the job
        # is finished
        mgr = self.get_context().Manager()
        obj = EventfulGCObj(mgr)
        future = self.executor.submit(id, obj)
        future.result()

        self.assertTrue(obj.event.wait(timeout=30))  # widened from 1 s: the event crosses a Manager on a busy machine

        # explicitly destroy the object to ensure that EventfulGCObj.__del__()
        # is called while manager is still running.
        gc_collect()
        obj = None
        gc_collect()

        mgr.shutdown()
        mgr.join()

    def test_saturation(self):
        executor = self.executor
        mp_context = self.get_context()
        sem = mp_context.Semaphore(0)
        job_count = 15 * executor.workers  # adapted: executor._max_workers
        for _ in range(job_count):
            executor.submit(sem.acquire)
        # adapted: len(executor._processes), executor._max_workers
        self.assertEqual(len(wait_for_pids(executor, executor.workers)), executor.workers)
        for _ in range(job_count):
            sem.release()

    @pytest.mark.skip(reason="reads _processes to count workers started on demand; "
                             "mpnb starts all its workers at construction")
    def test_idle_process_reuse_one(self):
        executor = self.executor
        assert executor._max_workers >= 4
        executor.submit(mul, 21, 2).result()
        executor.submit(mul, 6, 7).result()
        executor.submit(mul, 3, 14).result()
        self.assertEqual(len(executor._processes), 1)

    @pytest.mark.skip(reason="reads _processes to count workers started on demand; "
                             "mpnb starts all its workers at construction")
    def test_idle_process_reuse_multiple(self):
        executor = self.executor
        assert executor._max_workers <= 5
        executor.submit(mul, 12, 7).result()
        executor.submit(mul, 33, 25)
        executor.submit(mul, 25, 26).result()
        executor.submit(mul, 18, 29)
        executor.submit(mul, 1, 2).result()
        executor.submit(mul, 0, 9)
        self.assertLessEqual(len(executor._processes), 3)
        executor.shutdown()

    def test_max_tasks_per_child(self):
        context = self.get_context()
        if context.get_start_method(allow_none=False) == "fork":
            with self.assertRaises(ValueError):
                self.executor_type(1, mp_context=context, max_tasks_per_child=3)
            return
        # not using self.executor as we need to control construction.
        # arguably this could go in another class w/o that mixin.
        executor = self.executor_type(
                1, mp_context=context, max_tasks_per_child=3)
        f1 = executor.submit(os.getpid)
        original_pid = f1.result()
        # The worker pid remains the same as the worker could be reused
        f2 = executor.submit(os.getpid)
        self.assertEqual(f2.result(), original_pid)
        self.assertEqual(executor.workers, 1)  # adapted: len(executor._processes)
        f3 = executor.submit(os.getpid)
        self.assertEqual(f3.result(), original_pid)

        # A new worker is spawned, with a statistically different pid,
        # while the previous was reaped.
        f4 = executor.submit(os.getpid)
        new_pid = f4.result()
        self.assertNotEqual(original_pid, new_pid)
        self.assertEqual(executor.workers, 1)  # adapted: len(executor._processes)

        executor.shutdown()

    @pytest.mark.skip(reason="reads the private _mp_context; mpnb's default start method is its own "
                             "launcher (documented)")
    def test_max_tasks_per_child_defaults_to_spawn_context(self):
        executor = self.executor_type(1, max_tasks_per_child=3)
        self.assertEqual(executor._mp_context.get_start_method(), "spawn")

    def test_max_tasks_early_shutdown(self):
        context = self.get_context()
        if context.get_start_method(allow_none=False) == "fork":
            raise unittest.SkipTest("Incompatible with the fork start method.")
        # not using self.executor as we need to control construction.
        # arguably this could go in another class w/o that mixin.
        executor = self.executor_type(
                3, mp_context=context, max_tasks_per_child=1)
        futures = []
        for i in range(6):
            futures.append(executor.submit(mul, i, i))
        executor.shutdown()
        for i, future in enumerate(futures):
            self.assertEqual(future.result(), mul(i, i))

    @pytest.mark.skip(reason="patches threading._start_joinable_thread to break "
                             "ProcessPoolExecutor's internal thread")
    def test_python_finalization_error(self):
        pass


create_executor_tests(globals(), ProcessPoolExecutorTest)

# ------------------------------------------------------------------ test_shutdown.py

# the child scripts find cpython_support here, and mpnb where this process does
SCRIPT_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)}


class ExecutorShutdownTest:
    def test_run_after_shutdown(self):
        self.executor.shutdown()
        self.assertRaises(RuntimeError,
                          self.executor.submit,
                          pow, 2, 5)

    @pytest.mark.skip(reason="documented difference: what a task prints is shown when its result is "
                             "fetched; the task runs at exit, but 'apple' is not printed")
    def test_interpreter_shutdown(self):
        # Test the atexit hook for shutdown of worker threads and processes
        rc, out, err = assert_python_ok('-c', """if 1:
            from mpnb import {executor_type}
            from time import sleep
            from cpython_support import sleep_and_print
            if __name__ == "__main__":
                context = '{context}'
                if context == "":
                    t = {executor_type}(5)
                else:
                    from multiprocessing import get_context
                    context = get_context(context)
                    t = {executor_type}(5, mp_context=context)
                t.submit(sleep_and_print, 1.0, "apple")
            """.format(executor_type=self.executor_type.__name__,
                       context=getattr(self, "ctx", "")), env=SCRIPT_ENV)
        # Errors in atexit hooks don't change the process exit code, check
        # stderr manually.
        self.assertFalse(err)
        self.assertEqual(out.strip(), b"apple")

    def test_submit_after_interpreter_shutdown(self):
        # Test the atexit hook for shutdown of worker threads and processes
        rc, out, err = assert_python_ok('-c', """if 1:
            import atexit
            @atexit.register
            def run_last():
                try:
                    t.submit(id, None)
                except RuntimeError:
                    print("runtime-error")
                    raise
            from mpnb import {executor_type}
            if __name__ == "__main__":
                context = '{context}'
                if not context:
                    t = {executor_type}(5)
                else:
                    from multiprocessing import get_context
                    context = get_context(context)
                    t = {executor_type}(5, mp_context=context)
                    t.submit(id, 42).result()
            """.format(executor_type=self.executor_type.__name__,
                       context=getattr(self, "ctx", "")), env=SCRIPT_ENV)
        # Errors in atexit hooks don't change the process exit code, check
        # stderr manually.
        self.assertIn("RuntimeError: cannot schedule new futures", err.decode())
        self.assertEqual(out.strip(), b"runtime-error")

    def test_hang_issue12364(self):
        fs = [self.executor.submit(time.sleep, 0.1) for _ in range(50)]
        self.executor.shutdown()
        for f in fs:
            f.result()

    @pytest.mark.skip(reason="documented difference: shutdown(cancel_futures=True) cancels every future "
                             "whose task has not started; with workers still starting, that is all 50, "
                             "and the test wants one to finish")
    def test_cancel_futures(self):
        assert self.worker_count <= 5, "test needs few workers"
        fs = [self.executor.submit(time.sleep, .1) for _ in range(50)]
        self.executor.shutdown(cancel_futures=True)
        # We can't guarantee the exact number of cancellations, but we can
        # guarantee that *some* were cancelled. With few workers, many of
        # the submitted futures should have been cancelled.
        cancelled = [fut for fut in fs if fut.cancelled()]
        self.assertGreater(len(cancelled), 20)

        # Ensure the other futures were able to finish.
        # Use "not fut.cancelled()" instead of "fut.done()" to include futures
        # that may have been left in a pending state.
        others = [fut for fut in fs if not fut.cancelled()]
        for fut in others:
            self.assertTrue(fut.done(), msg=f"{fut._state=}")
            self.assertIsNone(fut.exception())

        # Similar to the number of cancelled futures, we can't guarantee the
        # exact number that completed. But, we can guarantee that at least
        # one finished.
        self.assertGreater(len(others), 0)

    @pytest.mark.skip(reason="documented difference: what a task prints is shown when its result is "
                             "fetched; the task runs at exit, but 'apple' is not printed")
    def test_hang_gh83386(self):
        """shutdown(wait=False) doesn't hang at exit with running futures.

        See https://github.com/python/cpython/issues/83386.
        """
        if self.executor_type == futures.ProcessPoolExecutor:
            raise unittest.SkipTest(
                "Hangs, see https://github.com/python/cpython/issues/83386")

        rc, out, err = assert_python_ok('-c', """if True:
            import multiprocessing
            from mpnb import {executor_type}
            from cpython_support import sleep_and_print
            if __name__ == "__main__":
                if {context!r}: multiprocessing.set_start_method({context!r})
                t = {executor_type}(max_workers=3)
                t.submit(sleep_and_print, 1.0, "apple")
                t.shutdown(wait=False)
            """.format(executor_type=self.executor_type.__name__,
                       context=getattr(self, 'ctx', None)), env=SCRIPT_ENV)
        self.assertFalse(err)
        self.assertEqual(out.strip(), b"apple")

    def test_hang_gh94440(self):
        """shutdown(wait=True) doesn't hang when a future was submitted and
        quickly canceled right before shutdown.

        See https://github.com/python/cpython/issues/94440.
        """
        if not hasattr(signal, 'alarm'):
            raise unittest.SkipTest(
                "Tested platform does not support the alarm signal")

        def timeout(_signum, _frame):
            raise RuntimeError("timed out waiting for shutdown")

        kwargs = {}
        if getattr(self, 'ctx', None):
            kwargs['mp_context'] = self.get_context()
        executor = self.executor_type(max_workers=1, **kwargs)
        executor.submit(int).result()
        old_handler = signal.signal(signal.SIGALRM, timeout)
        try:
            signal.alarm(60)  # widened from CPython's 5 s: a busy machine
            executor.submit(int).cancel()
            executor.shutdown(wait=True)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old_handler)


class ProcessPoolShutdownTest(ExecutorShutdownTest):
    @pytest.mark.skip(reason="reads _processes to count workers started on demand (3 of 5); "
                             "mpnb starts all its workers at construction")
    def test_processes_terminate(self):
        pass

    def test_context_manager_shutdown(self):
        with self.executor_type(
                max_workers=5, mp_context=self.get_context()) as e:
            self.assertEqual(list(e.map(abs, range(-5, 5))),
                             [5, 4, 3, 2, 1, 0, 1, 2, 3, 4])
            pids = e.pids  # adapted: processes = e._processes

        join_pids(pids)  # adapted: for p in processes.values(): p.join()

    def test_del_shutdown(self):
        executor = self.executor_type(
                max_workers=5, mp_context=self.get_context())
        res = executor.map(abs, range(-5, 5))
        pids = executor.pids  # adapted: _executor_manager_thread, _processes, _call_queue
        del executor
        gc_collect()  # For PyPy or other GCs.

        # Make sure that all the executor resources were properly cleaned by
        # the shutdown process
        join_pids(pids)  # adapted: joins the manager thread, processes and call queue

        # Make sure the results were all computed before the
        # executor got shutdown.
        assert all([r == abs(v) for r, v in zip(res, range(-5, 5))])

    def test_shutdown_no_wait(self):
        # Ensure that the executor cleans up the processes when calling
        # shutdown with wait=False
        executor = self.executor_type(
                max_workers=5, mp_context=self.get_context())
        res = executor.map(abs, range(-5, 5))
        pids = executor.pids  # adapted: _processes, _call_queue, _executor_manager_thread
        executor.shutdown(wait=False)

        # Make sure that all the executor resources were properly cleaned by
        # the shutdown process
        join_pids(pids)  # adapted: joins the manager thread, processes and call queue

        # Make sure the results were all computed before the executor got
        # shutdown.
        assert all([r == abs(v) for r, v in zip(res, range(-5, 5))])


create_executor_tests(globals(), ProcessPoolShutdownTest)


# ------------------------------------------------------------------ test_wait.py


def sleep_and_raise(t):
    time.sleep(t)
    raise Exception('this is an exception')


class WaitTests:
    def test_20369(self):
        # See https://bugs.python.org/issue20369
        future = self.executor.submit(time.sleep, 1.5)
        done, not_done = futures.wait([future, future],
                            return_when=futures.ALL_COMPLETED)
        self.assertEqual({future}, done)
        self.assertEqual(set(), not_done)


    def test_first_completed(self):
        future1 = self.executor.submit(mul, 21, 2)
        future2 = self.executor.submit(time.sleep, 10)  # widened from 1.5 s: a worker's first task loads this module

        done, not_done = futures.wait(
                [CANCELLED_FUTURE, future1, future2],
                 return_when=futures.FIRST_COMPLETED)

        self.assertEqual(set([future1]), done)
        self.assertEqual(set([CANCELLED_FUTURE, future2]), not_done)

    def test_first_completed_some_already_completed(self):
        future1 = self.executor.submit(time.sleep, 1.5)

        finished, pending = futures.wait(
                 [CANCELLED_AND_NOTIFIED_FUTURE, SUCCESSFUL_FUTURE, future1],
                 return_when=futures.FIRST_COMPLETED)

        self.assertEqual(
                set([CANCELLED_AND_NOTIFIED_FUTURE, SUCCESSFUL_FUTURE]),
                finished)
        self.assertEqual(set([future1]), pending)

    def test_first_exception(self):
        future1 = self.executor.submit(mul, 2, 21)
        future2 = self.executor.submit(sleep_and_raise, 1.5)
        future3 = self.executor.submit(time.sleep, 10)  # widened from 3 s: workers start unevenly on a busy machine

        finished, pending = futures.wait(
                [future1, future2, future3],
                return_when=futures.FIRST_EXCEPTION)

        self.assertEqual(set([future1, future2]), finished)
        self.assertEqual(set([future3]), pending)

    def test_first_exception_some_already_complete(self):
        future1 = self.executor.submit(divmod, 21, 0)
        future2 = self.executor.submit(time.sleep, 1.5)

        finished, pending = futures.wait(
                [SUCCESSFUL_FUTURE,
                 CANCELLED_FUTURE,
                 CANCELLED_AND_NOTIFIED_FUTURE,
                 future1, future2],
                return_when=futures.FIRST_EXCEPTION)

        self.assertEqual(set([SUCCESSFUL_FUTURE,
                              CANCELLED_AND_NOTIFIED_FUTURE,
                              future1]), finished)
        self.assertEqual(set([CANCELLED_FUTURE, future2]), pending)

    def test_first_exception_one_already_failed(self):
        future1 = self.executor.submit(time.sleep, 2)

        finished, pending = futures.wait(
                 [EXCEPTION_FUTURE, future1],
                 return_when=futures.FIRST_EXCEPTION)

        self.assertEqual(set([EXCEPTION_FUTURE]), finished)
        self.assertEqual(set([future1]), pending)

    def test_all_completed(self):
        future1 = self.executor.submit(divmod, 2, 0)
        future2 = self.executor.submit(mul, 2, 21)

        finished, pending = futures.wait(
                [SUCCESSFUL_FUTURE,
                 CANCELLED_AND_NOTIFIED_FUTURE,
                 EXCEPTION_FUTURE,
                 future1,
                 future2],
                return_when=futures.ALL_COMPLETED)

        self.assertEqual(set([SUCCESSFUL_FUTURE,
                              CANCELLED_AND_NOTIFIED_FUTURE,
                              EXCEPTION_FUTURE,
                              future1,
                              future2]), finished)
        self.assertEqual(set(), pending)

    def test_timeout(self):
        short_timeout = 0.050
        long_timeout = short_timeout * 10

        future = self.executor.submit(time.sleep, long_timeout)

        finished, pending = futures.wait(
                [CANCELLED_AND_NOTIFIED_FUTURE,
                 EXCEPTION_FUTURE,
                 SUCCESSFUL_FUTURE,
                 future],
                timeout=short_timeout,
                return_when=futures.ALL_COMPLETED)

        self.assertEqual(set([CANCELLED_AND_NOTIFIED_FUTURE,
                              EXCEPTION_FUTURE,
                              SUCCESSFUL_FUTURE]),
                         finished)
        self.assertEqual(set([future]), pending)


create_executor_tests(globals(), WaitTests)


# ------------------------------------------------------------------ test_as_completed.py


class AsCompletedTests:
    def test_no_timeout(self):
        future1 = self.executor.submit(mul, 2, 21)
        future2 = self.executor.submit(mul, 7, 6)

        completed = set(futures.as_completed(
                [CANCELLED_AND_NOTIFIED_FUTURE,
                 EXCEPTION_FUTURE,
                 SUCCESSFUL_FUTURE,
                 future1, future2]))
        self.assertEqual(set(
                [CANCELLED_AND_NOTIFIED_FUTURE,
                 EXCEPTION_FUTURE,
                 SUCCESSFUL_FUTURE,
                 future1, future2]),
                completed)

    def test_future_times_out(self):
        """Test ``futures.as_completed`` timing out before
        completing it's final future."""
        already_completed = {CANCELLED_AND_NOTIFIED_FUTURE,
                             EXCEPTION_FUTURE,
                             SUCCESSFUL_FUTURE}

        # Windows clock resolution is around 15.6 ms
        short_timeout = 0.100
        for timeout in (0, short_timeout):
            with self.subTest(timeout):

                completed_futures = set()
                future = self.executor.submit(time.sleep, short_timeout * 10)

                try:
                    for f in futures.as_completed(
                        already_completed | {future},
                        timeout
                    ):
                        completed_futures.add(f)
                except futures.TimeoutError:
                    pass

                # Check that ``future`` wasn't completed.
                self.assertEqual(completed_futures, already_completed)

    def test_duplicate_futures(self):
        # Issue 20367. Duplicate futures should not raise exceptions or give
        # duplicate responses.
        # Issue #31641: accept arbitrary iterables.
        future1 = self.executor.submit(time.sleep, 2)
        completed = [
            f for f in futures.as_completed(itertools.repeat(future1, 3))
        ]
        self.assertEqual(len(completed), 1)

    def test_free_reference_yielded_future(self):
        # Issue #14406: Generator should not keep references
        # to finished futures.
        futures_list = [Future() for _ in range(8)]
        futures_list.append(create_future(state=CANCELLED_AND_NOTIFIED))
        futures_list.append(create_future(state=FINISHED, result=42))

        with self.assertRaises(futures.TimeoutError):
            for future in futures.as_completed(futures_list, timeout=0):
                futures_list.remove(future)
                wr = weakref.ref(future)
                del future
                gc_collect()  # For PyPy or other GCs.
                self.assertIsNone(wr())

        futures_list[0].set_result("test")
        for future in futures.as_completed(futures_list):
            futures_list.remove(future)
            wr = weakref.ref(future)
            del future
            gc_collect()  # For PyPy or other GCs.
            self.assertIsNone(wr())
            if futures_list:
                futures_list[0].set_result("test")

    def test_correct_timeout_exception_msg(self):
        futures_list = [CANCELLED_AND_NOTIFIED_FUTURE, PENDING_FUTURE,
                        RUNNING_FUTURE, SUCCESSFUL_FUTURE]

        with self.assertRaises(futures.TimeoutError) as cm:
            list(futures.as_completed(futures_list, timeout=0))

        self.assertEqual(str(cm.exception), '2 (of 4) futures unfinished')


create_executor_tests(globals(), AsCompletedTests)

# ------------------------------------------------------------------ test_init.py


INITIALIZER_STATUS = 'uninitialized'

def init(x):
    global INITIALIZER_STATUS
    INITIALIZER_STATUS = x

def get_init_status():
    return INITIALIZER_STATUS

def init_fail(log_queue=None):
    if log_queue is not None:
        logger = logging.getLogger('concurrent.futures')
        logger.addHandler(QueueHandler(log_queue))
        logger.setLevel('CRITICAL')
        logger.propagate = False
    time.sleep(0.1)  # let some futures be scheduled
    raise ValueError('error in initializer')


class InitializerMixin(ExecutorMixin):
    worker_count = 2

    def setUp(self):
        global INITIALIZER_STATUS
        INITIALIZER_STATUS = 'uninitialized'
        self.executor_kwargs = dict(initializer=init,
                                    initargs=('initialized',))
        super().setUp()

    def test_initializer(self):
        futures = [self.executor.submit(get_init_status)
                   for _ in range(self.worker_count)]

        for f in futures:
            self.assertEqual(f.result(), 'initialized')


class FailingInitializerMixin(ExecutorMixin):
    worker_count = 2

    def setUp(self):
        if hasattr(self, "ctx"):
            # Pass a queue to redirect the child's logging output
            self.mp_context = self.get_context()
            self.log_queue = self.mp_context.Queue()
            self.executor_kwargs = dict(initializer=init_fail,
                                        initargs=(self.log_queue,))
        else:
            # In a thread pool, the child shares our logging setup
            # (see _assert_logged())
            self.mp_context = None
            self.log_queue = None
            self.executor_kwargs = dict(initializer=init_fail)
        super().setUp()

    @pytest.mark.skip(reason="documented difference: a failing initializer fails the work waiting for workers (BrokenProcessPool, the initializer's error as cause); new work starts workers again, since the initializer may depend on something the notebook fixes, so the pool never stays broken")
    def test_initializer(self):
        with self._assert_logged('ValueError: error in initializer'):
            try:
                future = self.executor.submit(get_init_status)
            except BrokenExecutor:
                # Perhaps the executor is already broken
                pass
            else:
                with self.assertRaises(BrokenExecutor):
                    future.result()

            # At some point, the executor should break
            # (adapted: CPython reads the private self.executor._broken)
            for _ in sleeping_retry(SHORT_TIMEOUT,
                                    "executor not broken"):
                try:
                    self.executor.submit(get_init_status).cancel()
                except BrokenExecutor:
                    break

            # ... and from this point submit() is guaranteed to fail
            with self.assertRaises(BrokenExecutor):
                self.executor.submit(get_init_status)

    @contextlib.contextmanager
    def _assert_logged(self, msg):
        if self.log_queue is not None:
            yield
            output = []
            try:
                while True:
                    output.append(self.log_queue.get_nowait().getMessage())
            except queue.Empty:
                pass
        else:
            with self.assertLogs('concurrent.futures', 'CRITICAL') as cm:
                yield
            output = cm.output
        self.assertTrue(any(msg in line for line in output),
                        output)


create_executor_tests(globals(), InitializerMixin)
create_executor_tests(globals(), FailingInitializerMixin)


# ------------------------------------------------------------------ test_deadlock.py


def _crash(delay=None):
    """Induces a segfault."""
    if delay:
        time.sleep(delay)
    import faulthandler
    faulthandler.disable()
    faulthandler._sigsegv()


def _crash_with_data(data):
    """Induces a segfault with dummy data in input."""
    _crash()


def _exit():
    """Induces a sys exit with exitcode 1."""
    sys.exit(1)


def _raise_error(Err):
    """Function that raises an Exception in process."""
    raise Err()


def _raise_error_ignore_stderr(Err):
    """Function that raises an Exception in process and ignores stderr."""
    import io
    sys.stderr = io.StringIO()
    raise Err()


def _return_instance(cls):
    """Function that returns a instance of cls."""
    return cls()


class CrashAtPickle(object):
    """Bad object that triggers a segfault at pickling time."""
    def __reduce__(self):
        _crash()


class CrashAtUnpickle(object):
    """Bad object that triggers a segfault at unpickling time."""
    def __reduce__(self):
        return _crash, ()


class ExitAtPickle(object):
    """Bad object that triggers a process exit at pickling time."""
    def __reduce__(self):
        _exit()


class ExitAtUnpickle(object):
    """Bad object that triggers a process exit at unpickling time."""
    def __reduce__(self):
        return _exit, ()


class ErrorAtPickle(object):
    """Bad object that triggers an error at pickling time."""
    def __reduce__(self):
        from pickle import PicklingError
        raise PicklingError("Error in pickle")


class ErrorAtUnpickle(object):
    """Bad object that triggers an error at unpickling time."""
    def __reduce__(self):
        from pickle import UnpicklingError
        return _raise_error_ignore_stderr, (UnpicklingError, )


class ExecutorDeadlockTest:
    TIMEOUT = LONG_TIMEOUT

    def _fail_on_deadlock(self, executor):
        # If we did not recover before TIMEOUT seconds, consider that the
        # executor is in a deadlock state and forcefully clean all its
        # composants.
        import faulthandler
        from tempfile import TemporaryFile
        with TemporaryFile(mode="w+") as f:
            faulthandler.dump_traceback(file=f)
            f.seek(0)
            tb = f.read()
        for pid in executor.pids:  # adapted: executor._processes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        # This should be safe to call executor.shutdown here as all possible
        # deadlocks should have been broken.
        executor.shutdown(wait=True)
        print(f"\nTraceback:\n {tb}", file=sys.__stderr__)
        self.fail(f"Executor deadlock:\n\n{tb}")


    def _check_crash(self, error, func, *args, ignore_stderr=False):
        # test for deadlock caused by crashes in a pool
        self.executor.shutdown(wait=True)

        executor = self.executor_type(
            max_workers=2, mp_context=self.get_context())
        res = executor.submit(func, *args)

        if ignore_stderr:
            cm = captured_stderr()
        else:
            cm = contextlib.nullcontext()

        try:
            with self.assertRaises(error):
                with cm:
                    res.result(timeout=self.TIMEOUT)
        except futures.TimeoutError:
            # If we did not recover before TIMEOUT seconds,
            # consider that the executor is in a deadlock state
            self._fail_on_deadlock(executor)
        executor.shutdown(wait=True)

    def test_error_at_task_pickle(self):
        # Check problem occurring while pickling a task in
        # the task_handler thread
        self._check_crash(PicklingError, id, ErrorAtPickle())

    @pytest.mark.skip(reason="documented difference: what cannot be loaded on the other side (a task's arguments in the worker, a result in the notebook) fails that task alone, with the error that names it; CPython breaks the whole pool (BrokenProcessPool)")
    def test_exit_at_task_unpickle(self):
        # Check problem occurring while unpickling a task on workers
        self._check_crash(BrokenProcessPool, id, ExitAtUnpickle())

    @pytest.mark.skip(reason="documented difference: what cannot be loaded on the other side (a task's arguments in the worker, a result in the notebook) fails that task alone, with the error that names it; CPython breaks the whole pool (BrokenProcessPool)")
    def test_error_at_task_unpickle(self):
        # gh-109832: Restore stderr overriden by _raise_error_ignore_stderr()
        self.addCleanup(setattr, sys, 'stderr', sys.stderr)

        # Check problem occurring while unpickling a task on workers
        self._check_crash(BrokenProcessPool, id, ErrorAtUnpickle())

    def test_crash_at_task_unpickle(self):
        # Check problem occurring while unpickling a task on workers
        self._check_crash(BrokenProcessPool, id, CrashAtUnpickle())

    def test_crash_during_func_exec_on_worker(self):
        # Check problem occurring during func execution on workers
        self._check_crash(BrokenProcessPool, _crash)

    def test_exit_during_func_exec_on_worker(self):
        # Check problem occurring during func execution on workers
        self._check_crash(SystemExit, _exit)

    def test_error_during_func_exec_on_worker(self):
        # Check problem occurring during func execution on workers
        self._check_crash(RuntimeError, _raise_error, RuntimeError)

    def test_crash_during_result_pickle_on_worker(self):
        # Check problem occurring while pickling a task result
        # on workers
        self._check_crash(BrokenProcessPool, _return_instance, CrashAtPickle)

    @pytest.mark.skip(reason="documented difference: a result whose pickling raises (SystemExit too) fails its task with the pickle doctor's PicklingError, the SystemExit as its cause; the worker serves on")
    def test_exit_during_result_pickle_on_worker(self):
        # Check problem occurring while pickling a task result
        # on workers
        self._check_crash(SystemExit, _return_instance, ExitAtPickle)

    def test_error_during_result_pickle_on_worker(self):
        # Check problem occurring while pickling a task result
        # on workers
        self._check_crash(PicklingError, _return_instance, ErrorAtPickle)

    @pytest.mark.skip(reason="documented difference: what cannot be loaded on the other side (a task's arguments in the worker, a result in the notebook) fails that task alone, with the error that names it; CPython breaks the whole pool (BrokenProcessPool)")
    def test_error_during_result_unpickle_in_result_handler(self):
        # gh-109832: Restore stderr overriden by _raise_error_ignore_stderr()
        self.addCleanup(setattr, sys, 'stderr', sys.stderr)

        # Check problem occurring while unpickling a task in
        # the result_handler thread
        self._check_crash(BrokenProcessPool,
                          _return_instance, ErrorAtUnpickle,
                          ignore_stderr=True)

    @pytest.mark.skip(reason="documented difference: what cannot be loaded on the other side (a task's arguments in the worker, a result in the notebook) fails that task alone, with the error that names it; CPython breaks the whole pool (BrokenProcessPool)")
    def test_exit_during_result_unpickle_in_result_handler(self):
        # Check problem occurring while unpickling a task in
        # the result_handler thread
        self._check_crash(BrokenProcessPool, _return_instance, ExitAtUnpickle)

    def test_shutdown_deadlock(self):
        # Test that the pool calling shutdown do not cause deadlock
        # if a worker fails after the shutdown call.
        self.executor.shutdown(wait=True)
        with self.executor_type(max_workers=2,
                                mp_context=self.get_context()) as executor:
            self.executor = executor  # Allow clean up in fail_on_deadlock
            f = executor.submit(_crash, delay=.1)
            executor.shutdown(wait=True)
            with self.assertRaises(BrokenProcessPool):
                f.result()

    def test_shutdown_deadlock_pickle(self):
        # Test that the pool calling shutdown with wait=False does not cause
        # a deadlock if a task fails at pickle after the shutdown call.
        # Reported in bpo-39104.
        self.executor.shutdown(wait=True)
        with self.executor_type(max_workers=2,
                                mp_context=self.get_context()) as executor:
            self.executor = executor  # Allow clean up in fail_on_deadlock

            # Start the executor and get the executor_manager_thread to collect
            # the threads and avoid dangling thread that should be cleaned up
            # asynchronously.
            executor.submit(id, 42).result()
            # adapted: executor._executor_manager_thread (private) is not kept

            # Submit a task that fails at pickle and shutdown the executor
            # without waiting
            f = executor.submit(id, ErrorAtPickle())
            executor.shutdown(wait=False)
            with self.assertRaises(PicklingError):
                f.result()

        # Make sure the executor is eventually shutdown and do not leave
        # dangling threads
        # adapted: executor_manager.join() (private); the tag fixture checks the processes

    def test_crash_big_data(self):
        # Test that there is a clean exception instad of a deadlock when a
        # child process crashes while some data is being written into the
        # queue.
        # https://github.com/python/cpython/issues/94777
        self.executor.shutdown(wait=True)
        data = "a" * PIPE_MAX_SIZE
        with self.executor_type(max_workers=2,
                                mp_context=self.get_context()) as executor:
            self.executor = executor  # Allow clean up in fail_on_deadlock
            with self.assertRaises(BrokenProcessPool):
                list(executor.map(_crash_with_data, [data] * 10))

        executor.shutdown(wait=True)

    @pytest.mark.skip(reason="patches ProcessPoolExecutor's private _ExecutorManagerThread and _ThreadWakeup")
    def test_gh105829_should_not_deadlock_if_wakeup_pipe_full(self):
        pass


create_executor_tests(globals(), ExecutorDeadlockTest)
