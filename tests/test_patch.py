"""mpnb.patch(): the stdlib's pool names create mpnb.Pools, and unpatch() puts them back.

Real worker processes; every test that starts them carries the ``tag``
fixture, and the pools the patch creates get the tag through ``env``.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import multiprocessing.context
import multiprocessing.pool

import pytest

import mpnb
from kernel import TAG_VAR, Kernel


def square(x: int) -> int:
    return x * x


@pytest.fixture
def patched(tag):
    mpnb.patch(live=False, env={TAG_VAR: tag})
    try:
        yield
    finally:
        mpnb.unpatch()


def _names() -> tuple:
    return (vars(multiprocessing).get("Pool"), vars(multiprocessing.context.BaseContext)["Pool"],
            vars(cf).get("ProcessPoolExecutor"))


def test_stdlib_pool_names_create_mpnb_pools_with_their_arguments(patched):
    with multiprocessing.Pool(2) as pool:
        assert isinstance(pool, mpnb.Pool) and pool.workers == 2
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
    with multiprocessing.get_context("forkserver").Pool(processes=1) as pool:
        assert isinstance(pool, mpnb.Pool) and pool._engine.method == "forkserver"
        assert pool.map(square, [3]) == [9]
    with cf.ProcessPoolExecutor(max_workers=1) as executor:
        assert isinstance(executor, mpnb.Pool)
        assert isinstance(executor, cf.ProcessPoolExecutor)
        assert executor.submit(square, 4).result(timeout=60) == 16
    assert not isinstance(executor, multiprocessing.pool.Pool)


def test_fork_is_refused_with_the_reason_and_the_fix(patched):
    with pytest.raises(ValueError, match=r"get_context\('fork'\).*never uses.*spawn.*mpnb.unpatch"):
        multiprocessing.get_context("fork").Pool(1)
    with pytest.raises(ValueError, match=r"ProcessPoolExecutor.*'fork'"):
        cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))


def test_subclasses_of_the_real_classes_still_build_real_pools(patched, tag):
    class Executor(cf.ProcessPoolExecutor):  # derived from the patched name
        pass

    with Executor(1, mp_context=multiprocessing.get_context("forkserver")) as executor:
        assert not isinstance(executor, mpnb.Pool)
        assert isinstance(executor, cf.process.ProcessPoolExecutor)
        assert executor.submit(square, 5).result(timeout=60) == 25
    assert multiprocessing.pool.Pool.__module__ == "multiprocessing.pool"


def test_unpatch_restores_exactly_what_was_there_and_patching_twice_is_harmless():
    before = _names()
    mpnb.patch()
    mpnb.patch(timeout=5)
    assert _names() != before
    mpnb.unpatch()
    assert all(a is b for a, b in zip(_names(), before))
    mpnb.unpatch()  # not patched: nothing happens
    assert all(a is b for a, b in zip(_names(), before))


def test_unknown_options_are_refused_by_name():
    with pytest.raises(TypeError, match=r"mpnb.patch\(bogus=...\).*mpnb.Pool"):
        mpnb.patch(bogus=1)
    assert not mpnb.patching.patched()


@pytest.mark.kernel
def test_magic_runs_a_stdlib_pool_cell_unchanged_on_mpnb_and_off_undoes_it(kernel):
    kernel.run("%load_ext mpnb").ok()
    kernel.run("%mppool_patch").ok()
    reply = kernel.run(
        "import multiprocessing\n"
        "def double(x):\n"
        "    return 2 * x\n"
        "pool = multiprocessing.get_context('spawn').Pool(2)\n"
        "print(type(pool).__module__, pool.map(double, range(4)))\n"
        "pool.shutdown()\n",
        timeout=120,
    ).ok()
    assert "mpnb.pool [0, 2, 4, 6]" in reply.stdout
    kernel.run("%mppool_patch --off").ok()
    reply = kernel.run("print(multiprocessing.Pool.__self__ is multiprocessing.context._default_context)").ok()
    assert "True" in reply.stdout


# a cell as a multiprocessing tutorial writes it, with a function defined in the cell
STDLIB_CELL = """
import multiprocessing
def square(x):
    return x * x
got = []
pool = {make}
first = pool.apply_async(square, (7,), callback=got.append)
squares = pool.map_async(square, range(6), 2)
print(first.get(timeout=120), squares.get(timeout=120))
pool.close()
pool.join()
print(got, first.successful(), type(pool).__module__)
"""


@pytest.mark.kernel
def test_a_multiprocessing_cell_runs_unchanged_on_mpnb_and_under_the_patch(kernel):
    kernel.run("%load_ext mpnb\nimport mpnb").ok()
    # one name changed: mpnb.Pool for multiprocessing's
    reply = kernel.run(STDLIB_CELL.format(make="mpnb.Pool(2)"), timeout=120).ok()
    assert reply.stdout.splitlines()[-2:] == ["49 [0, 1, 4, 9, 16, 25]", "[49] True mpnb.pool"], reply.stdout
    # nothing changed: the patch makes the stdlib's name an mpnb.Pool
    kernel.run("%mppool_patch").ok()
    reply = kernel.run(STDLIB_CELL.format(make="multiprocessing.get_context('spawn').Pool(2)"), timeout=120).ok()
    assert reply.stdout.splitlines()[-2:] == ["49 [0, 1, 4, 9, 16, 25]", "[49] True mpnb.pool"], reply.stdout
    kernel.run("%mppool_patch --off").ok()
