"""Python 3.14's InterpreterPoolExecutor with notebook definitions, in a real kernel.

A subinterpreter, like a process started by spawn or forkserver, has a
``__main__`` of its own: a cell function that goes there by name (one using
globals, a closure or defaults; a notebook class) is not found.  With mpnb
loaded, ``submit`` and ``map`` refuse it at once, naming it and the fix;
what still fails in a subinterpreter gets a note after the cell.
"""

from __future__ import annotations

import sys

import pytest

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(sys.version_info < (3, 14),
                       reason="concurrent.futures.InterpreterPoolExecutor is new in Python 3.14"),
]

SETUP = """
%load_ext mpnb
from concurrent.futures import InterpreterPoolExecutor
K = 3

def helper(x):
    return x + 1

def uses_globals(x):
    return helper(x) * K

def stateless(x):
    return len(str(x)) * 2

class Point:
    pass
"""

# a message comes at once; a hang would run into this
NO_HANG = 60


def test_notebook_definitions_in_subinterpreters(kernel):
    pytest.importorskip("concurrent.interpreters")
    kernel.run(SETUP).ok()
    kernel.run("ex = InterpreterPoolExecutor(2)").ok()
    # a function that needs __main__ by name: refused at submit, naming it and the fix
    reply = kernel.run("ex.submit(uses_globals, 1).result()", timeout=NO_HANG)
    assert reply.ename == "PicklingProblem", reply.evalue
    assert reply.evalue.startswith("uses_globals (function) cannot be sent")
    assert "subinterpreter" in reply.evalue
    assert "%%mppool" in reply.evalue and "mpnb.Pool" in reply.evalue
    # map goes through submit; an argument of a notebook class is named too
    reply = kernel.run("list(ex.map(uses_globals, [1, 2]))", timeout=NO_HANG)
    assert reply.ename == "PicklingProblem"
    reply = kernel.run("ex.submit(id, Point()).result()", timeout=NO_HANG)
    assert reply.ename == "PicklingProblem"
    assert reply.evalue.startswith("args[0].__class__ (type)")
    # a function that uses no globals goes as code, and works: it is let through
    reply = kernel.run("print(ex.submit(stateless, 100).result(), list(ex.map(stateless, [1])))",
                       timeout=NO_HANG).ok()
    assert "6 [2]" in reply.stdout
    # what the check does not see fails in the subinterpreter: the note explains it
    reply = kernel.run("ex.submit(id, (stateless, Point())).result()", timeout=NO_HANG)
    assert reply.ename == "NotShareableError", reply.evalue
    assert "mpnb: a subinterpreter of InterpreterPoolExecutor could not find Point" in reply.stderr
    assert "%%mppool" in reply.stderr

    # %%mppool functions work there, by-value captures of earlier cells included
    kernel.run("%%mppool\ndef triple(x):\n    return helper(x) * K * 3").ok()
    reply = kernel.run("print(ex.submit(triple, 1).result(), list(ex.map(triple, [0, 1])))",
                       timeout=NO_HANG).ok()
    assert "18 [9, 18]" in reply.stdout

    # a cell module that imports numpy cannot be loaded in a subinterpreter: said so
    pytest.importorskip("numpy")
    kernel.run("%%mppool\nimport numpy as np\ndef root(x):\n    return float(np.sqrt(x))").ok()
    reply = kernel.run("ex.submit(root, 4.0).result()", timeout=NO_HANG)
    assert reply.status == "error"
    assert "mpnb: numpy cannot be loaded in a subinterpreter" in reply.stderr, reply.stderr
    assert "mpnb.Pool" in reply.stderr
    kernel.run("ex.shutdown()", timeout=NO_HANG).ok()
    # unloading mpnb gives the stdlib its own submit back
    reply = kernel.run("%unload_ext mpnb\nprint('submit' in InterpreterPoolExecutor.__dict__)").ok()
    assert reply.stdout.strip() == "False"
