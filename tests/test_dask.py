"""The dask backend against a real cluster: a scheduler and two workers,
separate processes on 127.0.0.1 that never saw a notebook (one cluster for
the module: the ``cluster`` fixture of ``conftest.py``).

Tests in this process send stdlib functions, which every worker imports;
notebook functions and ``%%mppool`` cells run in real kernels.
"""

from __future__ import annotations

import operator
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytest.importorskip("distributed")

import mpnb  # noqa: E402
from daskcluster import Cluster  # noqa: E402
from kernel import cell_text, notebook_errors, run_notebook  # noqa: E402
from mpnb.pool import RemoteTraceback, TaskTimeoutError  # noqa: E402


@pytest.fixture
def pool(cluster):
    p = mpnb.Pool(backend="dask", address=cluster.address)
    try:
        yield p
    finally:
        p.shutdown()


def test_notebook_same_cell_locally_and_on_the_cluster(cluster, tag):
    nb = run_notebook("dask.ipynb", tag=tag, env={"DASK_SCHEDULER_ADDRESS": cluster.address})
    assert notebook_errors(nb) == []
    texts = [cell_text(c) for c in nb.cells if c.cell_type == "code"]
    assert any("equal results: True" in t for t in texts)
    assert sum("work(5)" in t for t in texts) == 2  # the workers' prints, shown in each cell
    assert any("mpnb: raised by task 2 (argument 2) on dask worker tcp://127.0.0.1:" in t for t in texts)


def test_calls_run_on_the_cluster(pool, cluster, capsys):
    assert pool.backend == "dask" and pool.address == cluster.address and pool.workers == 2
    assert pool.map(abs, range(-5, 5)) == [abs(x) for x in range(-5, 5)]
    assert pool.map(pow, [2, 3], [5, 2]) == [32, 9]
    assert pool.starmap(divmod, [(7, 2), (9, 4)]) == [(3, 1), (2, 1)]
    assert list(pool.imap(str, range(7))) == [str(x) for x in range(7)]
    assert sorted(pool.imap_unordered(abs, [-3, 1, -2])) == [1, 2, 3]
    assert pool.submit(pow, 2, 10).result() == 1024
    assert pool.apply(int, ("ff",), {"base": 16}) == 255
    capsys.readouterr()
    pool.map(print, ["first", "second"])
    assert capsys.readouterr().out == "first\nsecond\n"
    rows = pool.monitor.sample()
    assert len(rows) == 2 and all(r.address.startswith("tcp://127.0.0.1:") and r.rss > 0 for r in rows)
    assert sum(r.tasks_done for r in rows) >= 10 + 2 + 2 + 7 + 3 + 2 + 2


def test_task_error_names_the_task_and_worker(pool):
    with pytest.raises(ZeroDivisionError) as info:
        pool.map(operator.truediv, [1, 1, 1], [1, 0, 2])
    note = info.value.__notes__[-1]
    assert note.startswith("mpnb: raised by task 1 (arguments (1, 0)) on dask worker tcp://127.0.0.1:")
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "ZeroDivisionError" in str(info.value.__cause__)
    results = pool.map(operator.truediv, [1, 1, 1], [1, 0, 2], on_error="collect")
    assert results[0] == 1.0 and results[2] == 0.5 and isinstance(results[1], ZeroDivisionError)
    assert pool.last_results == results


def test_an_unpicklable_result_is_explained_as_on_local_workers(pool):
    error = pool.submit(threading.Lock).exception(timeout=60)
    assert isinstance(error, mpnb.PicklingProblem), repr(error)
    assert str(error).startswith("the task's return value cannot be sent back from the worker: "
                                 "result (_thread.lock) does not pickle."), str(error)
    assert error.diagnosis.path == "result"
    assert pool.map(abs, [-1]) == [1]  # the pool keeps serving


def test_timeout_fails_the_task_on_the_client(pool):
    results = pool.map(time.sleep, [0, 3, 0], timeout=0.5, on_error="collect")
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], TaskTimeoutError)
    assert "task 1 (argument 3) ran for" in str(results[1])
    assert "dask cannot stop a running task" in str(results[1])
    assert pool.map(abs, [-1]) == [1]  # the pool keeps serving


