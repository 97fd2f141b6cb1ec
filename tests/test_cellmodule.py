"""Unit tests of the pure part: cell -> module (no kernel, no process)."""

from __future__ import annotations

import collections
import importlib
import math
import os
import pickle
import subprocess
import sys
import threading
import traceback

import pytest

from mpnb import cellmodule, cells


@pytest.fixture
def directory(tmp_path, monkeypatch):
    """A private cell directory announced to the finder, as %load_ext does."""
    monkeypatch.setenv(cells.ENV_VAR, str(tmp_path))
    return tmp_path


def build(body: str, namespace=None, directory=None):
    # line 1 of a %%mppool cell is the magic's own line
    return cellmodule.build("\n" + body, namespace or {}, directory)


# ----------------------------------------------------------------- split


def test_split_sorts_definitions_from_the_rest():
    cell = cellmodule.split(
        "\nimport os\nfrom math import sqrt as root\nK = 3\nNAMES: tuple = ('a', -1, 2 ** 8)\n"
        "def f(x):\n    return x\nasync def g():\n    pass\n@dataclass\nclass C:\n    pass\n"
        "data = load()\nprint(f(1))\nfor i in range(3):\n    pass\nx = y = 1\n"
    )
    assert [type(n).__name__ for n in cell.definitions] == [
        "Import", "ImportFrom", "Assign", "AnnAssign", "FunctionDef", "AsyncFunctionDef", "ClassDef",
        "Assign",
    ]
    assert list(cell.defined) == ["os", "root", "K", "NAMES", "f", "g", "C", "x", "y"]
    assert set(cell.rest_assigned) == {"data", "i"}
    assert cell.rest_assigned["data"] == 13


@pytest.mark.parametrize(
    "statement, is_definition",
    [
        ("A = 1", True),
        ("A = -1.5e3", True),
        ("A = (1, 'x', None, b'y')", True),
        ("A = {'k': [1, 2], 'j': {3}}", True),
        ("A = 2 ** 10 * 3", True),
        ("A, B = 1, 2", True),
        ("A: int = 4", True),
        ("A: int", False),
        ("A = f(1)", False),
        ("A = B", False),
        ("A = [i for i in range(3)]", False),
        ("A.attr = 1", False),
        ("A[0] = 1", False),
        ("A += 1", False),
        ("if True:\n    def f(): pass", False),
        ("print('hi')", False),
    ],
)
def test_literal_constants_and_other_statements(statement, is_definition):
    cell = cellmodule.split(statement)
    assert bool(cell.definitions) is is_definition


def test_rest_assigned_ignores_nested_scopes():
    cell = cellmodule.split(
        "results = [x for x in range(3)]\nfn = lambda y: y\n"
        "with open('f') as handle:\n    pass\ntry:\n    pass\nexcept Exception as err:\n    pass\n"
        "total = sum(n := v for v in [1])\n"
    )
    assert set(cell.rest_assigned) == {"results", "fn", "handle", "err", "total", "n"}


# -------------------------------------------------------------- free names


def test_free_names_follow_python_scoping():
    cell = cellmodule.split(
        "import numpy as np\nK = 3\n"
        "@decorate\nclass A(Base):\n    y = z\n    def m(self, q=default):\n"
        "        return np.sqrt(q) + K + helper(self.y) + len(q)\n"
        "def init():\n    global _model\n    _model = 1\n"
        "def work(xs):\n    return [_model(i) + outer_const for i in xs]\n"
        "def outer():\n    v = 1\n    def inner():\n        return v + far\n    return inner\n"
    )
    free = cellmodule.free_names(cell)
    # builtins are reported too: an earlier cell may have shadowed them
    assert set(free) == {"decorate", "Base", "z", "default", "helper", "len", "outer_const", "far"}
    assert free["helper"] == "A" and free["far"] == "outer"


# ------------------------------------------------------------- resolution


