"""Errors keep their type and say what to do.

A task's exception arrives as an instance of its own class, whatever its
``__init__`` wants; every pickling failure of a pool's function, arguments or
results reads as the pickle doctor's sentence (path, type, why, fix); and the
notes after foreign pools' failures know Python 3.14's wording and module
objects.  Pools here carry the test's tag, so the ``tag`` fixture proves that
no worker outlives a test.
"""

from __future__ import annotations

import socket
import threading

import pytest

import mpnb
from kernel import TAG_VAR
from mpnb.diagnostics import explain
from mpnb.pickling import PicklingProblem, diagnose
from mpnb.pool import RemoteTraceback

# ------------------------------------------------ exceptions that pickle badly


class NeedArgs(Exception):
    """Its __init__ wants two arguments; pickle would call it with one."""

    def __init__(self, a, b):
        super().__init__(f"{a}{b}")
        self.a, self.b = a, b


class KeywordOnly(Exception):
    def __init__(self, *, code):
        super().__init__(f"code {code}")
        self.code = code


class RefusesReduce(Exception):
    def __reduce__(self):
        raise TypeError("this error will not be pickled")


class ReducesWrongly(Exception):
    """Its __reduce__ pickles, but the loading call fails."""

    def __init__(self, message, detail):
        super().__init__(message)
        self.detail = detail

    def __reduce__(self):
        return (type(self), (self.args[0],))


class DiskFull(OSError):
    def __init__(self, path):
        super().__init__(28, "No space left on device", path)


def raise_kind(kind):
    if kind == "extra_args":
        raise NeedArgs(1, 2)
    if kind == "keyword_only":
        raise KeywordOnly(code=7)
    if kind == "refuses_reduce":
        raise RefusesReduce("refused")
    if kind == "reduces_wrongly":
        raise ReducesWrongly("wrong", detail={"row": 3})
    if kind == "attributes_after_init":
        error = NeedArgs("x", "y")
        error.retry_in = 5
        error.add_note("checked twice")
        raise error
    if kind == "oserror_fields":
        raise DiskFull("/data/out.bin")
    raise AssertionError(kind)


# kind: (class, message, attributes it must keep)
EXCEPTIONS = {
    "extra_args": (NeedArgs, "12", {"a": 1, "b": 2}),
    "keyword_only": (KeywordOnly, "code 7", {"code": 7}),
    "refuses_reduce": (RefusesReduce, "refused", {}),
    "reduces_wrongly": (ReducesWrongly, "wrong", {"detail": {"row": 3}}),
    "attributes_after_init": (NeedArgs, "xy", {"a": "x", "retry_in": 5}),
    "oserror_fields": (DiskFull, "[Errno 28] No space left on device: '/data/out.bin'",
                       {"errno": 28, "filename": "/data/out.bin"}),
}


@pytest.fixture
def pool(tag):
    p = mpnb.Pool(1, live=False, env={TAG_VAR: tag})
    try:
        yield p
    finally:
        p.shutdown()


@pytest.mark.parametrize("kind", list(EXCEPTIONS))
def test_task_exception_arrives_as_its_own_class(pool, kind):
    cls, message, attributes = EXCEPTIONS[kind]
    with pytest.raises(cls) as caught:
        pool.submit(raise_kind, kind).result(timeout=60)
    error = caught.value
    assert type(error) is cls
    assert str(error) == message
    for name, value in attributes.items():
        assert getattr(error, name) == value, name
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "raise_kind" in str(error.__cause__)  # the worker's frames
    assert any(note.startswith("mpnb: raised by task 0") for note in error.__notes__)
    if kind == "attributes_after_init":
        assert error.__notes__[0] == "checked twice"
    # map delivers the same
    assert type(pool.map(raise_kind, [kind], on_error="collect")[0]) is cls


CELL_CLASS = """
import mpnb
pool = mpnb.Pool(1, live=False)

class NeedArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}{b}")
        self.a = a

def fail(x):
    error = NeedArgs(x, 2)
    error.add_note("from the cell")
    raise error

try:
    pool.submit(fail, 1).result(timeout=60)
except NeedArgs as error:
    print("caught", type(error).__name__, error, error.a, error.__notes__[0])
pool.shutdown()
"""


@pytest.mark.kernel
def test_exception_class_defined_in_a_cell_arrives_as_itself(kernel):
    reply = kernel.run(CELL_CLASS, timeout=120).ok()
    assert reply.stdout.strip() == "caught NeedArgs 12 1 from the cell"


# ------------------------------------------- the doctor's sentence, pool paths


def identity(x, **kwargs):
    return x


def returns_socket(x):
    return {"rows": [x], "conn": socket.socket()}


def returns_generator(x):
    return (i for i in range(x))


def closure_over_lock():
    lock = threading.Lock()

    def work(x):
        with lock:
            return x

    return work


def _assert_doctor(error, path, type_name):
    assert isinstance(error, PicklingProblem), repr(error)
    text = str(error)
    assert text.startswith(f"{path} ({type_name}) cannot be sent to a worker process."), text
    assert " Fix: " in text


