"""Per-worker resources and memory limits (mpnb.resources) on real worker processes.

Every pool carries the test's tag, so the ``tag`` fixture fails a test that
leaves a worker behind.  Tasks that must run on both workers at once meet at
a rendezvous (files in a shared directory), so no check depends on speed.
Memory tests allocate a few hundred MiB at most: a runaway task gives up by
itself at 1 GiB, so a watcher that failed cannot take the machine down.
"""

from __future__ import annotations

import os
import time

import pytest

import mpnb
from kernel import TAG_VAR
from mpnb import facts, resources, widget
from mpnb.errors import WorkerMemoryError
from mpnb.events import WorkerStopped
from resource_tasks import DEADLINE, SLOT_VARS, crash_rank_1, hold, rank, runaway_or_wait, slot_facts


# ------------------------------------------------------------ slots


@pytest.mark.parametrize("context", ["exec", "spawn"])
def test_each_slot_gets_its_env_gpu_and_cpus_and_a_replacement_keeps_them(tag, tmp_path, context):
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(usable) < 2:
        pytest.skip("pin=True needs os.sched_setaffinity and 2 CPUs")
    with mpnb.Pool(2, context=context, live=False, env={TAG_VAR: tag}, worker_env=lambda r: {"RANK": str(r)},
                   gpus=[0, 1], pin=True) as pool:
        first = _slots(pool, tmp_path / "first")
        assert {f["RANK"] for f in first.values()} == {"0", "1"}
        assert SLOT_VARS[1:] == resources.GPU_VARS
        for seen in first.values():
            # each slot its device, under every vendor's variable
            assert all(seen[var] == seen["RANK"] for var in resources.GPU_VARS), seen
            # its own CPUs, and thread caps that follow their number
            assert seen["cpus"] and set(seen["cpus"]) <= set(usable)
            assert seen["threads"] == str(len(seen["cpus"]))
        sets = [set(f["cpus"]) for f in first.values()]
        assert not sets[0] & sets[1]
        rows = {r.rank: r for r in pool.monitor.snapshot()}
        assert {r: rows[r].device for r in rows} == {0: "0", 1: "1"}

        # the higher slot: a new worker numbered after the dead one would not land on it by chance
        _wait_for(lambda: sum(r.state == "idle" for r in pool.monitor.snapshot()) == 2)
        (tmp_path / "crash").mkdir()
        with pytest.raises(mpnb.pool.WorkerCrashedError):
            pool.map(crash_rank_1, [str(tmp_path / "crash")] * 2, chunksize=1)
        crashed = next(pid for pid, f in first.items() if f["RANK"] == "1")
        after = _slots(pool, tmp_path / "after")
        assert crashed not in after
        replacement = next(f for pid, f in after.items() if pid not in first)
        assert {k: v for k, v in replacement.items() if k != "pid"} == \
            {k: v for k, v in first[crashed].items() if k != "pid"}


def _slots(pool, directory) -> dict[int, dict]:
    # both workers ready: a fast call's second task could otherwise queue behind the first
    _wait_for(lambda: sum(r.state == "idle" for r in pool.monitor.snapshot()) == 2)
    directory.mkdir()
    seen = pool.map(slot_facts, [str(directory)] * 2, chunksize=1)
    return {f["pid"]: f for f in seen}


def test_options_are_refused_with_their_fix(tag):
    with pytest.raises(ValueError, match=r"max_memory='lots'.*'2GiB'"):
        mpnb.Pool(1, max_memory="lots", env={TAG_VAR: tag})
    with pytest.raises(TypeError, match=r"worker_env=.*function of the worker's rank"):
        mpnb.Pool(1, worker_env={"RANK": "0"}, env={TAG_VAR: tag})
    with pytest.raises(TypeError, match=r"worker_env\(0\) returned"):
        mpnb.Pool(1, worker_env=lambda rank: {"RANK": rank}, env={TAG_VAR: tag})
    with pytest.raises(ValueError, match=r"soft_memory='2GiB' is not below max_memory='1GiB'"):
        mpnb.Pool(1, max_memory="1GiB", soft_memory="2GiB", env={TAG_VAR: tag})
    with pytest.raises(TypeError, match=r"gpus=\[\]: give 'auto'"):
        mpnb.Pool(1, gpus=[], env={TAG_VAR: tag})
    for option in ({"max_memory": "1GiB"}, {"gpus": [0]}, {"pin": True}, {"worker_env": str}):
        name = next(iter(option))
        # refused before any connection is tried
        with pytest.raises(ValueError, match=rf"{name}=.*is for the local backend"):
            mpnb.Pool(1, backend="dask", address="tcp://127.0.0.1:9", **option)
        with pytest.raises(ValueError, match=rf"{name}=.*is for the local backend: the threads"):
            mpnb.Pool(1, backend="threads", **option)
        with pytest.raises(ValueError, match=rf"{name}=.*is for the local backend: the subinterpreters"):
            mpnb.Pool(1, backend="interpreters", **option)  # on any Python, before the 3.14 check
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
        with pytest.raises(ValueError, match=rf"may use {cpus} CPUs.*{cpus + 1} workers: use workers={cpus}"):
            mpnb.Pool(cpus + 1, pin=True, env={TAG_VAR: tag})
    if not resources.find_gpus():
        with pytest.raises(ValueError, match=r"gpus='auto' found no GPU here \(it looked at"):
            mpnb.Pool(1, gpus="auto", env={TAG_VAR: tag})


