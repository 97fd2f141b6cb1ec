"""Whatever a task starts dies with its worker, however the worker ends.

A table: the task starts one process of each kind a task may start (a forked
child, a subprocess, a spawn Pool with its worker and resource tracker, a
double-forked daemon in its own session), records them, and its worker then
ends one way: a timeout, a crash, Cancel, the pool's shutdown, the owner
process SIGKILLed (also while the worker is stopped, or while its task holds
the GIL in a long C call, or while it is ending the worker), the kernel shut down,
restarted or SIGKILLed.  Each row checks that
every recorded process is gone, naming the kinds that survived; the ``tag``
fixture then checks that no process carrying the test's tag is left.

This module is imported by the workers (its task function travels by
reference), so it imports nothing that starts anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import CancelledError
from pathlib import Path

import psutil
import pytest

import mpnb
from mpnb._worker import GUARDIAN_NAME

TAG_VAR = "MPNB_TEST_TAG"  # kernel.TAG_VAR; importing kernel here would make every worker install a kernelspec
TESTS = str(Path(__file__).resolve().parent)
WAIT = 60.0

_kept = []  # what a task started and must not be garbage-collected with it
_made_semaphores: list[str] = []  # what the spawn Pool's queues made, registered with its resource tracker


# ------------------------------------------------------------ the task


def _forked_child() -> list[int]:
    pid = os.fork()
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    return [pid]


def _subprocess() -> list[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    _kept.append(proc)
    return [proc.pid]


def _semaphores() -> set[str]:
    """The named semaphores on the machine (Linux keeps them in /dev/shm)."""
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith("sem.")}
    except OSError:
        return set()


def _spawn_pool() -> list[int]:
    import multiprocessing
    from multiprocessing import resource_tracker

    before = _semaphores()
    pool = multiprocessing.get_context("spawn").Pool(1)
    _made_semaphores.extend(sorted(_semaphores() - before))
    _kept.append(pool)
    pool.apply(os.getpid)
    return [p.pid for p in pool._pool] + [resource_tracker._resource_tracker._pid]


def _daemon() -> list[int]:
    r, w = os.pipe()
    first = os.fork()
    if first == 0:
        os.close(r)
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            time.sleep(600)
        os._exit(0)
    os.close(w)
    os.waitpid(first, 0)
    with os.fdopen(r, "rb") as f:
        return [int(f.read())]


KINDS = {
    "forked child": _forked_child,
    "subprocess": _subprocess,
    "spawn Pool (worker, resource tracker)": _spawn_pool,
    "double-forked daemon": _daemon,
}


def start_everything(record: str, then: str):
    """Start one process of each kind, write them to ``record``, then
    ``then``: "return", "crash", "hang", or "hold the GIL" (a C call that
    runs for hours and never lets another thread or a signal handler run)."""
    started = {}
    for kind, start in KINDS.items():
        started[kind] = [(pid, psutil.Process(pid).create_time()) for pid in start()]
    with open(record + ".tmp", "w") as f:
        json.dump({"processes": started, "semaphores": _made_semaphores}, f)
    os.rename(record + ".tmp", record)
    if then == "crash":
        import ctypes

        ctypes.string_at(0)
    while then == "hang":
        time.sleep(0.1)
    if then == "hold the GIL":
        sum(range(10**12))
    return sorted(started)


# ------------------------------------------------------------ checking


def _wait_for(path: Path, within: float = WAIT) -> dict:
    """What the task recorded: ``{"processes": {kind: [(pid, started)]},
    "semaphores": [name in /dev/shm]}``."""
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, f"the task did not start its processes within {within} s"
        time.sleep(0.1)
    return json.loads(path.read_text())


def _alive(pid: int, created: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _survivors(started: dict) -> list[str]:
    return [kind for kind, procs in started.items() if any(_alive(pid, t) for pid, t in procs)]


def assert_all_gone(record: dict, within: float = WAIT, **more: list[tuple[int, float]]) -> None:
    """Every process the task recorded (and ``more``) is gone, and so are
    the semaphores of its spawn Pool: its resource tracker, which unlinks
    them once its clients are gone, was let do so before it ended."""
    started = dict(record["processes"], **more)
    deadline = time.monotonic() + within
    while (_survivors(started) or _present(record["semaphores"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    left, leaked = _survivors(started), _present(record["semaphores"])
    for procs in started.values():  # do not let one failure poison the next tests
        for pid, t in procs:
            if _alive(pid, t):
                os.kill(pid, signal.SIGKILL)
    for name in leaked:
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{name}")
    assert not left, f"outlived their worker: {', '.join(left)}"
    assert not leaked, f"the spawn Pool's semaphores outlived its resource tracker: {leaked}"


def _present(semaphores: list[str]) -> list[str]:
    return [name for name in semaphores if os.path.exists(f"/dev/shm/{name}")]


# ------------------------------------------------------------ the table


@pytest.fixture
def record(tmp_path) -> Path:
    return tmp_path / "started.json"


def test_timeout(tag, record):
    # generous: the task must start a spawn Pool before its time is up
    with mpnb.Pool(1, timeout=30, live=False, env={TAG_VAR: tag}) as pool:
        future = pool.submit(start_everything, str(record), "hang")
        started = _wait_for(record)
        with pytest.raises(mpnb.pool.TaskTimeoutError):
            future.result(timeout=120)
        assert_all_gone(started)


def test_crash(tag, record):
    with mpnb.Pool(1, live=False, env={TAG_VAR: tag}) as pool:
        future = pool.submit(start_everything, str(record), "crash")
        with pytest.raises(mpnb.pool.WorkerCrashedError):
            future.result(timeout=120)
        assert_all_gone(_wait_for(record))
        assert pool.submit(sum, [1, 2]).result(timeout=WAIT) == 3  # replaced


def test_cancel(tag, record):
    with mpnb.Pool(1, live=False, env={TAG_VAR: tag}) as pool:
        future = pool.submit(start_everything, str(record), "hang")
        started = _wait_for(record)
        pool.cancel()
        with pytest.raises(CancelledError):
            future.result(timeout=WAIT)
        assert_all_gone(started)


def test_shutdown(tag, record):
    pool = mpnb.Pool(1, live=False, env={TAG_VAR: tag})
    try:
        assert pool.submit(start_everything, str(record), "return").result(timeout=120)
        started = _wait_for(record)
        assert len(_survivors(started["processes"])) == len(KINDS)  # a finished task's processes live on until then
        if os.path.isdir("/dev/shm"):  # where named semaphores can be seen
            assert started["semaphores"] and _present(started["semaphores"]) == started["semaphores"]
    finally:
        pool.shutdown()
    assert_all_gone(started)


OWNER = """
import sys, time, mpnb
sys.path.insert(0, sys.argv[1])
from test_orphans import start_everything
if __name__ == "__main__":
    pool = mpnb.Pool(1, live=False)
    pool.submit(start_everything, sys.argv[2], sys.argv[3])
    time.sleep(600)
