"""``%mpstatus`` and the runaway guard, on real processes in real kernels.

The census is checked against what the kernel itself knows (the pids of its
pool's workers); leftovers are real ones (a grandchild orphaned by a killed
worker, a zombie of the kernel, a fork of the kernel with no pool behind it); the guard is driven past a low limit by a
cell that starts real processes, and the tests wait on the guard's counters,
never on a clock.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import psutil
import pytest

from kernel import Kernel, cell_text, kernel_env, notebook_errors, run_notebook
from mpnb import processes


def rows_of(kernel: Kernel) -> dict[int, dict]:
    """The census the kernel takes of itself, by pid."""
    reply = kernel.run(
        "import json as _json, mpnb.processes as _p\n"
        "print(_json.dumps([dict(pid=r.pid, ppid=r.ppid, kind=r.kind, owner=r.owner,\n"
        "    leftover=r.leftover, orphan=r.orphan, state=r.state) for r in _p.status(cpu=False).rows]))"
    ).ok()
    return {row["pid"]: row for row in json.loads(reply.stdout)}


def test_lists_a_stdlib_spawn_pools_workers(kernel):
    kernel.run("%load_ext mpnb").ok()
    kernel.run(
        "import multiprocessing as mp\n"
        "pool = mp.get_context('spawn').Pool(2)\n"
        "pool.map(abs, [-1, -2])\n"
        "workers = sorted(p.pid for p in mp.active_children())\n"
        "print(workers)"
    ).ok()
    workers = json.loads(kernel.run("print(workers)").ok().stdout)
    assert len(workers) == 2

    shown = kernel.run("%mpstatus").ok().text
    rows = rows_of(kernel)
    for pid in workers:
        row = rows[pid]
        assert row["kind"] == "multiprocessing spawn worker", row
        assert row["ppid"] == kernel.pid
        assert row["owner"].startswith("multiprocessing SpawnPoolWorker-"), row
        assert row["leftover"] is None
        assert f"{pid} " in shown
    trackers = [r for r in rows.values() if r["kind"] == "resource tracker"]
    assert trackers and trackers[0]["owner"] == "multiprocessing resource tracker"
    assert "multiprocessing spawn worker" in shown and "0 leftover" in shown
    assert "runaway guard: limit" in shown

    html = kernel.run("print(_p.status()._repr_html_())").ok().stdout
    assert html.count("multiprocessing spawn worker") == 2 and "<table>" in html

    # IPython shows a UsageError as a message, not as a traceback
    bad = kernel.run("%mpstatus --limit 0").stderr
    assert bad.startswith("UsageError: %mpstatus --limit 0: limit 0: the process limit must be"), bad
    bad = kernel.run("%mpstatus --on-runaway explode").stderr
    assert bad.startswith("UsageError: ") and "invalid choice: 'explode'" in bad, bad

    kernel.run("pool.terminate(); pool.join()").ok()


def test_orphan_zombie_and_stray_fork_are_flagged_and_stopped(kernel):
    kernel.run("%load_ext mpnb").ok()
    # a helper started through a shell that exits at once is re-parented to
    # init, out of the kernel's tree, still running (what a pool task starts
    # cannot be: it dies with its worker)
    reply = kernel.run(
        "import os, subprocess, time, psutil, mpnb\n"
        "launch = subprocess.run(['sh', '-c', 'sleep 60 >/dev/null 2>&1 & echo $!'], capture_output=True, text=True)\n"
        "helper = int(launch.stdout)\n"
        "deadline = time.monotonic() + 30\n"
        "zombie = os.fork()\n"
        "if zombie == 0:\n"
        "    os._exit(0)\n"
        "while psutil.Process(zombie).status() != 'zombie' and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "forked = os.fork()  # a library forking the kernel, no pool object behind it\n"
        "if forked == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "def flagged():  # after 2 s, when a pool would have registered it\n"
        "    return any(r.pid == forked and r.leftover for r in mpnb.processes.status(cpu=False).rows)\n"
        "while not flagged() and time.monotonic() < deadline:\n"
        "    time.sleep(0.1)\n"
        "print(helper, zombie, forked)"
    ).ok()
    helper, zombie, forked = map(int, reply.stdout.split())

    rows = rows_of(kernel)
    assert rows[forked]["kind"] == "fork of the kernel" and rows[forked]["ppid"] == kernel.pid
    assert "no live pool, executor or multiprocessing Process" in rows[forked]["leftover"]
    assert rows[helper]["orphan"] and rows[helper]["ppid"] != kernel.pid
    assert "re-parented" in rows[helper]["leftover"]
    assert rows[zombie]["state"] == "zombie" and "zombie" in rows[zombie]["leftover"]
    shown = kernel.run("%mpstatus").ok().text
    assert "3 leftover" in shown and "orphans" in shown and "--kill-leftovers" in shown

    out = kernel.run("%mpstatus --kill-leftovers").ok().text
    assert f"{helper} (other): terminated" in out
    assert f"{zombie} (other): collected" in out
    assert f"{forked} (fork of the kernel): terminated" in out
    assert "0 leftover" in out
    deadline = time.monotonic() + 30
    while psutil.pid_exists(helper) and time.monotonic() < deadline:
        time.sleep(0.05)  # init collects it
    assert not psutil.pid_exists(helper)
    assert not {zombie, forked} & {p.pid for p in kernel.descendants()}


def test_processes_notebook(tag):
    nb = run_notebook("processes.ipynb", tag=tag)
    assert notebook_errors(nb) == []
    shown = [cell_text(c) for c in nb.cells if c.cell_type == "code"]
    census, orphaned, stopped, warned, killed = shown[2], shown[4], shown[5], shown[6], shown[7]
    for kind in ("mpnb worker", "multiprocessing spawn worker", "forkserver", "forkserver worker",
                 "resource tracker"):
        assert f" {kind} " in census, kind
    assert "0 leftover" in census
    assert "1 orphaned, 1 leftover" in orphaned and "re-parented to pid" in orphaned
    assert "(other): terminated" in stopped and "0 leftover" in stopped
    assert "mpnb: runaway processes" in warned
    assert "[None, None, None, -9, -9, -9]" in killed and "the runaway guard stopped 3" in killed


START_AND_WAIT = """\
import subprocess, time
from mpnb import processes
guard = processes.guard()
sleepers = [subprocess.Popen(['sleep', '60']) for _ in range({count})]
deadline = time.monotonic() + 60
{wait}
print('exit codes', [p.poll() for p in sleepers], 'warnings', guard.warnings)
for p in sleepers:
    p.kill()
    p.wait()