# ------------------------------------------------------------ memory


def test_a_task_past_max_memory_fails_alone_and_its_slot_is_refilled(tag, tmp_path):
    env = {TAG_VAR: tag, "MARKER": str(tmp_path / "started")}
    with mpnb.Pool(2, live=False, env=env, max_memory="250MiB", on_error="collect",
                   worker_env=lambda r: {"RANK": str(r)}) as pool:
        results = pool.map(runaway_or_wait, range(6), chunksize=1)
        error = results[0]
        assert isinstance(error, WorkerMemoryError) and isinstance(error, MemoryError)
        assert mpnb.WorkerMemoryError is WorkerMemoryError
        message = str(error)
        assert "task 0 (argument 0)" in message and "max_memory='250MiB'" in message, message
        peak = float(message.split(" hold ")[1].split(" MiB")[0])
        assert peak > 250, message
        assert results[1:] == [1, 2, 3, 4, 5]

        killed = _wait_for(lambda: [e for e in pool.monitor.events()[0]
                                    if isinstance(e, WorkerStopped) and e.reason == "memory"])
        assert len(killed) == 1
        _wait_for(lambda: sum(r.state == "idle" for r in pool.monitor.snapshot()) == 2)
        rows = pool.monitor.snapshot()
        assert killed[0].pid not in {r.pid for r in rows}
        assert {r.rank for r in rows} == {0, 1}
        assert {r.memory_limit for r in rows} == {250 << 20}
        assert pool.submit(rank).result(timeout=DEADLINE) in ("0", "1")


def test_soft_memory_recycles_a_worker_between_tasks_without_a_warning(tag, recwarn, capfd):
    with mpnb.Pool(1, live=False, env={TAG_VAR: tag}, soft_memory="100MiB") as pool:
        small = pool.submit(hold, 1).result(timeout=DEADLINE)
        assert pool.submit(hold, 1).result(timeout=DEADLINE) == small  # below the limit: kept
        big = pool.submit(hold, 150).result(timeout=DEADLINE)
        assert big == small
        after = pool.submit(hold, 1).result(timeout=DEADLINE)
        assert after != big  # recycled once it held 150 MiB
        assert pool.submit(hold, 1).result(timeout=DEADLINE) == after
    assert not recwarn.list
    out, err = capfd.readouterr()
    assert "memory" not in (out + err).lower()


def _wait_for(found):
    deadline = time.monotonic() + DEADLINE
    while True:
        value = found()
        if value:
            return value
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


# ------------------------------------------------------------ the view


def test_the_view_shows_each_workers_device_and_memory_against_the_limit():
    rows = [facts.Row(101, "busy", device="0", rss=120 << 20, memory_limit=2 << 30),
            facts.Row(102, "idle", device="1", rss=None, memory_limit=2 << 30)]
    html = widget.rows_html(rows)
    assert "<th" in html and ">GPU</th>" in html
    assert "120.0 MiB / 2.0 GiB" in html and "- / 2.0 GiB" in html
    text = facts.summary_text(facts.Facts("pool", "local", "exec", 2, 2, 3, 0, 3, 1.0, tuple(rows), ()))
    assert "pid 101: busy, 0 done, 0 failed, GPU 0, memory 120.0 MiB / 2.0 GiB" in text


def test_sizes_read_as_people_write_them():
    assert resources.parse_size("2GiB", "max_memory") == 2 << 30
    assert resources.parse_size("1.5G", "max_memory") == 3 << 29
    assert resources.parse_size("500MB", "max_memory") == 500_000_000
    assert resources.parse_size(1 << 20, "max_memory") == 1 << 20


# ------------------------------------------------------------ in a kernel

KERNEL_CELLS = [
    """
import os, mpnb
pool = mpnb.Pool(2, max_memory="250MiB", gpus=[0, 1], live=False)
def runaway(n):
    if n == 0:
        blocks = [b"x" * (8 << 20) for _ in range(128)]  # 1 GiB: the limit failed
        return "not stopped"
    return n
""",
    "pool.map(runaway, range(4), chunksize=1)",
    "print(pool.last_results[1:], pool.map(abs, [-1, -2]))",
    "print(sorted((r.rank, r.device, r.memory_limit) for r in pool.monitor.snapshot())); pool.shutdown()",
]


@pytest.mark.kernel
def test_a_runaway_task_in_a_kernel_fails_alone_and_the_kernel_goes_on(kernel):
    replies = [kernel.run(cell) for cell in KERNEL_CELLS]
    replies[0].ok()
    assert replies[1].ename == "WorkerMemoryError", replies[1]
    assert "task 0 (argument 0)" in replies[1].evalue and "max_memory='250MiB'" in replies[1].evalue
    assert replies[2].ok().stdout.strip() == "[1, 2, 3] [1, 2]"
    assert replies[3].ok().stdout.strip() == str([(0, "0", 250 << 20), (1, "1", 250 << 20)])
