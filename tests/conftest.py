from __future__ import annotations

import pytest

from kernel import Kernel, assert_no_leftovers, new_tag


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


def pytest_report_header(config):
    import mpnb

    return f"mpnb under test: {mpnb.__file__}"
