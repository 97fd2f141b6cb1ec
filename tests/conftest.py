from __future__ import annotations

import pytest

from kernel import Kernel, assert_no_leftovers, install_kernelspec, new_tag


def pytest_configure(config):
    install_kernelspec()


@pytest.fixture
def tag():
    """A fresh process tag; afterwards no process carrying it may be alive."""
    value = new_tag()
    yield value
    assert_no_leftovers(value)


@pytest.fixture
def kernel(tag):
    """A real ipykernel, shut down (and checked for leftovers) afterwards."""
    k = Kernel(tag)
    try:
        yield k
    finally:
        k.shutdown()


@pytest.fixture(scope="module")
def cluster():
    """A real dask.distributed scheduler and two one-thread workers on
    127.0.0.1, one per test module; its processes carry their own tag, and
    none may be left once the module's tests are done."""
    pytest.importorskip("distributed")
    from daskcluster import Cluster

    tag = new_tag()
    running = Cluster(tag, workers=2, threads=1)
    try:
        yield running
    finally:
        running.stop()
        assert_no_leftovers(tag)


def pytest_report_header(config):
    import mpnb

    return f"mpnb under test: {mpnb.__file__}"