"""


def _worker_of(owner: int) -> psutil.Process:
    worker, = [p for p in psutil.Process(owner).children() if "mpnb._worker" in " ".join(p.cmdline())]
    return worker


@contextlib.contextmanager
def _owner(tag: str, record: Path, tmp_path: Path, mode: str = "hang"):
    """A plain script that owns a 1-worker pool whose task starts everything;
    SIGKILLed when the block ends."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    env = dict(os.environ, **{TAG_VAR: tag})
    owner = subprocess.Popen([sys.executable, str(script), TESTS, str(record), mode], env=env)
    try:
        yield owner
    finally:
        owner.kill()
        owner.wait()


def test_owner_sigkilled(tag, record, tmp_path):
    """A plain script owns the pool and is SIGKILLed while the task runs."""
    with _owner(tag, record, tmp_path):
        started = _wait_for(record)
    assert_all_gone(started)


def test_stopped_worker_owner_sigkilled(tag, record, tmp_path):
    """The worker is stopped (SIGSTOP) when its owner is SIGKILLed."""
    with _owner(tag, record, tmp_path) as owner:
        started = _wait_for(record)
        worker = _worker_of(owner.pid)
        worker.suspend()
        deadline = time.monotonic() + WAIT
        while worker.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
            time.sleep(0.05)
    assert_all_gone(started, worker=[(worker.pid, worker.create_time())])


ENDING_OWNER = """
import os, signal, sys, time, mpnb
from mpnb import _worker
sys.path.insert(0, sys.argv[1])
from test_orphans import start_everything
if __name__ == "__main__":
    pool = mpnb.Pool(1, live=False)
    pool.submit(start_everything, sys.argv[2], "hang")
    while not os.path.exists(sys.argv[2] + ".go"):  # the test has seen the worker
        time.sleep(0.05)
    send, sent = _worker._signal, open(sys.argv[2] + ".sent", "w")
    def send_then_die(pid, signum):
        if signum == signal.SIGKILL:  # the tree is stopped: the owner dies here
            sent.close()
            os.kill(os.getpid(), signal.SIGKILL)
        print(pid, int(signum), file=sent)
        send(pid, signum)
    _worker._signal = send_then_die
    _worker.kill_tree(pool.pids[0])  # the path of every end of a worker
"""


