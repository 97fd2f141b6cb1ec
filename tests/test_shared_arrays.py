"""Large numpy arrays reach the workers through one shared file per call.

The tasks here look at the mechanism from inside the worker: the array they
get is a read-only view of a memory-mapped file, the same file for every
task of the call, and the file is gone once the call ends, also when a
worker crashed or the call was interrupted.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import numpy as np
import pytest

import mpnb
from mpnb.shared import SHARE_BYTES, NoRoomToShare, backing_file

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def maps_file(path):
    """Whether this worker still maps ``path`` (``/proc/self/maps`` keeps the name of an unlinked file)."""
    with open("/proc/self/maps") as maps:
        return path in maps.read()


def probe(args):
    """What a task sees of its array argument."""
    array, i = args
    path = backing_file(array)
    with open("/proc/self/maps") as f:
        mapped = path is not None and path in f.read()
    return {
        "path": path,
        "exists": path is not None and os.path.exists(path),
        "mapped": mapped,
        "writeable": array.flags.writeable,
        "digest": digest(array),
        "pid": os.getpid(),
        "row": float(array[i]["x"]) if array.dtype.names else float(array[i].sum()),
    }


def digest(array) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def write_into(array):
    array[0] = 1
    return "written"


def crash_on(args):
    array, i = args
    if i == 3:
        os._exit(7)
    return float(array[i].sum())


def sleep_on(args):
    array, i = args
    time.sleep(60)


def our_files() -> list[str]:
    directory = SHM or __import__("tempfile").gettempdir()
    return [n for n in os.listdir(directory) if n.startswith(f"mpnb-shared-{os.getpid()}-")]


def big(shape=(1024, 512), dtype=np.float64, order="C"):
    array = np.random.default_rng(1).random(shape).astype(dtype)
    return np.asarray(array, order=order)


@pytest.fixture
def pool(tag):
    from kernel import TAG_VAR

    # the exec launcher here; test_pool.py covers loky and spawn
    p = mpnb.Pool(2, env={TAG_VAR: tag}, context="exec")
    try:
        yield p
    finally:
        p.shutdown()


def test_one_file_mapped_read_only_by_every_task_and_removed_after(pool):
    array = big()
    assert array.nbytes >= SHARE_BYTES
    seen = pool.map(probe, [(array, i) for i in range(8)], chunksize=1)
    paths = {s["path"] for s in seen}
    assert len(paths) == 1 and None not in paths, "every task must see the same shared file"
    (path,) = paths
    assert all(s["exists"] and s["mapped"] and not s["writeable"] for s in seen)
    assert [s["row"] for s in seen] == [float(array[i].sum()) for i in range(8)]
    assert {s["digest"] for s in seen} == {digest(array)}
    assert not os.path.exists(path)
    assert our_files() == []
    # and the workers let go of it: the next call finds it mapped nowhere
    assert pool.map(maps_file, [path] * 8, chunksize=1) == [False] * 8


def test_calls_back_to_back_never_find_the_previous_file_mapped(pool):
    # the next call's chunks can reach a worker before it was ever idle
    # (most often on a busy machine): it must let go of the arrays even then
    still_mapped = 0
    array = big()
    for _ in range(10):
        seen = pool.map(probe, [(array, i) for i in range(4)], chunksize=1)
        (path,) = {s["path"] for s in seen}
        still_mapped += any(pool.map(maps_file, [path] * 8, chunksize=1))
    assert still_mapped == 0, f"{still_mapped} of 10 calls found the call before it still mapped"


@pytest.mark.parametrize("make", [
    lambda: big(order="F"),
    lambda: big((2048, 1024))[::2, ::3],
    lambda: big((4096, 1024))[:, ::2],  # 16 MB not contiguous: written in blocks of rows
    lambda: np.zeros(100_000, dtype=[("x", "<f8"), ("n", "<i4"), ("tag", "S4")]),
], ids=["fortran", "strided", "strided-blocks", "structured"])
def test_layouts_arrive_with_the_same_values(pool, make):
    array = make()
    if array.dtype.names:
        array["x"] = np.arange(len(array))
        array["n"] = -np.arange(len(array))
        array["tag"] = b"ab"
    seen = pool.map(probe, [(array, i) for i in range(4)], chunksize=1)
    assert all(s["path"] is not None and not s["writeable"] for s in seen)
    assert {s["digest"] for s in seen} == {digest(array)}
    assert our_files() == []


def test_small_and_object_arrays_are_pickled_as_before(pool):
    small = np.arange(10.0)
    objects = np.array([{"a": 1}] * (SHARE_BYTES // 8 + 1), dtype=object)
    seen = pool.map(probe, [(small, 1), (small, 2)], chunksize=1)
    assert all(s["path"] is None and s["writeable"] for s in seen)
    assert [s["row"] for s in seen] == [1.0, 2.0]
    assert pool.apply(backing_file, (objects,)) is None
    assert our_files() == []


def test_a_task_that_writes_to_a_shared_array_fails_alone(pool):
    results = pool.map(write_into, [big(), np.zeros(3)], on_error="collect")
    assert isinstance(results[0], ValueError) and "read-only" in str(results[0])
    assert results[1] == "written"


def test_submit_releases_when_its_future_is_done(pool):
    array = big()
    future = pool.submit(probe, (array, 5))
    seen = future.result(timeout=60)
    assert seen["path"] is not None and seen["row"] == float(array[5].sum())
    assert not os.path.exists(seen["path"]) and our_files() == []


def test_file_removed_after_a_worker_crash(pool):
    array = big()
    results = pool.map(crash_on, [(array, i) for i in range(6)], chunksize=1, on_error="collect")
    assert isinstance(results[3], mpnb.pool.WorkerCrashedError)
    assert [r for i, r in enumerate(results) if i != 3] == [float(array[i].sum()) for i in (0, 1, 2, 4, 5)]
    assert our_files() == []
    assert pool.map(probe, [(array, 0)])[0]["path"] is not None, "the pool serves on"
    assert our_files() == []


def test_file_removed_after_an_interrupt(pool):
    array = big()

    def interrupt_when_running():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if our_files() and any(row.state == "busy" for row in pool.monitor.snapshot()):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)

    interrupter = threading.Thread(target=interrupt_when_running)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        pool.map(sleep_on, [(array, i) for i in range(4)], chunksize=1)
    interrupter.join()
    assert our_files() == []
    assert isinstance(pool.last_results[0], BaseException)


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="no file size limit to stand in for a full /dev/shm")
def test_no_room_for_a_shared_array_is_a_clear_error_and_the_pool_serves_on(pool):
    import resource

    array = big()
    # a file size limit fails the write as a full /dev/shm does (it would
    # otherwise raise SIGXFSZ, whose default ends the process)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (array.nbytes // 2, hard))
    try:
        results = pool.map(probe, [(array, i) for i in range(4)] + [(np.zeros(3), 0)], chunksize=2,
                           on_error="collect")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert all(isinstance(r, NoRoomToShare) and isinstance(r, OSError) for r in results[:4]), results
    assert results[4]["row"] == 0.0, "a task without the array runs"
    message = str(results[0])
    assert f"shape {array.shape}" in message and f"{array.nbytes:,} bytes" in message
    assert "MPNB_SHARE_BYTES" in message and "/dev/shm" in message
    assert our_files() == []
    assert pool.map(probe, [(array, 0)])[0]["row"] == float(array[0].sum()), "the pool serves on"
    assert our_files() == []
