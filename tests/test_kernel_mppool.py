"""%%mppool in a real Jupyter kernel, where ``__main__`` is the kernel's.

Every test checks (through the ``tag`` fixture) that no process it caused is
alive afterwards, and the notebook tests check that the kernel's cell-module
directory is gone once the kernel has shut down.
"""

from __future__ import annotations

import multiprocessing
import re

import psutil
import pytest

from kernel import cell_text, notebook_errors, run_notebook
from mpnb._worker import GUARDIAN_NAME

pytestmark = pytest.mark.kernel

START_METHODS = [m for m in ("spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]

EXPECTED = {
    "multiprocessing.Pool": "[1, 2, 5, 10, 17]",
    "ProcessPoolExecutor": "[0.5, 3.5, 6.5]",
    "executor from before %load_ext": "[1, 2, 5, 10, 17]",
    "loky": "[1, 2, 5, 10, 17]",
    "joblib loky": "[1, 2, 5, 10, 17]",
    "joblib multiprocessing": "[0.5, 3.5, 6.5]",
    "instances": "[1, 2, 3]",
    "version before": "1",
    "version after": "2",
}


def private_runtime(tmp_path):
    """Give the kernel its own runtime directory, to see what it leaves there."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    return runtime, {"XDG_RUNTIME_DIR": str(runtime)}


@pytest.mark.parametrize("start_method", START_METHODS)
def test_every_pool_kind_runs_cell_definitions(start_method, tag, tmp_path):
    runtime, env = private_runtime(tmp_path)
    nb = run_notebook("foreign_pools.ipynb", {"START_METHOD": start_method}, tag=tag, env=env)
    assert notebook_errors(nb) == []
    shown = "".join(cell_text(c) for c in nb.cells if c.cell_type == "code")
    for label, value in EXPECTED.items():
        assert f"{label}: {value}\n" in shown, shown
    # the kernel has exited: its private module directory went with it
    assert list((runtime / "mpnb").iterdir()) == []


def test_without_mppool_the_bug_is_there(tag):
    """The baseline: the same function from an ordinary cell breaks the pool."""
    nb = run_notebook(
        [
            "import multiprocessing as mp\nfrom concurrent.futures import ProcessPoolExecutor\n"
            "def square(x):\n    return x * x",
            "with ProcessPoolExecutor(2, mp_context=mp.get_context('spawn')) as ex:\n"
            "    print(list(ex.map(square, range(3))))",
        ],
        tag=tag,
        allow_errors=True,
    )
    assert "BrokenProcessPool" in " ".join(notebook_errors(nb))


def test_unpicklable_global_fails_fast_and_starts_nothing(kernel):
    kernel.run("%load_ext mpnb\nimport threading\nlock = threading.Lock()").ok()
    before = {p.pid for p in kernel.descendants()}
    reply = kernel.run("%%mppool\ndef critical(x):\n    with lock:\n        return x\nresults = pool.map(critical, range(4))")
    assert reply.status == "error" and reply.ename == "UnpicklableNameError"
    assert "`critical` uses `lock`" in reply.evalue and "_thread.lock" in reply.evalue
    assert reply.seconds < 5
    assert {p.pid for p in kernel.descendants()} == before
    assert kernel.run("'critical' in dir(), 'results' in dir()").ok().results == ["(False, False)"]


def test_definitions_only_start_no_process(kernel):
    kernel.run("%load_ext mpnb").ok()
    before = {p.pid for p in kernel.descendants()}
    kernel.run("%%mppool\nimport math\nK = 2\ndef f(x):\n    return math.sqrt(x) * K").ok()
    assert kernel.run("f(16), f.__module__.startswith('mpnb.cells.cell_')").ok().results == ["(8.0, True)"]
    assert {p.pid for p in kernel.descendants()} == before


def test_tracebacks_show_the_cell_lines(kernel):
    kernel.run("%load_ext mpnb").ok()
    reply = kernel.run("%%mppool\n\ndef explode(x):\n    y = x - x\n    return 1 / y\n\nexplode(3)")
    assert reply.ename == "ZeroDivisionError"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", reply.traceback)
    assert "return 1 / y" in plain
    assert re.search(r"\b5\b.*return 1 / y", plain), plain  # line 5 of the cell
    assert re.search(r"\b7\b.*explode\(3\)", plain), plain  # the rest keeps its lines too


def test_ipython_syntax_and_last_expression(kernel):
    kernel.run("%load_ext mpnb").ok()
    reply = kernel.run("%%mppool\n!echo from-shell\n%time z = 1\ndef f(x):\n    return x + z_offset\nz_offset = int('1')\nf(1)")
    # z_offset is assigned by the rest of the cell, after the module is built
    assert reply.ename == "UndefinedNameError" and "line 6" in reply.evalue
    reply = kernel.run("%%mppool\n!echo from-shell\n%time z = 1\ndef f(x):\n    return x + 1\nf(z)").ok()
    assert "from-shell" in reply.stdout
    assert reply.results == ["2"]
    assert kernel.run("%%mppool\ndef g():\n    return 5\ng();").ok().results == []


def test_bad_options_are_usage_errors(kernel):
    kernel.run("%load_ext mpnb").ok()
    for line, words in [
        ("-n 0", "at least 1"),
        ("-n two", "invalid int value"),
        ("--name 2x", "identifier"),
        ("--bogus", "unrecognized arguments"),
    ]:
        reply = kernel.run(f"%%mppool {line}\ndef f():\n    pass")
        # IPython shows a UsageError as a message, not as a traceback
        assert reply.stderr.startswith("UsageError: "), (line, reply)
        assert words in reply.stderr, (line, reply.stderr)


def test_unload_removes_the_directory(kernel):
    kernel.run("%load_ext mpnb\nfrom mpnb import cells").ok()
    path = kernel.run("str(cells.kernel_dir())").ok().results[0].strip("'")
    kernel.run("%%mppool\ndef f():\n    return 1").ok()
    assert kernel.run(f"import os; os.stat({path!r}).st_mode & 0o777").ok().results == [str(0o700)]
    kernel.run("%unload_ext mpnb").ok()
    assert kernel.run(f"os.path.exists({path!r}), f()").ok().results == ["(False, 1)"]
    assert "UsageError: Cell magic `%%mppool` not found" in kernel.run("%%mppool\ndef f():\n    pass").stderr


def test_pool_is_bound_and_reused_across_cells(kernel):
    kernel.run("%load_ext mpnb").ok()
    reply = kernel.run("%%mppool -n 2\ndef sq(x):\n    return x * x\nfirst = pool\npool.map(sq, range(5))").ok()
    assert reply.results == ["[0, 1, 4, 9, 16]"]
    reply = kernel.run("%%mppool -n 2 --name p2\ndef cube(x):\n    return x ** 3\np2.map(cube, range(4))").ok()
    assert reply.results == ["[0, 1, 8, 27]"]
    running = _workers(kernel)
    reply = kernel.run("%%mppool -n 2\ndef inc(x):\n    return x + 1\n(pool is first, pool.map(inc, range(3)))").ok()
    assert reply.results == ["(True, [1, 2, 3])"]
    # the third cell reused the first cell's pool and its warm workers
    assert _workers(kernel) == running


def _workers(kernel) -> set[int]:
    """The pids below the kernel, but the workers' guardians: a worker still
    starting forks its guardian a moment later."""
    found = set()
    for process in kernel.descendants():
        try:
            if process.name() != GUARDIAN_NAME:
                found.add(process.pid)
        except psutil.Error:
            continue
    return found


def test_by_value_keeps_definitions_in_main(kernel):
    kernel.run("%load_ext mpnb\nimport threading\nOFF = 1").ok()
    reply = kernel.run("%%mppool --by-value -n 2\ndef f(x):\n    return x + OFF\nprint(f.__module__)\npool.map(f, range(3))").ok()
    assert reply.stdout == "__main__\n" and reply.results == ["[1, 2, 3]"]
    kernel.run("lk = threading.Lock()").ok()
    reply = kernel.run("%%mppool --by-value\ndef g():\n    return lk\npool.map(g, [])")
    assert reply.ename == "UnpicklableNameError" and "`g` uses `lk`" in reply.evalue


def test_quickstart_notebook(tag):
    nb = run_notebook("quickstart.ipynb", tag=tag)
    assert notebook_errors(nb) == []
    code = [c for c in nb.cells if c.cell_type == "code"]
    shown = [cell_text(c) for c in code]
    assert "an ordinary cell + a spawn pool: BrokenProcessPool" in shown[0]
    expected = "[0.5, 3.5, 4.743, 5.696, 6.5, 7.208, 7.848, 8.437]"
    # the cell's value; a map slower than the live view's delay also leaves a summary
    results = [o.data["text/plain"] for o in code[3].outputs if o.output_type == "execute_result"]
    assert results == [expected]
    assert f"multiprocessing spawn Pool: {expected}" in shown[4]


def test_reload_registers_cleanup_once(kernel):
    kernel.run("%load_ext mpnb\nimport signal\nfirst = signal.getsignal(signal.SIGTERM)").ok()
    kernel.run("%unload_ext mpnb\n%load_ext mpnb").ok()
    assert kernel.run("signal.getsignal(signal.SIGTERM) is first").ok().results == ["True"]


def test_a_terminated_fork_of_the_kernel_keeps_the_directory(kernel):
    # fork-context workers inherit the kernel's exit and SIGTERM hooks
    kernel.run("%load_ext mpnb\nimport multiprocessing as mp, os\nfrom mpnb import cells").ok()
    reply = kernel.run(
        "p = mp.get_context('fork').Pool(1)\np.map(abs, [1])\np.terminate(); p.join()\n"
        "os.path.isdir(cells.kernel_dir())"
    ).ok()
    assert reply.results == ["True"]