"""


def guarded_kernel(tag: str, limit: int, action: str) -> Kernel:
    k = Kernel(tag, env={processes.LIMIT_VAR: str(limit), processes.ACTION_VAR: action})
    k.run("%load_ext mpnb").ok()
    return k


def test_guard_warns_once_in_the_running_cell(tag):
    k = guarded_kernel(tag, limit=3, action="warn")
    try:
        wait = ("while guard.warnings < 1 and time.monotonic() < deadline:\n    time.sleep(0.05)\n"
                "seen = guard.checks\n"
                "while guard.checks < seen + 4 and time.monotonic() < deadline:\n    time.sleep(0.05)")
        reply = k.run(START_AND_WAIT.format(count=5, wait=wait)).ok()
        assert "exit codes [None, None, None, None, None] warnings 1" in reply.stdout
        assert reply.stderr.count("runaway processes") == 1, reply.stderr
        # the guard may look while the cell is still starting them: 4 or 5
        assert re.search(r"this kernel has [45] processes below it, more than the limit of 3", reply.stderr)
        assert re.search(rf"the kernel \(pid {k.pid}\) started [45] directly", reply.stderr)
        assert "%mpstatus --limit N" in reply.stderr
        # the next cell is not told again, and the guard reports its settings
        assert "runaway" not in k.run("1 + 1").ok().stderr
        assert "limit 3 processes" in k.run("%mpstatus").ok().text
    finally:
        k.shutdown()


def test_guard_kill_stops_the_newest(tag):
    k = guarded_kernel(tag, limit=4, action="kill")
    try:
        wait = ("while sum(p.poll() is not None for p in sleepers) < 4 and time.monotonic() < deadline:\n"
                "    time.sleep(0.05)")
        reply = k.run(START_AND_WAIT.format(count=8, wait=wait)).ok()
        assert "exit codes [None, None, None, None, -9, -9, -9, -9]" in reply.stdout
        assert "runaway processes" in reply.stderr
        assert "the runaway guard stopped" in reply.stderr
        # switched off from the notebook: the thread stops
        assert "runaway guard: off" in k.run("%mpstatus --on-runaway off").ok().text
        assert k.run("print(processes.guard())").ok().stdout.strip() == "None"
    finally:
        k.shutdown()


def test_an_mpnb_pools_guardians_are_part_of_the_pool(tag):
    """Each mpnb worker forks a guardian, which ends what the worker leaves
    when it dies: the census shows it below its worker, owned by the pool;
    pool.pids and the runaway guard count the workers alone; a shutdown
    leaves no guardian."""
    k = guarded_kernel(tag, limit=3, action="warn")
    try:
        reply = k.run(
            "import time, mpnb\n"
            "from mpnb import processes\n"
            "pool = mpnb.Pool(2, live=False)\n"
            "assert pool.map(abs, [-1, -2]) == [1, 2]\n"
            "guard = processes.guard()\n"
            "seen, deadline = guard.checks, time.monotonic() + 60\n"
            "while guard.checks < seen + 4 and time.monotonic() < deadline:\n"
            "    time.sleep(0.05)\n"
            "print(sorted(pool.pids), guard.warnings)"
        ).ok()
        assert reply.stdout.split("]")[1].strip() == "0", reply.stdout + reply.stderr
        workers = json.loads(reply.stdout.split("]")[0] + "]")
        assert len(workers) == 2
        rows = rows_of(k)
        guardians = [r for r in rows.values() if r["kind"] == "mpnb worker guardian"]
        assert sorted(r["ppid"] for r in guardians) == workers, rows
        for row in guardians + [rows[pid] for pid in workers]:
            assert row["owner"] == "mpnb.Pool" and row["leftover"] is None, row
        assert all(rows[pid]["kind"] == "mpnb worker" for pid in workers)
        shown = k.run("%mpstatus").ok().text
        assert "0 leftover" in shown and "mpnb worker guardian" in shown

        k.run("pool.shutdown()").ok()
        # what is left are the spares for the next pool, each with its guardian, none a leftover
        reply = k.run("from mpnb.backends.launcher import spare_pids\n"
                      "deadline = time.monotonic() + 60\n"
                      "while len(spare_pids()) < 2 and time.monotonic() < deadline:\n"
                      "    time.sleep(0.05)\n"
                      "print(sorted(spare_pids()))").ok()
        spares = json.loads(reply.stdout)
        assert len(spares) == 2 and not set(spares) & set(workers)
        # a spare's guardian is a fork of it that names itself as it starts:
        # the census may see it before that, as a fork of its parent
        deadline = time.monotonic() + 60
        rows = rows_of(k)
        while time.monotonic() < deadline and any(
                r["ppid"] in spares and r["kind"] != "mpnb worker guardian" for r in rows.values()):
            time.sleep(0.1)
            rows = rows_of(k)
        assert sorted(rows) == sorted(spares + [r["pid"] for r in rows.values() if r["ppid"] in spares]), rows
        assert all(r["owner"] == "mpnb.Pool (spare for the next pool)" and r["leftover"] is None
                   for r in rows.values()), rows
        k.run("from mpnb.backends.launcher import end_spares\nend_spares()").ok()
        deadline = time.monotonic() + 60
        while k.descendants() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not k.descendants(), [" ".join(p.cmdline()) for p in k.descendants()]
    finally:
        k.shutdown()


CENSUS_SCRIPT = """\
import json, multiprocessing, subprocess, time
import psutil
import loky
from mpnb import processes

