"""A worker imports what its parent imports.

Exec workers start without ``site`` (``python -S``) and get the parent's
``sys.path``; the ``.pth`` files of the parent's site directories (an
editable install's finder) run in a worker when it first imports a name
their finders find.  These tests start real workers and compare module files.

The tasks live in ``probe.py``, written next to each test: a worker that
unpickles them imports only that small module, not pytest.
"""

from __future__ import annotations

import importlib
import site
import sys

import pytest

import mpnb
from kernel import TAG_VAR, wait_until

PROBE = '''
import importlib
import sys


def module_file(name):
    return importlib.import_module(name).__file__


def imported(name):
    return name in sys.modules


def path(_):
    return sys.path


def call_exit(code):
    exit(code)


def loaded(names):
    return [name for name in names if name in sys.modules]


def where(name):
    import os

    return os.getpid(), name in sys.modules


def spawn_flags(_):
    import multiprocessing.util

    return multiprocessing.util._args_from_interpreter_flags()
'''

FINDER = '''
"""A meta-path finder as an editable install's .pth file installs one."""
import importlib.util
import sys

{mapping}


class Finder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "edpkg":
            return None
        return importlib.util.spec_from_file_location(
            name, {source!r} + "/edpkg/__init__.py", submodule_search_locations=[{source!r} + "/edpkg"])


def install():
    if Finder not in sys.meta_path:
        sys.meta_path.append(Finder)
'''


@pytest.fixture
def probe(tmp_path, monkeypatch):
    directory = tmp_path / "probe"
    directory.mkdir()
    (directory / "probe.py").write_text(PROBE)
    monkeypatch.setattr(sys, "path", [str(directory), *sys.path])
    yield importlib.import_module("probe")
    sys.modules.pop("probe", None)


@pytest.fixture(params=["names known", "names unknown"])
def editable(request, tmp_path, monkeypatch, probe):
    """A package ``edpkg`` found only through a finder that a ``.pth`` file
    of a site directory installs, as ``pip install -e`` does; its module
    lists its names as setuptools' does, or not."""
    source = tmp_path / "src"
    (source / "edpkg").mkdir(parents=True)
    (source / "edpkg" / "__init__.py").write_text("VALUE = 42\n")
    sitedir = tmp_path / "site-packages"
    sitedir.mkdir()
    mapping = f"MAPPING = {{'edpkg': {str(source / 'edpkg')!r}}}" if request.param == "names known" else ""
    (sitedir / "_edpkg_finder.py").write_text(FINDER.format(source=str(source), mapping=mapping))
    (sitedir / "__editable__.edpkg.pth").write_text("import _edpkg_finder; _edpkg_finder.install()\n")
    # this process's site directories now include it, as if site had found it at start-up
    sitepackages = site.getsitepackages()
    monkeypatch.setattr(site, "getsitepackages", lambda *a: [*sitepackages, str(sitedir)])
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    site.addsitedir(str(sitedir))
    yield request.param
    for name in ("edpkg", "_edpkg_finder"):
        sys.modules.pop(name, None)


def test_worker_imports_an_editable_package_from_its_finder(editable, probe, tag):
    """The package is on no sys.path entry: the worker finds it only through
    the finder the site directory's .pth file installs, as the parent did."""
    parent_file = probe.module_file("edpkg")
    with mpnb.Pool(2, context="exec", live=False, env={TAG_VAR: tag}) as pool:
        assert pool.map(probe.module_file, ["edpkg", "edpkg"]) == [parent_file, parent_file]


def test_site_runs_in_a_worker_only_for_the_names_its_finders_find(editable, probe, tag):
    """A worker whose tasks import only what sys.path holds does not run the
    .pth files (their cost is what -S saves) when their finders list their
    names; it runs them when it imports one of those names."""
    with mpnb.Pool(1, context="exec", live=False, env={TAG_VAR: tag}) as pool:
        assert pool.map(probe.imported, ["_edpkg_finder"]) == [editable == "names unknown"]
        pool.map(probe.module_file, ["edpkg"])
        assert pool.map(probe.imported, ["_edpkg_finder"]) == [True]


def test_worker_sys_path_is_the_parents_with_entries_added_at_run_time(probe, tag):
    """A module on a sys.path entry the parent added after it started (as a
    notebook does with sys.path.insert) is the same file in a worker, whose
    sys.path is the parent's, in order."""
    with mpnb.Pool(1, context="exec", live=False, env={TAG_VAR: tag}) as pool:
        assert pool.map(probe.module_file, ["probe"]) == [probe.__file__]
        assert pool.map(probe.path, [None]) == [sys.path]


def test_exit_builtin_exists_in_a_worker(probe, tag):
    """``exit()`` is defined by site; a worker started without it still has it."""
    with mpnb.Pool(1, context="exec", live=False, on_error="collect", env={TAG_VAR: tag}) as pool:
        [outcome] = pool.map(probe.call_exit, [3])
    assert isinstance(outcome, SystemExit), outcome
    assert outcome.code == 3


def test_processes_a_task_spawns_get_the_parents_interpreter_flags(probe, tag):
    """A stdlib spawn pool or forkserver a task starts passes its children
    the parent's interpreter flags, not the worker's -S -P: they run site
    as the parent did, so they find its editable packages."""
    import subprocess

    with mpnb.Pool(1, context="exec", live=False, env={TAG_VAR: tag}) as pool:
        assert pool.map(probe.spawn_flags, [None]) == [subprocess._args_from_interpreter_flags()]


#: what an exec worker has not loaded when its first task starts: each costs
#: every worker's start (a cold pool's first result) a millisecond or more
HEAVY = ("enum", "signal", "threading", "typing", "re", "logging", "pickle", "inspect", "pathlib",
         "subprocess", "tempfile", "multiprocessing", "cloudpickle", "numpy")


#: the standard modules a worker needs (ctypes for prctl on Linux, and on
#: Python 3.14 ctypes imports sysconfig, which imports threading)
NEEDED = "_pickle, ctypes, faulthandler, gc, mmap"


def test_an_exec_worker_starts_without_heavy_modules(probe, tag):
    """The worker module and its set-up import only C modules and a few
    light ones: nothing above is loaded before a task needs it, but what
    the standard modules a worker needs load themselves."""
    import ast
    import subprocess

    names = ", ".join(map(repr, HEAVY))
    bare = subprocess.run([sys.executable, "-S", "-P", "-c",
                           f"import sys, {NEEDED}; print([n for n in ({names}) if n in sys.modules])"],
                          capture_output=True, text=True, check=True).stdout
    with mpnb.Pool(1, context="exec", live=False, env={TAG_VAR: tag}) as pool:
        assert pool.map(probe.loaded, [HEAVY]) == [ast.literal_eval(bare)]


def test_an_idle_worker_loads_a_calls_function_while_another_runs_it(probe, tag, tmp_path):
    """A call's function goes to the idle workers as its first task goes to
    one: they import its module then, not at their first task of it."""
    (tmp_path / "probe" / "second.py").write_text("def same(x):\n    return x\n")
    second = importlib.import_module("second")
    try:
        with mpnb.Pool(2, context="exec", live=False, env={TAG_VAR: tag}) as pool:
            wait_until(lambda: sum(r.state == "idle" for r in pool.monitor.snapshot()) == 2, "two idle workers")
            assert pool.apply(second.same, (1,)) == 1  # one worker runs it
            found = pool.map(probe.where, ["second"] * 2, chunksize=1)
    finally:
        sys.modules.pop("second", None)
    assert len({pid for pid, _ in found}) == 2, found  # one task each
    assert all(loaded for _, loaded in found), found
