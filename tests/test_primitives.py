"""multiprocessing's primitives reach mpnb workers, under every launcher.

- A ``Manager()`` proxy (dict, list, Queue) is an ordinary task argument: the
  workers hold the parent's authkey, as spawn's children do.
- ``initargs`` may hold queues, events and locks, as ``ProcessPoolExecutor``
  accepts: they pickle only while a worker starts, and go with it.  The
  initializer may itself travel by value (here a closure).
- Those made by the ``fork`` context cannot reach a fresh interpreter: they
  are refused at ``Pool()`` with the fix.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest

import mpnb

TAG_VAR = "MPNB_TEST_TAG"  # kernel.TAG_VAR, without importing kernel into workers
LAUNCHERS = ["exec", "loky", "spawn", "forkserver"]
WAIT = 60


# ------------------------------------------------------------ task functions


def fill(shared_dict, shared_list, shared_queue, x):
    shared_dict[x] = os.getpid()
    shared_list.append(x)
    shared_queue.put(x * x)
    return x


_primitives: dict = {}


def report(x):
    """A task that uses what the initializer kept."""
    with _primitives["lock"]:
        _primitives["queue"].put(("task", x, os.getpid()))
    return _primitives["event"].is_set()


# ------------------------------------------------------------ the tests


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_manager_proxies_as_task_arguments(tag, launcher):
    # spawn: forking this multi-threaded test process to start the manager could deadlock
    with multiprocessing.get_context("spawn").Manager() as manager:
        d, lst, q = manager.dict(), manager.list(), manager.Queue()
        with mpnb.Pool(2, context=launcher, live=False, env={TAG_VAR: tag}) as pool:
            assert pool.starmap(fill, [(d, lst, q, x) for x in range(4)]) == [0, 1, 2, 3]
            assert pool.submit(fill, d, lst, q, 4).result(timeout=WAIT) == 4
        assert sorted(d.keys()) == [0, 1, 2, 3, 4]
        assert sorted(lst) == [0, 1, 2, 3, 4]
        assert sorted(q.get(timeout=WAIT) for _ in range(5)) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("objects", ["spawn", "forkserver"])
def test_initargs_hold_queue_event_and_lock(tag, launcher, objects):
    ctx = multiprocessing.get_context(objects)
    queue, event, lock = ctx.Queue(), ctx.Event(), ctx.Lock()
    seen = "initialized"

    def initializer(q, e, lk):  # a closure: it travels by value, as a notebook's would
        from test_primitives import _primitives  # the module's dict, not a copy travelling with it

        _primitives.update(queue=q, event=e, lock=lk)
        with lk:
            q.put((seen, None, os.getpid()))

    event.set()
    with mpnb.Pool(2, context=launcher, live=False, initializer=initializer,
                   initargs=(queue, event, lock), env={TAG_VAR: tag}) as pool:
        assert pool.map(report, range(6), chunksize=1) == [True] * 6
        assert pool.submit(report, 6).result(timeout=WAIT)
    tasks, inits = {}, set()
    while len(tasks) < 7 or not set(tasks.values()) <= inits:
        kind, x, pid = queue.get(timeout=WAIT)
        if kind == "task":
            tasks[x] = pid
        else:
            inits.add(pid)
    assert sorted(tasks) == list(range(7))


def test_fork_context_primitives_are_refused_with_the_fix(tag):
    ctx = multiprocessing.get_context("fork")
    for made in (ctx.Queue, ctx.Event, ctx.Lock):
        with pytest.raises(ValueError, match=r"get_context\('spawn'\)") as info:
            mpnb.Pool(1, live=False, initializer=print, initargs=(made(),), env={TAG_VAR: tag})
        assert "'fork'" in str(info.value)
