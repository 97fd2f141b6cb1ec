"""mpnb's pickler keeps the file names of shipped code.

The notebook shows a worker's traceback with the cell's source lines only if
the code that ran there still names the cell's file.  cloudpickle (3.1.3 on)
renames every code object it ships; :mod:`mpnb.serialize` puts the names
back.  These tests load the payload in a fresh interpreter, as a worker does,
so they fail loudly if cloudpickle's handling of code changes under it.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import cloudpickle

from mpnb import serialize

CELL = textwrap.dedent(
    """
    def outer(x):
        def inner(y):
            return 1 / y
        return inner(x)

    class Holder:
        def method(self):
            return lambda: 1 / 0
    """
)
FILENAME = "/notebook/cell-7.py"

CHILD = textwrap.dedent(
    """
    import pickle, sys, traceback
    outer, holder = pickle.loads(sys.stdin.buffer.read())
    print(outer.__code__.co_filename)
    print(holder.method.__code__.co_filename)
    for fn in (lambda: outer(0), holder.method()):
        try:
            fn()
        except ZeroDivisionError as exc:
            for frame in traceback.extract_tb(exc.__traceback__):
                if frame.filename != "<string>":
                    print(frame.filename, frame.lineno, frame.name)
    """
)


def _cell_objects():
    namespace: dict = {"__name__": "__main__"}
    exec(compile(CELL, FILENAME, "exec"), namespace)
    return namespace["outer"], namespace["Holder"]()


def _load_in_fresh_interpreter(data: bytes) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], input=data, capture_output=True, timeout=60,
        env={"PYTHONPATH": ":".join(p for p in sys.path if p)},
    )
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode().splitlines()


def test_code_shipped_by_value_keeps_its_file_name_and_lines():
    lines = _load_in_fresh_interpreter(serialize.dumps(_cell_objects()))
    assert lines == [
        FILENAME,
        FILENAME,
        f"{FILENAME} 5 outer",
        f"{FILENAME} 4 inner",
        f"{FILENAME} 9 <lambda>",
    ]


def test_functions_travel_by_value_as_cloudpickle_sends_them():
    outer, holder = pickle.loads(serialize.dumps(_cell_objects()))
    assert outer(4) == 0.25
    assert type(holder).__name__ == "Holder"
    # shared code objects stay shared: a code object is written once
    funcs = [(lambda k: (lambda: k))(k) for k in range(3)]
    assert len(serialize.dumps(funcs)) < 2 * len(serialize.dumps(funcs[:1]))


def test_cloudpickle_alone_says_whether_the_wrapper_is_still_needed():
    """Documents what the wrapper is for: if this starts failing because
    cloudpickle keeps file names again, the wrapper is harmless but could go."""
    lines = _load_in_fresh_interpreter(cloudpickle.dumps(_cell_objects()))
    version = tuple(int(p) for p in cloudpickle.__version__.split(".")[:3] if p.isdigit())
    if version >= (3, 1, 3):
        assert lines[0] == "<dynamic-code>"
    else:
        assert lines[0] == FILENAME


# ---------------------------------------------------------------- plain data

class _IntKind(int):
    pass


def test_plain_data_pickles_in_one_pass_and_all_else_is_refused():
    """Task arguments and results of builtin data only are pickled by
    :func:`mpnb._task.dumps_plain`, which relies on the C pickler calling
    ``reducer_override`` for every object but the builtin containers and
    scalars: if a Python release stopped calling it for a function, a class
    or an instance, a ``__main__`` object would be pickled by a reference no
    worker can load.  This fails loudly then."""
    import numpy as np

    from mpnb._task import dumps_plain

    plain = [1, 2.5, "s", b"b", bytearray(b"a"), None, True, (1, ("x", 2.0)), [3, [4]], {"k": {5: None}}, {6}, frozenset({7})]
    data = dumps_plain(plain)
    assert data is not None and pickle.loads(data) == plain
    namespace: dict = {}
    exec("def f(x):\n    return x\nclass C:\n    pass\n", namespace)
    f, C = namespace["f"], namespace["C"]
    refused = [f, C, C(), len, int, 1j, _IntKind(3), np.float64(1.0), np.zeros(3),
               range(3), serialize]
    for value in refused:
        assert dumps_plain(value) is None, value
        assert dumps_plain([1, (2, value)]) is None, value
        assert dumps_plain({"k": [value]}) is None, value


def test_a_function_found_by_name_is_pickled_once_while_its_name_finds_it(tmp_path, monkeypatch):
    """A pool pickles its function at every call; one that pickles by
    reference is pickled once, and again as soon as its name finds another
    function or its module is registered to go by value."""
    (tmp_path / "mpnb_probe_module.py").write_text("def f(x):\n    return x + 1\n\ndef g(x):\n    return x - 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mpnb_probe_module as module

    try:
        first = serialize.dumps_function(module.f)
        assert first == pickle.dumps(module.f, pickle.HIGHEST_PROTOCOL)  # by reference
        assert serialize.dumps_function(module.f) is first  # remembered
        old = module.f
        module.f = module.g  # the name now finds another function: the old one goes by value
        by_value = serialize.dumps_function(old)
        assert by_value != first and pickle.loads(by_value)(1) == 2
        module.f = old
        assert serialize.dumps_function(module.f) is first
        cloudpickle.register_pickle_by_value(module)
        try:
            shipped = serialize.dumps_function(module.f)
            assert shipped != first and b"mpnb_probe_module" in shipped and pickle.loads(shipped)(1) == 2
        finally:
            cloudpickle.unregister_pickle_by_value(module)
        assert serialize.dumps_function(module.f) == first
        assert serialize.dumps_function(lambda x: x) != serialize.dumps_function(lambda x: x + 1)
    finally:
        sys.modules.pop("mpnb_probe_module", None)