def test_owner_sigkilled_while_it_ends_the_worker(tag, record, tmp_path):
    """The owner dies half-way through ending its worker: everything below
    the worker has been stopped, nothing killed yet (a kernel that the
    client SIGKILLs while it shuts its pools down).  The owner shares the
    worker's session, as a plain script does, so Linux sends no SIGCONT to
    what was stopped; the worker's guardian must still end it all."""
    script = tmp_path / "owner.py"
    script.write_text(ENDING_OWNER)
    owner = subprocess.Popen([sys.executable, str(script), TESTS, str(record)],
                             env=dict(os.environ, **{TAG_VAR: tag}))
    try:
        started = _wait_for(record)
        worker = _worker_of(owner.pid)
        worker_started = worker.create_time()
        guardian, = [p for p in worker.children() if p.name() == GUARDIAN_NAME]
        guardian_started = guardian.create_time()
        Path(str(record) + ".go").touch()
        assert owner.wait(timeout=WAIT) == -signal.SIGKILL
    finally:
        owner.kill()
        owner.wait()
    sent = [tuple(map(int, line.split())) for line in Path(str(record) + ".sent").read_text().splitlines()]
    stopped = {pid for pid, signum in sent if signum == signal.SIGSTOP}
    assert worker.pid in stopped and len(stopped) > 1, sent  # the worker and what its task started
    # a guardian stopped then may never run again: its SIGSTOP can land after
    # the worker's exit, once Linux has looked for stopped members to SIGCONT
    assert guardian.pid not in stopped, "the killer stopped the worker's guardian"
    assert_all_gone(started, worker=[(worker.pid, worker_started)], guardian=[(guardian.pid, guardian_started)])


def test_owner_sigkilled_while_the_task_holds_the_gil(tag, record, tmp_path):
    """The task is inside a C call that holds the GIL for hours when its
    owner is SIGKILLed: no Python code of the worker can run, yet the worker
    and everything it started end."""
    with _owner(tag, record, tmp_path, "hold the GIL") as owner:
        started = _wait_for(record)
        worker = _worker_of(owner.pid)
    assert_all_gone(started, worker=[(worker.pid, worker.create_time())])


def _kernel_pool(kernel, record: Path) -> dict:
    kernel.run(
        f"import sys; sys.path.insert(0, {TESTS!r})\n"
        "import mpnb\n"
        "from test_orphans import start_everything\n"
        "pool = mpnb.Pool(1, live=False)\n"
        f"future = pool.submit(start_everything, {str(record)!r}, 'hang')\n"
    ).ok()
    return _wait_for(record)


def test_kernel_shutdown(kernel, record):
    started = _kernel_pool(kernel, record)
    kernel.shutdown()
    assert_all_gone(started)


def test_kernel_restart(kernel, record):
    started = _kernel_pool(kernel, record)
    kernel.restart()
    assert_all_gone(started)


def test_kernel_sigkilled(tag, record):
    from kernel import Kernel

    kernel = Kernel(tag)
    try:
        started = _kernel_pool(kernel, record)
    except BaseException:
        kernel.shutdown()
        raise
    kernel.kill()
    assert_all_gone(started)


# ------------------------------------------------------------ others' pools at kernel shutdown

OTHERS_POOLS = {
    # a notebook's pool left open: ipykernel's shutdown SIGTERMs its workers
    "spawn Pool": "pool = mp.get_context('spawn').Pool(1)\nprint(pool.map(abs, [-1]))",
    "forkserver Pool": "with mp.get_context('forkserver').Pool(1) as pool:\n    print(pool.map(abs, [-1]))",
    "joblib": "import joblib\nprint(joblib.Parallel(2)(joblib.delayed(abs)(i) for i in [-1, -2]))",
}