def test_rerun_cell_replaces_the_module_on_workers(cluster, kernel):
    kernel.run(f"%load_ext mpnb\nADDRESS = {cluster.address!r}").ok()
    cell = "%%mppool --address $ADDRESS\ndef step(x):\n    return x + {k}\nresults = pool.map(step, range(3))\nresults"
    assert kernel.run(cell.format(k=1)).ok().results == ["[1, 2, 3]"]
    reply = kernel.run(cell.format(k=100)).ok()
    assert reply.results == ["[100, 101, 102]"]
    # the module the workers ran is the copy shipped into their own directories
    where = kernel.run(
        "import sys\n"
        "pool.map(lambda name: sys.modules[name].__file__, [step.__module__] * 2)"
    ).ok().results[0]
    assert "mpnb-cells" in where and str(cluster.root) in where
    usage = kernel.run("%%mppool -n 2 --address $ADDRESS\nx = 1")
    assert usage.stderr.startswith("UsageError: ") and "leave out -n" in usage.stderr
    kernel.run("pool.shutdown()").ok()


def test_interrupt_cancels_the_calls_tasks(cluster, kernel):
    kernel.run(
        "import mpnb, time\n"
        f"pool = mpnb.Pool(backend='dask', address={cluster.address!r})\n"
        "def slow(x):\n"
        "    if x == 0:\n"
        "        print('zero')\n"
        "    else:\n"
        "        time.sleep(2)\n"
        "    return x"
    ).ok()
    msg = kernel.submit("pool.map(slow, range(8), chunksize=1)")
    seen = ""
    while "zero" not in seen:  # task 0's output is shown once its result is in
        message = kernel.kc.get_iopub_msg(timeout=60)
        if message["parent_header"].get("msg_id") == msg and message["msg_type"] == "stream":
            seen += message["content"]["text"]
    kernel.interrupt()
    reply = kernel.collect(msg, timeout=60)
    assert reply.ename == "KeyboardInterrupt"
    kept = kernel.run("[type(r).__name__ for r in pool.last_results]").ok().results[0]
    assert kept.startswith("['int'") and "CancelledError" in kept
    assert kernel.run("pool.map(abs, [-4])").ok().results == ["[4]"]
    kernel.run("pool.shutdown()").ok()


def test_bad_options_are_refused(cluster):
    with pytest.raises(ValueError, match="does not take workers=2"):
        mpnb.Pool(2, backend="dask", address=cluster.address)
    with pytest.raises(ValueError, match="pass backend='dask'"):
        mpnb.Pool(address=cluster.address)
    with pytest.raises(ValueError, match="use 'local'"):
        mpnb.Pool(backend="ray")
    with pytest.raises(TypeError, match="not a int"):
        mpnb.Pool(backend="dask", address=8786)


def test_unreachable_scheduler_is_a_clear_error(monkeypatch):
    import mpnb.backends.dask as backend

    monkeypatch.setattr(backend, "CONNECT_TIMEOUT", 1.0)
    with pytest.raises(ConnectionError, match="could not connect to the dask scheduler at 'tcp://127.0.0.1:9'"):
        mpnb.Pool(backend="dask", address="tcp://127.0.0.1:9")


HIDE_MPNB = """
import sys

class HideMpnb:
    def find_spec(self, name, path=None, target=None):
        if name == "mpnb" or name.startswith("mpnb."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, HideMpnb())
"""


def test_worker_without_mpnb_is_named(tag, tmp_path):
    preload = tmp_path / "hide_mpnb.py"
    preload.write_text(HIDE_MPNB)
    lacking = Cluster(tag, workers=1, worker_args=("--preload", str(preload)))
    try:
        with pytest.raises(mpnb.backends.dask.DaskBackendError) as info:
            mpnb.Pool(backend="dask", address=lacking.address)
    finally:
        lacking.stop()
    message = str(info.value)
    assert "cannot import mpnb" in message and "tcp://127.0.0.1:" in message and "pip install mpnb==" in message


def test_missing_distributed_names_the_extra():
    code = textwrap.dedent("""
        import sys

        class HideDistributed:
            def find_spec(self, name, path=None, target=None):
                if name == "distributed" or name.startswith("distributed."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, HideDistributed())
        import mpnb
        try:
            mpnb.Pool(backend="dask", address="tcp://127.0.0.1:8786")
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert 'pip install "mpnb[dask]"' in out


def test_large_arrays_travel_in_the_task_not_through_local_shared_memory(pool):
    # a dask worker may be on another machine: this machine's /dev/shm is no use there
    np = pytest.importorskip("numpy")
    array = np.zeros(2**19)  # 4 MB, above MPNB_SHARE_BYTES
    assert pool.map(operator.attrgetter("flags.writeable"), [array, array]) == [True, True]


def test_mpstatus_does_not_count_cluster_workers_as_mpnb_workers(pool):
    from mpnb import processes

    workers = {r.pid for r in pool.monitor.sample()}
    rows = processes.status(cpu=False).rows
    assert len(workers) == 2 and {r.pid for r in rows} >= workers, "the cluster runs below this process"
    assert not [r for r in rows if r.owner == processes.MPNB_OWNER], "the cluster's workers are not a local pool's"