def test_an_argument_names_its_path_type_and_fix(pool):
    nested = {"db": {"session": {"lock": threading.Lock()}}}
    error = pool.submit(identity, nested).exception(timeout=60)
    _assert_doctor(error, "args[0]['db']['session']['lock']", "_thread.lock")
    # the very sentence the pickle doctor (and %%mppool) gives
    assert str(error) == str(diagnose(nested, by_value=True, name="args[0]"))
    assert "coordinates the threads of one process" in str(error)


def test_a_keyword_argument_names_its_path(pool):
    conn = socket.socket()
    try:
        error = pool.submit(identity, 1, conn=conn).exception(timeout=60)
    finally:
        conn.close()
    _assert_doctor(error, "kwargs['conn']", "socket.socket")
    assert "send the address and connect" in str(error)


def test_a_map_item_fails_alone_with_the_doctors_sentence(pool):
    results = pool.map(identity, [1, [(i for i in range(3))], 3], on_error="collect")
    assert results[0] == 1 and results[2] == 3
    _assert_doctor(results[1], "args[0][0]", "generator")


def test_the_task_description_shows_an_unpicklable_argument_by_its_type(pool):
    error = pool.submit(identity, threading.Lock()).exception(timeout=60)
    _assert_doctor(error, "args[0]", "_thread.lock")
    note = error.__notes__[-1]
    assert "<_thread.lock object>" in note, note


def test_a_function_closure_names_its_path(pool):
    # as concurrent.futures: submit() returns, the future holds the error
    error = pool.submit(closure_over_lock(), 1).exception(timeout=60)
    assert isinstance(error, PicklingProblem), repr(error)
    _assert_doctor(error, "work.__closure__[0].cell_contents", "_thread.lock")
    with pytest.raises(PicklingProblem) as caught:  # a blocking call raises it
        pool.map(closure_over_lock(), [1])
    _assert_doctor(caught.value, "work.__closure__[0].cell_contents", "_thread.lock")


@pytest.mark.parametrize("context", ["exec", "spawn"])
def test_initargs_name_their_path_when_the_pool_is_made(tag, context):
    nested = {"db": {"lock": threading.Lock()}}
    with pytest.raises(PicklingProblem) as caught:
        mpnb.Pool(1, context=context, initializer=identity, initargs=(1, nested), env={TAG_VAR: tag})
    _assert_doctor(caught.value, "initargs[1]['db']['lock']", "_thread.lock")
    with pytest.raises(PicklingProblem) as caught:
        mpnb.Pool(1, context=context, initializer=closure_over_lock(), env={TAG_VAR: tag})
    _assert_doctor(caught.value, "work.__closure__[0].cell_contents", "_thread.lock")


@pytest.mark.parametrize("fn, path, type_name, fix", [
    (returns_socket, "result['conn']", "socket.socket", "return the plain data you need"),
    (returns_generator, "result", "generator", "return list(...)"),
])
def test_a_result_names_its_path_inside_the_returned_value(pool, fn, path, type_name, fix):
    error = pool.submit(fn, 2).exception(timeout=60)
    assert isinstance(error, PicklingProblem), repr(error)
    text = str(error)
    assert text.startswith("the task's return value cannot be sent back from the worker: "
                           f"{path} ({type_name}) does not pickle."), text
    assert f"Fix: {fix}" in text
    assert error.diagnosis.path == path
    assert pool.submit(identity, 5).result(timeout=60) == 5  # the worker still serves


# ------------------------------------------------ foreign failures, explained


@pytest.mark.parametrize("message", [
    "Can't get attribute 'square' on <module '__main__' (built-in)>",  # up to 3.13
    "module '__main__' has no attribute 'square'",  # 3.14
])
def test_explain_knows_both_wordings_of_a_missing_notebook_definition(message):
    note = explain(AttributeError(message))
    assert note is not None and "could not find square" in note and "%%mppool" in note


def test_explain_names_the_fix_for_a_module_object():
    note = explain(TypeError("cannot pickle 'module' object"))
    assert note is not None and "module object" in note
    assert "import the module inside the worker function" in note


MODULE_ARGUMENT = """
%load_ext mpnb
import os, multiprocessing as mp, concurrent.futures as cf
"""


@pytest.mark.kernel
def test_a_module_sent_to_a_stdlib_spawn_pool_gets_the_doctors_sentence(kernel):
    kernel.run(MODULE_ARGUMENT).ok()
    reply = kernel.run(
        "with mp.get_context('spawn').Pool(1) as pool:\n"
        "    pool.apply_async(print, (os,)).get(timeout=30)", timeout=60)
    assert reply.ename == "PicklingProblem", (reply.ename, reply.evalue)
    assert reply.evalue.startswith("args[0] (module) cannot be sent to a worker process.")
    assert "import the module inside the worker function" in reply.evalue
    reply = kernel.run(
        "with cf.ProcessPoolExecutor(1, mp_context=mp.get_context('spawn')) as ex:\n"
        "    ex.submit(print, os).result(timeout=30)", timeout=60)
    assert reply.ename == "PicklingProblem", (reply.ename, reply.evalue)
    assert reply.evalue.startswith("args[0] (module)")