if __name__ == "__main__":
    pool = multiprocessing.get_context("forkserver").Pool(1)
    pool.map(abs, [1])
    executor = loky.get_reusable_executor(1)
    executor.submit(abs, 1).result()
    sleeper = subprocess.Popen(["sleep", "60"])
    # with vfork, Popen may return before the kernel has set up the new
    # program's arguments: /proc shows an empty command line for a moment
    deadline = time.monotonic() + 10
    while not psutil.Process(sleeper.pid).cmdline() and time.monotonic() < deadline:
        time.sleep(0.01)
    census = processes.status(cpu=False)
    print(json.dumps(dict(
        workers=[p.pid for p in pool._pool], sleeper=sleeper.pid, text=str(census),
        rows=[dict(pid=r.pid, ppid=r.ppid, kind=r.kind, owner=r.owner, command=r.command,
                   leftover=r.leftover) for r in census.rows])))
    sleeper.kill()
    sleeper.wait()
    pool.terminate()
    pool.join()
    executor.shutdown(wait=True, kill_workers=True)
"""


def test_kinds_and_owners_of_other_libraries_pools(tag, tmp_path):
    script = tmp_path / "census.py"
    script.write_text(CENSUS_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], env=kernel_env(tag), capture_output=True,
                         text=True, timeout=120, check=True).stdout
    found = json.loads(out)
    rows = {row["pid"]: row for row in found["rows"]}
    forkserver = [r for r in rows.values() if r["kind"] == "forkserver"]
    assert forkserver and forkserver[0]["owner"] == "multiprocessing forkserver"
    for pid in found["workers"]:
        assert rows[pid]["kind"] == "forkserver worker", rows[pid]
        assert rows[pid]["ppid"] == forkserver[0]["pid"] and rows[pid]["leftover"] is None
    loky_rows = [r for r in rows.values() if r["kind"] == "loky worker"]
    assert loky_rows and all(r["owner"] == "loky executor" for r in loky_rows)
    trackers = {r["owner"] for r in rows.values() if r["kind"] == "resource tracker"}
    assert trackers == {"multiprocessing resource tracker", "loky resource tracker"}
    sleeper = rows[found["sleeper"]]
    assert sleeper["kind"] == "other" and sleeper["command"] == "sleep 60"
    assert found["text"].splitlines()[0].startswith("mpnb: kernel pid")


@pytest.mark.parametrize("var, value, words", [
    (processes.LIMIT_VAR, "lots", "MPNB_MAX_PROCESSES='lots': the process limit must be a whole number"),
    (processes.LIMIT_VAR, "0", "at least 1"),
    (processes.ACTION_VAR, "explode", "MPNB_RUNAWAY='explode': what to do with runaway processes must be"),
])
def test_bad_settings_are_refused_by_name(monkeypatch, var, value, words):
    monkeypatch.setenv(var, value)
    try:
        with pytest.raises(ValueError, match=words) as info:
            processes.start_guard()
        assert processes.guard() is None
    finally:
        processes.stop_guard()  # a guard started by mistake must not outlive the test
    assert var in str(info.value)


def test_default_limit_leaves_room_for_several_full_pools():
    from mpnb import limits

    assert processes.default_limit() >= 2 * limits.max_workers()
    assert processes.default_limit() >= 64