def test_module_alias_becomes_an_import(directory):
    built = build("def f(x):\n    return m.sqrt(x)\n", {"m": math}, directory)
    assert built.module.m is math
    assert built.names["f"](9) == 3.0
    assert built.path.read_text().splitlines()[0] == "import math as m"


def test_importable_object_becomes_an_import(directory):
    built = build(
        "def f():\n    return OD(a=1), join('a', 'b')\n",
        {"OD": collections.OrderedDict, "join": os.path.join},
        directory,
    )
    header = built.path.read_text().splitlines()[0]
    assert "from collections import OrderedDict as OD" in header
    assert built.module.OD is collections.OrderedDict


def test_other_cells_function_is_imported_by_name(directory):
    first = build("def helper(x):\n    return x + 1\n", {}, directory)
    second = build("def use(x):\n    return helper(x) * 2\n", dict(first.names), directory)
    assert f"from {first.name} import helper as helper" in second.path.read_text()
    assert second.names["use"](1) == 4


def test_literal_values_are_written_into_the_source(directory):
    built = build("def f():\n    return SCALE, NAMES\n", {"SCALE": 3, "NAMES": ("a", 1.5)}, directory)
    assert "NAMES = ('a', 1.5); SCALE = 3" in built.path.read_text()
    assert not built.path.with_suffix(".pkl").exists()


def test_other_values_are_captured_by_value_as_of_now(directory):
    data = {"weights": [1.0, float("nan")], "when": threading.Event}
    ns = {"data": data}
    built = build("def f():\n    return data\n", ns, directory)
    assert built.path.with_suffix(".pkl").exists()
    captured = built.names["f"]()
    assert captured is not data and captured["weights"][0] == 1.0
    data["weights"].append(2.0)  # later changes are not seen: captured as of the cell
    assert len(built.names["f"]()["weights"]) == 2


def test_unpicklable_value_names_variable_type_and_fix(directory):
    ns = {"lock": threading.Lock()}
    with pytest.raises(cellmodule.UnpicklableNameError) as info:
        build("def critical(x):\n    with lock:\n        return x\n", ns, directory)
    message = str(info.value)
    assert "`critical` uses `lock`" in message
    assert "_thread.lock" in message
    assert "Fix: create it in the worker function" in message and "No process was started" in message
    assert list(directory.iterdir()) == []  # nothing written


def test_name_assigned_later_in_the_same_cell():
    with pytest.raises(cellmodule.UndefinedNameError, match=r"`f` uses `table`.*line 4"):
        build("def f(k):\n    return table[k]\ntable = load()\n", {"table": {}}, None)


def test_name_defined_nowhere():
    with pytest.raises(cellmodule.UndefinedNameError, match=r"`f` uses `missing`, which is not defined"):
        build("def f():\n    return missing\n", {}, None)


def test_builtins_and_initializer_globals_need_nothing(directory):
    built = build(
        "def init():\n    global _model\n    _model = len\n"
        "def work(x):\n    return _model(x) + abs(-1)\n",
        {},
        directory,
    )
    built.names["init"]()
    assert built.names["work"]("ab") == 3


def test_notebook_shadowing_a_builtin_wins(directory):
    built = build("def f():\n    return len\n", {"len": "mine"}, directory)
    assert built.names["f"]() == "mine"


# ------------------------------------------------------- naming, versions


def test_name_is_a_content_hash(directory):
    a = build("def f():\n    return 1\n", {}, directory)
    again = build("def f():\n    return 1\n", {}, directory)
    changed = build("def f():\n    return 2\n", {}, directory)
    assert a.name == again.name and a.module is again.module
    assert a.name != changed.name
    assert a.name.startswith("mpnb.cells.cell_")
    assert a.names["f"]() == 1 and changed.names["f"]() == 2


def test_changed_capture_is_a_new_version(directory):
    a = build("def f():\n    return t\n", {"t": [1, object]}, directory)
    b = build("def f():\n    return t\n", {"t": [2, object]}, directory)
    assert a.name != b.name


