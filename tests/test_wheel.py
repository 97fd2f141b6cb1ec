"""The built wheel, installed as a user installs it, runs the demo.

An editable install reads the checkout, so it cannot show what a wheel lacks.
Here the wheel is built from a copy of the sources (no stale ``build/`` can
fill a gap), installed with the ``demo`` extra into a new virtual environment,
and ``python -m mpnb.demo`` runs there from a directory outside the checkout,
with its own environment's interpreter and nothing of the checkout on its path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kernel import NOTEBOOKS, SOURCE, TAG_VAR, kernel_env

# building and installing read the pip cache, or the index when it is cold
INSTALL_SECONDS = 600
EXPECTED = "[0.5, 3.5, 4.743, 5.696, 6.5, 7.208, 7.848, 8.437]"


def _run(cmd: list, **options) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **options)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "mpnb"
    shutil.copytree(SOURCE, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "artifacts", ".pytest_cache",
        # the Python 3.14 leg's Debian chroot (scripts/test-py314): its /dev holds device
        # nodes, and copying /dev/zero never ends
        ".chroot-*"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, src],
         timeout=INSTALL_SECONDS)
    (built,) = out.glob("mpnb-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The python of a new virtual environment with the wheel and its demo extra."""
    env = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", env], timeout=INSTALL_SECONDS)
    python = env / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", f"{wheel}[demo]"], timeout=INSTALL_SECONDS)
    return python


def _outside_env(tag: str) -> dict[str, str]:
    env = kernel_env(tag)
    # nothing may lead back to the checkout or to the tests' own kernelspec
    for name in ("PYTHONPATH", "JUPYTER_PATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def test_the_wheel_holds_every_notebook(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    notebooks = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert "quickstart.ipynb" in notebooks
    missing = [n for n in notebooks if f"mpnb/notebooks/{n}" not in names]
    assert missing == [], f"notebooks missing from {wheel.name}: {missing}"


@pytest.mark.timeout(2 * INSTALL_SECONDS)
def test_installed_wheel_runs_the_quickstart_demo(installed, tmp_path, tag):
    env = _outside_env(tag)
    where = _run([installed, "-c", "import mpnb.demo; print(mpnb.demo.QUICKSTART)"],
                 cwd=tmp_path, env=env, timeout=120).stdout.strip()
    assert Path(where).is_relative_to(installed.parent.parent.resolve()), where
    assert env[TAG_VAR] == tag  # the demo's kernel and workers are checked for leftovers

    done = _run([installed, "-m", "mpnb.demo"], cwd=tmp_path, env=env, timeout=INSTALL_SECONDS)
    out = done.stdout
    assert f"Running quickstart.ipynb in a real Jupyter kernel ({installed})" in out
    assert "an ordinary cell + a spawn pool: BrokenProcessPool" in out
    assert "%%mppool -n 2" in out and EXPECTED in out
    assert f"multiprocessing spawn Pool: {EXPECTED}" in out
    assert "work lives in mpnb.cells.cell_" in out
    assert out.rstrip().endswith("All cells ran."), out
    assert not list(tmp_path.iterdir()), "the demo left files in its working directory"


def test_the_suite_tests_the_mpnb_it_was_asked_to():
    """`MPNB_INSTALL=wheel scripts/test` runs the whole suite against the
    installed wheel; the default runs it against the checkout (editable)."""
    import mpnb

    package = Path(mpnb.__file__).resolve().parent
    checkout = (SOURCE / "mpnb").resolve()
    if os.environ.get("MPNB_INSTALL") == "wheel":
        assert package.is_relative_to(Path(sys.prefix).resolve()) and package != checkout, package
    else:
        assert package == checkout, package


def test_demo_shows_one_print_split_by_the_kernel_as_written():
    """ipykernel flushes a stream on a timer, so under load one ``print`` can
    reach the notebook as two stream outputs; the demo's report (and every
    kernel test that reads a cell's text) joins them as the page shows them,
    and keeps a result or another stream on a line of its own."""
    import nbformat

    from mpnb.demo import shown

    cell = nbformat.v4.new_code_cell("print('ProcessPoolExecutor:', [0.5]); 3")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="ProcessPoolExecutor:"),
        nbformat.v4.new_output("stream", name="stdout", text=" [0.5]\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": "3"}, execution_count=1),
        nbformat.v4.new_output("stream", name="stderr", text="a warning"),
    ]
    assert shown(cell) == "ProcessPoolExecutor: [0.5]\n3\na warning\n"
