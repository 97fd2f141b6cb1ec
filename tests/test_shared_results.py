"""Large arrays come back from the workers through shared memory, and tasks
write into a ``mpnb.shared_array`` in place.

The proof that a result did not travel through the pipe is where its memory
lies in this process: ``/proc/self/maps`` names the file a region is mapped
from, and a result that came through the pipe lies in the heap, while one
that came through shared memory lies in a mapping of an unlinked
``mpnb-shared-`` file.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pandas as pd
import pytest

import mpnb
from mpnb.shared import SHARE_BYTES, backing_file

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
MB100 = 100 * 2**20 // 8  # float64 elements in 100 MB


def our_files() -> list[str]:
    directory = SHM or __import__("tempfile").gettempdir()
    return [n for n in os.listdir(directory) if n.startswith(f"mpnb-shared-{os.getpid()}-")]


def mapped_from(array) -> str | None:
    """The file the memory of ``array`` is mapped from in this process, as
    ``/proc/self/maps`` names it, or None for anonymous memory (the heap)."""
    address = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) > 5 and fields[5].startswith("/") else None
    return None


def full(i, n=MB100):
    array = np.empty(n)
    array.fill(i)
    array[0] = -i
    return array


def frame(n, shift=0.0):
    return pd.DataFrame({"x": np.arange(n, dtype=float) + shift, "y": np.arange(n, dtype=float) * 2,
                         "n": np.arange(n, dtype=np.int64)})


def doubled(df):
    """The frame doubled, and the files its argument's blocks are mapped from here."""
    return df * 2, [backing_file(block.values) for block in df._mgr.blocks]


def fill_row(args):
    out, i = args
    out[i] = np.arange(out.shape[1]) + 1000 * i
    return backing_file(out)


def fill_view(view, i):
    view[...] = i
    return backing_file(view)


class CrashWhilePacking:
    """Pickled after a large array in the same result: its file is written
    by then; the worker dies before it can send it."""

    def __init__(self, report: str):
        self.report = report

    def __reduce__(self):
        prefix = f"mpnb-shared-{os.getppid()}-"
        written = [n for n in os.listdir(SHM) if n.startswith(prefix) and "-worker-" in n]
        with open(self.report, "w") as f:
            f.write(str(len(written)))
        os._exit(9)


def result_then_crash(report):
    return [full(1, SHARE_BYTES), CrashWhilePacking(report)]


@pytest.fixture
def pool(tag):
    from kernel import TAG_VAR

    p = mpnb.Pool(2, env={TAG_VAR: tag})
    try:
        yield p
    finally:
        p.shutdown()


@pytest.mark.skipif(SHM is None, reason="shared memory files live in /dev/shm on Linux")
def test_a_returned_100mb_array_is_mapped_not_piped_and_writable(pool):
    results = pool.map(full, range(3), chunksize=1)
    for i, array in enumerate(results):
        assert array.shape == (MB100,) and array[0] == -i and array[1] == i and array[-1] == i
        where = mapped_from(array)
        assert where is not None and "mpnb-shared-" in where and where.endswith("(deleted)"), where
        assert array.flags.writeable
        array[:10] = 7.0  # a private copy-on-write mapping: ours to change
        assert array[0] == 7.0
    assert our_files() == []
    small = pool.apply(full, (1, 1000))
    assert mapped_from(small) is None and small[0] == -1, "small results come through the pipe"


@pytest.mark.skipif(SHM is None, reason="shared memory files live in /dev/shm on Linux")
def test_a_result_file_is_removed_when_its_worker_dies_before_sending_it(pool, tmp_path):
    report = str(tmp_path / "written")
    results = pool.map(result_then_crash, [report], on_error="collect")
    assert isinstance(results[0], mpnb.pool.WorkerCrashedError)
    assert open(report).read() == "1", "the worker had written its result's file when it died"
    assert our_files() == [], "the dead worker's file is removed while the pool serves on"
    assert pool.map(full, [2], chunksize=1)[0][0] == -2
    assert our_files() == []


def test_tasks_write_a_shared_array_in_place(pool):
    out = mpnb.shared_array((4, 1000), np.int64)
    assert type(out) is np.ndarray and out.sum() == 0 and out.flags.writeable
    files = pool.map(fill_row, [(out, i) for i in range(4)], chunksize=1)
    assert len(set(files)) == 1 and None not in files, "every task maps the one file"
    assert (out == np.arange(1000) + 1000 * np.arange(4)[:, None]).all()
    # views: a task gets its own part, and writes land there only
    pool.starmap(fill_view, [(out[i, ::2], i + 1) for i in range(4)], chunksize=1)
    assert (out[:, ::2] == np.arange(1, 5)[:, None]).all()
    assert (out[:, 1::2] == (np.arange(1, 1000, 2) + 1000 * np.arange(4)[:, None])).all()
    (path,) = set(files)
    assert os.path.exists(path)
    del out
    gc.collect()
    assert not os.path.exists(path), "the file goes with the array"
    assert our_files() == []


def test_a_shared_array_of_objects_is_refused():
    with pytest.raises(TypeError, match="Python objects cannot be shared"):
        mpnb.shared_array(3, object)


def test_a_numeric_dataframe_goes_and_comes_back_through_shared_memory(pool):
    df = frame(200_000)  # each block over SHARE_BYTES
    assert df._mgr.blocks[0].values.nbytes >= SHARE_BYTES
    (result, arg_files), = pool.map(doubled, [df])
    assert None not in arg_files, "the argument's blocks are mapped from shared files in the worker"
    pd.testing.assert_frame_equal(result, df * 2)
    for block in result._mgr.blocks:
        where = mapped_from(block.values)
        assert where is not None and "mpnb-shared-" in where, where
    result.iloc[0, 0] = -1.0  # writable, as any frame
    assert result.iloc[0, 0] == -1.0
    assert our_files() == []


def test_results_of_a_dask_pool_come_by_value(cluster):
    # dask workers may run on other machines: their results never go through files
    with mpnb.Pool(backend="dask", address=cluster.address) as pool:
        # numpy's own function: the cluster's workers cannot import this test module
        array = pool.apply(np.full, (SHARE_BYTES // 8 + 1, 3.0))
    assert array.nbytes >= SHARE_BYTES and (array == 3.0).all()
    assert mapped_from(array) is None and array.flags.writeable
    assert our_files() == []