def test_definitions_pickle_by_reference(directory):
    built = build("class Point:\n    def __init__(self, x):\n        self.x = x\n"
                  "def f(p):\n    return p.x\n", {}, directory)
    Point, f = built.names["Point"], built.names["f"]
    payload = pickle.dumps((f, Point(3)))
    assert built.name.encode() in payload and b"return" not in payload
    f2, p2 = pickle.loads(payload)
    assert f2 is f and f2(p2) == 3


# ------------------------------------------------------ source and lines


def test_tracebacks_point_at_the_cell_lines(directory):
    body = "import os\n\n\ndef f(x):\n    y = x + 1\n    return 1 / (y - y)\n"
    built = build(body, {}, directory)
    with pytest.raises(ZeroDivisionError) as info:
        built.names["f"](1)
    frame = traceback.extract_tb(info.tb)[-1]
    # cell line 1 is "%%mppool", so the body's line 5 is the cell's line 7
    assert frame.lineno == 7
    assert frame.line == "return 1 / (y - y)"
    assert frame.filename == str(built.path)


def test_rest_lines_are_blank_and_shared_lines_are_split(directory):
    built = build("x = compute(); import os\n@staticmethod\ndef f():\n    return os.sep\nprint(x)\n",
                  {"compute": len}, directory)
    lines = built.path.read_text().splitlines()
    assert lines[1] == "import os"
    assert lines[2:5] == ["@staticmethod", "def f():", "    return os.sep"]
    assert lines[5] == ""
    assert [type(n).__name__ for n in built.rest] == ["Assign", "Expr"]


def test_future_import_goes_first(directory):
    built = build("from __future__ import annotations\ndef f(x: Later) -> Later:\n    return K\n",
                  {"K": 5}, directory)
    assert built.path.read_text().splitlines()[0].startswith("from __future__ import annotations;")
    assert built.names["f"](1) == 5


def test_annotations_that_are_never_evaluated_need_nothing(directory):
    built = build("from __future__ import annotations\nclass A:\n    x: Later\n"
                  "def f(a: Later, *b: Other, **c: More) -> Later:\n    y: Local = 1\n    return y\n",
                  {}, directory)
    assert built.names["f"](1) == 1


def test_star_import_names_are_defined(directory):
    built = build("from math import *\ndef f():\n    return floor(pi)\n", {}, directory)
    assert built.names["f"]() == 3
    assert built.names["floor"] is math.floor


def test_module_found_through_the_finder_only(directory):
    built = build("def f():\n    return 42\n", {}, directory)
    del sys.modules[built.name]
    assert str(directory) not in sys.path
    assert importlib.import_module(built.name).f() == 42


SHIPPED = """
import pickle, sys
from pathlib import Path
from mpnb import cells
files = pickle.loads(sys.stdin.buffer.read())
directory = Path(sys.argv[1])
cells.write_files(directory, files)
cells.add_directory(directory)
module = __import__(sys.argv[2], fromlist=["f"])
print(module.f(), Path(module.__file__).parent == directory)
"""


def test_shipped_files_are_found_in_the_directory_they_were_written_to(directory, tmp_path_factory, tag):
    # what a dask worker does with a module: no kernel directory to find it in
    built = build("def f():\n    return COUNTS['a'] * 2\n", {"COUNTS": collections.Counter("aab")}, directory)
    files = cells.files_to_ship(built.module)
    assert sorted(files) == [f"{built.name.rpartition('.')[2]}.{ext}" for ext in ("pkl", "py")]
    elsewhere = tmp_path_factory.mktemp("shipped")
    env = {k: v for k, v in os.environ.items() if k != cells.ENV_VAR}
    env["MPNB_TEST_TAG"] = tag
    out = subprocess.run([sys.executable, "-c", SHIPPED, str(elsewhere), built.name], input=pickle.dumps(files),
                         capture_output=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["4", "True"]