@pytest.mark.parametrize("used", OTHERS_POOLS)
def test_kernel_that_used_others_pools_shuts_down_cleanly(tag, used):
    """A pool that starts a resource tracker (which ignores SIGTERM) must not
    hold up the kernel's shutdown until its client SIGTERMs it: the kernel
    exits by itself, its exit hooks run (multiprocessing's temp directory
    goes) and its semaphores are gone."""
    import multiprocessing

    from kernel import Kernel

    if used == "forkserver Pool" and "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no forkserver here")
    if used == "joblib":
        pytest.importorskip("joblib")
    before = set(_semaphores())
    kernel = Kernel(tag)
    try:
        reply = kernel.run("%load_ext mpnb\nimport multiprocessing as mp\n" + OTHERS_POOLS[used]
                           + "\nprint(mp.util.get_temp_dir())").ok()
        temp = Path(reply.stdout.split()[-1])
        assert temp.is_dir()
        process = kernel.km.provisioner.process
        # generous: the client SIGTERMs the kernel after half of it; a clean exit comes at once
        kernel.km.shutdown_wait_time = 2 * WAIT / 3
    finally:
        kernel.shutdown()
    assert process.wait(timeout=WAIT) == 0, "the kernel did not exit by itself: its client ended it"
    assert not temp.exists(), "the kernel's exit hooks did not run"
    assert not sorted(_semaphores() - before)


RELEASED = """
import multiprocessing as mp, psutil, sys
from mpnb.shutdown import release_children
if __name__ == "__main__":
    pool = mp.get_context("spawn").Pool(1)
    assert pool.map(abs, [-1]) == [1]
    children = psutil.Process().children(recursive=True)  # its worker and the resource tracker
    assert len(children) >= 2, children
    release_children()  # called directly: the kernel's hook would swallow an error
    # the Pool's worker ends if its exit finalizer ran, the tracker once let go of
    gone, alive = psutil.wait_procs(children, timeout=float(sys.argv[1]))
    assert not alive, f"still running after release_children(): {alive}"
    print("released", flush=True)
"""


def test_release_children_ends_others_pools_and_lets_go_of_trackers(tag, tmp_path):
    """What the shutdown hook does, called directly (the hook swallows errors):
    it relies on multiprocessing's private ``util._run_finalizers`` and on where
    the resource tracker keeps its pipe.  If either moves, this fails: the
    spawn Pool stays running, or its tracker does not end by itself."""
    script = tmp_path / "released.py"
    script.write_text(RELEASED)
    before = set(_semaphores())
    env = dict(os.environ, **{TAG_VAR: tag})
    done = subprocess.run([sys.executable, str(script), str(WAIT)], env=env, capture_output=True, text=True,
                          timeout=3 * WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["released"]
    # the Pool object outlives its finalizer; at interpreter teardown its __del__
    # may still complain (free-threaded 3.13: a queue put after pickle's module
    # is gone): not the semaphores' finalizers failing on a tracker's unlink
    assert "FileNotFoundError" not in done.stderr, done.stderr
    assert not sorted(_semaphores() - before)


# ------------------------------------------------------------ directories

POOL_DIR_OWNER = """
import sys, time, mpnb
if __name__ == "__main__":
    pool = mpnb.Pool(1, live=False)
    assert pool.map(abs, [-1]) == [1]
    print("running", flush=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
    pool.shutdown()
"""


def test_directories_of_killed_owners_are_swept(tag, tmp_path):
    """A pool's worker directory outlives an owner that was SIGKILLed; the
    next process that starts a pool removes it, and its own at shutdown."""
    script = tmp_path / "owner.py"
    script.write_text(POOL_DIR_OWNER)
    temp = tmp_path / "temp"
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), **{TAG_VAR: tag})
    owner = subprocess.Popen([sys.executable, str(script), "wait"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "running"
    finally:
        owner.kill()
        owner.wait()
    left = list(temp.glob(f"mpnb-pool-{owner.pid}-*"))
    assert left, f"the killed owner's pool directory is not named by its pid: {os.listdir(temp)}"
    done = subprocess.run([sys.executable, str(script), "stop"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert not [p for p in left if p.exists()], "the dead owner's directory was not swept"
    assert not list(temp.glob("mpnb-pool-*")), os.listdir(temp)


def test_kernel_shutdown_with_a_stopped_worker(tag, tmp_path):
    """A busy worker stopped with SIGSTOP: kernel shutdown ends it with its
    tree and removes the pool's directory."""
    from kernel import Kernel

    temp = tmp_path / "temp"
    temp.mkdir()
    record = tmp_path / "started.json"
    kernel = Kernel(tag, env={"TMPDIR": str(temp)})
    try:
        started = _kernel_pool(kernel, record)
        workers = [p for p in psutil.Process(kernel.pid).children() if "mpnb._worker" in " ".join(p.cmdline())]
        assert len(workers) == 1
        workers[0].suspend()
        assert list(temp.glob("mpnb-pool-*"))
    finally:
        kernel.shutdown()
    assert_all_gone(started, worker=[(workers[0].pid, workers[0].create_time())])
    assert not list(temp.glob("mpnb-pool-*")), os.listdir(temp)
