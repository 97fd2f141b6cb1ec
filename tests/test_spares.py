"""Spare workers: a closed pool's like, started ahead for the next pool.

The ``tag`` fixture ends the spares of this process, then checks that no
process carrying the test's tag is left; the tests where the owner ends check
that its spares end with it, whatever else holds their pipes.
"""

from __future__ import annotations

import gc
import glob
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import psutil
import pytest

import mpnb
from kernel import TAG_VAR, wait_until
from mpnb import processes
from mpnb._worker import WORKER_VAR
from mpnb.backends.launcher import SPARES_VAR, end_spares, spare_pids

pytestmark = pytest.mark.skipif(os.name != "posix", reason="exec workers (and so spares) are POSIX only")


def _environ(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()


def _spares(n: int, **env: str) -> list[int]:
    """The spares, once there are ``n``, each with ``env`` in its environment."""
    def ready() -> bool:
        pids = spare_pids()
        return len(pids) == n and all(_environ(pid).get(k) == v for pid in pids for k, v in env.items())

    wait_until(ready, f"{n} spare workers with {env}")
    return spare_pids()


def _fresh(tag: str, monkeypatch) -> None:
    """No spare, and none to come from a pool of an earlier test that is
    collected now (the last pool closed decides what spares are made); the
    workers and spares made next carry ``tag``, so that the ``tag`` fixture
    checks that none of them (nor their guardians) is left."""
    monkeypatch.delenv(SPARES_VAR, raising=False)
    gc.collect()
    end_spares()
    monkeypatch.setenv(TAG_VAR, tag)


def test_the_next_pool_like_the_last_takes_its_spares(tag, monkeypatch):
    _fresh(tag, monkeypatch)
    with mpnb.Pool(2, live=False) as first:
        assert first.map(abs, range(-3, 3)) == [3, 2, 1, 0, 1, 2]
        used = set(first.pids)
        assert spare_pids() == []  # made when a pool closes, not while it runs
    spares = _spares(2)
    assert not used & set(spares)
    for pid in spares:  # waiting, started as the pool's workers were
        process = psutil.Process(pid)
        assert process.ppid() == os.getpid() and process.status() != psutil.STATUS_ZOMBIE
    with mpnb.Pool(2, live=False) as second:
        assert second.map(abs, range(-3, 3)) == [3, 2, 1, 0, 1, 2]
        assert sorted(second.pids) == sorted(spares)
        assert spare_pids() == []  # taken, and not replaced while the pool runs
        # the census counts them as the pool's workers, not as leftovers
        rows = {row.pid: row for row in processes.status(cpu=False).rows}
        assert all(rows[pid].owner == processes.MPNB_OWNER and not rows[pid].leftover for pid in spares)
    assert set(_spares(2)).isdisjoint(spares)
    # waiting spares are owned too, and so are their guardians (forked as they boot)
    waiting = spare_pids()
    wait_until(lambda: all(len(psutil.Process(pid).children()) == 1 for pid in waiting), "the spares' guardians")
    rows = {row.pid: row for row in processes.status(cpu=False).rows}
    for pid in waiting:
        assert rows[pid].owner == processes.MPNB_SPARE and rows[pid].kind == processes.MPNB_WORKER
        assert not rows[pid].leftover
    guardians = [row for row in rows.values() if row.ppid in waiting]
    assert len(guardians) == 2 and all(row.kind == processes.MPNB_GUARDIAN and not row.leftover
                                       for row in guardians)
    end_spares()
    assert not any(map(_alive, waiting))  # ended, and their guardians end after them
    wait_until(lambda: not any(_alive(row.pid) for row in guardians), "the spares' guardians to end")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_pool_unlike_the_last_starts_its_own_and_the_spares_follow_it(tag, monkeypatch):
    _fresh(tag, monkeypatch)
    with mpnb.Pool(2, live=False) as first:
        first.map(abs, range(4))
    old = _spares(2)
    with mpnb.Pool(2, env={"MPNB_TEST_SPARE": "1"}, live=False) as other:
        assert other.map(abs, range(-2, 2)) == [2, 1, 0, 1]
        assert set(other.pids).isdisjoint(old)  # another environment: its own workers
        assert [_environ(pid).get("MPNB_TEST_SPARE") for pid in other.pids] == ["1", "1"]
    new = _spares(2, MPNB_TEST_SPARE="1")
    wait_until(lambda: not any(map(_alive, old)), "the spares of the other kind to end")
    # a changed working directory is another environment too
    monkeypatch.chdir(os.path.dirname(__file__))
    with mpnb.Pool(2, env={"MPNB_TEST_SPARE": "1"}, live=False) as moved:
        moved.map(abs, range(2))
        assert set(moved.pids).isdisjoint(new)


def test_a_pool_made_right_after_takes_the_spares_being_started(tag, monkeypatch):
    _fresh(tag, monkeypatch)
    for _ in range(3):
        with mpnb.Pool(2, live=False) as pool:
            assert pool.map(abs, [-1, -2]) == [1, 2]
            slots = [os.path.basename(_environ(pid)[WORKER_VAR]) for pid in pool.pids]
    # the first pool started its own workers; each next one, made at once, took the spares
    assert all(slot.startswith("worker-spare") for slot in slots), slots
    end_spares()
    # their slots' directory goes with the last of them
    left = [d for d in glob.glob(os.path.join(tempfile.gettempdir(), f"mpnb-pool-{os.getpid()}-*"))
            if glob.glob(os.path.join(d, "worker-spare*"))]
    assert left == []


def test_no_spares_when_turned_off(tag, monkeypatch):
    _fresh(tag, monkeypatch)
    monkeypatch.setenv(SPARES_VAR, "0")
    with mpnb.Pool(1, live=False) as pool:
        pool.map(abs, range(2))
    with mpnb.Pool(1, live=False) as pool:
        pool.map(abs, range(2))
    assert spare_pids() == []


_OWNER = """
import os, signal, sys, time
import mpnb
from mpnb.backends.launcher import spare_pids
with mpnb.Pool(2, live=False) as pool:
    pool.map(abs, range(4))
deadline = time.monotonic() + 60
while len(spare_pids()) < 2 and time.monotonic() < deadline:
    time.sleep(0.02)
fork = os.fork() if {fork} else 0
if fork == 0 and {fork}:
    time.sleep(120)  # a forked copy of the owner outlives it: it must not keep the spares
    os._exit(0)
print(" ".join(map(str, [*spare_pids(), fork])), flush=True)
sys.stdin.read()  # until the test kills us
"""


@pytest.mark.parametrize("fork", [False, True], ids=["alone", "with-a-forked-copy"])
def test_spares_end_with_their_owner(tag, fork):
    env = {**os.environ, TAG_VAR: tag}
    env.pop(SPARES_VAR, None)
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_OWNER.format(fork=fork))], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        *spares, forked = map(int, owner.stdout.readline().split())
        assert len(spares) == 2
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)

        wait_until(lambda: not any(map(_alive, spares)), "the spares to end with their owner")
        if forked:
            assert psutil.pid_exists(forked)  # it was alive all along
    finally:
        owner.kill()
        owner.wait()
        for process in processes_tagged(tag):
            process.kill()


def processes_tagged(tag: str) -> list[psutil.Process]:
    """The forked copy of the owner, left to the end (the fixture fails on anything else)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(TAG_VAR) == tag and \
                    "time.sleep(120)" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found
