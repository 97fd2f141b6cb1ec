"""The pickle doctor: a table of objects that cannot be sent, and what it says.

These run in the pytest process, where ``__main__`` is pytest's and has a
file, so the notebook-only case (a function defined in ``__main__``) is in
test_diagnostics.py, through a real kernel.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import pickle
import socket
import sqlite3
import threading
import time

import pytest

from mpnb.pickling import Diagnosis, PicklingProblem, check_call, diagnose, raise_for


class Session:
    def __init__(self):
        self._lock = threading.Lock()
        self.user = "ada"


class Database:
    def __init__(self):
        self.session = Session()


class RefusesToPickle:
    def __reduce__(self):
        raise ValueError("this handle is process-local")


class Node:
    def __init__(self, next_node):
        self.next = next_node


def chain(length):
    node = None
    for _ in range(length):
        node = Node(node)
    return node


def make_closure():
    offset = 3

    def add(x):
        return x + offset

    return add


def make_local_instance():
    class Point:
        def __init__(self):
            self.x = 1

    return Point()


def numbers():
    yield 1


GLOBAL_LOCK = threading.Lock()


def cell_function_using_a_lock():
    """A function as a notebook cell defines it: cloudpickle sends it by value."""
    namespace = {"__name__": "__main__", "GLOBAL_LOCK": threading.Lock()}
    exec("def work(x):\n    with GLOBAL_LOCK:\n        return x\n", namespace)
    return namespace["work"]


def captures_lock():
    lock = threading.RLock()

    def work(x):
        with lock:
            return x

    return work


def open_self():
    return open(__file__)


def sqlite_connection():
    return sqlite3.connect(":memory:")


# name, make the object, by_value, expected path, expected kind, words in the message
CASES = [
    ("lambda", lambda: lambda x: x, False, "f", "lambda", ["lambda", "def", "%%mppool"]),
    ("closure", make_closure, False, "f", "local_function",
     ["make_closure", "functools.partial", "mpnb.Pool"]),
    ("local class", make_local_instance, False, "f.__class__", "local_class",
     ["make_local_instance", "top level"]),
    ("lock in an argument", lambda: (Database(),), False, "f[0].session._lock", "lock",
     ["_thread.lock", "initializer"]),
    ("lock a function uses", cell_function_using_a_lock, True,
     "f.__globals__['GLOBAL_LOCK']", "lock", ["lock", "initializer"]),
    ("lock in a closure", captures_lock, True, "f.__closure__[0].cell_contents", "lock",
     ["RLock", "initializer"]),
    ("open file", lambda: {"log": open_self()}, False, "f['log']", "file",
     ["test_pickling.py", "file name"]),
    ("socket", lambda: [socket.socket()], False, "f[0]", "socket", ["socket", "address"]),
    ("sqlite3 connection", sqlite_connection, True, "f", "sqlite",
     ["sqlite3", "sqlite3.connect(path)", "initializer"]),
    ("generator", numbers, True, "f", "generator", ["generator", "list("]),
    ("ctypes pointer", lambda: {"p": ctypes.pointer(ctypes.c_int(3))}, False, "f['p']",
     "ctypes", ["memory address", "shared_memory"]),
    ("module", lambda: {"lib": os}, False, "f['lib']", "module", ["'os'", "import"]),
    ("__reduce__ raises", lambda: [1, RefusesToPickle()], False, "f[1]", "reduce",
     ["ValueError", "process-local", "__reduce__"]),
    ("recursion limit", lambda: chain(50_000), True, "f", "recursion",
     ["recursion limit", "flat"]),
    ("multiprocessing lock", multiprocessing.Lock, False, "f", "inherit",
     ["initargs", "Manager"]),
    ("partial of a lock", lambda: functools.partial(print, GLOBAL_LOCK), False,
     "f.args[0]", "lock", ["lock"]),
    ("thread", lambda: {"t": threading.Thread(target=print)}, False, "f['t']", "thread",
     ["thread"]),
]


@pytest.mark.parametrize(
    "make, by_value, path, kind, words",
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_object_is_named_with_reason_and_fix(make, by_value, path, kind, words):
    obj = make()
    start = time.monotonic()
    found = diagnose(obj, by_value=by_value, name="f")
    elapsed = time.monotonic() - start
    assert found is not None
    assert (found.path, found.kind) == (path, kind), str(found)
    message = str(found)
    assert message.startswith(f"{path} (")
    assert "Fix:" in message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert elapsed < 2.0, f"took {elapsed:.1f} s"
    # the object really does fail to pickle the way it was judged
    with pytest.raises(Exception):
        if by_value:
            import cloudpickle

            cloudpickle.dumps(obj)
        else:
            pickle.dumps(obj)


@pytest.mark.parametrize("by_value", [False, True])
@pytest.mark.parametrize("obj", [
    [1, "two", {"three": 3.0}],
    Database.__init__,
    functools.partial(int, base=2),
    os.path,
], ids=["data", "module function", "partial", "module attribute"])
def test_picklable_objects_have_no_diagnosis(obj, by_value):
    if obj is os.path and not by_value:
        pytest.skip("stdlib pickle cannot send modules")
    assert diagnose(obj, by_value=by_value) is None


def test_by_value_ships_what_by_reference_cannot():
    closure = make_closure()
    assert diagnose(closure, by_value=False) is not None
    assert diagnose(closure, by_value=True) is None
    assert diagnose({"lib": os}, by_value=True) is None


def test_problem_is_a_pickling_error_carrying_the_diagnosis():
    with pytest.raises(pickle.PicklingError) as caught:
        raise_for(Database(), name="db")
    problem = caught.value
    assert isinstance(problem, PicklingProblem)
    assert isinstance(problem.diagnosis, Diagnosis)
    assert problem.diagnosis.path == "db.session._lock"
    assert str(problem) == str(problem.diagnosis)
    assert "TypeError" in problem.diagnosis.error and "lock" in problem.diagnosis.error


def test_check_call_names_the_argument():
    check_call(abs, (1,), {"x": [1, 2]})
    with pytest.raises(PicklingProblem, match=r"^kwargs\['db'\]\.session\._lock "):
        check_call(abs, (1,), {"db": Database()})
    with pytest.raises(PicklingProblem, match=r"^args\[1\] "):
        check_call(abs, (1, open_self()))
    with pytest.raises(PicklingProblem, match=r"^add "):
        check_call(make_closure())
