"""``%mpdoctor``: what in this kernel's setup matters for process pools.

:func:`doctor` looks, it changes nothing: it neither picks a start method nor
starts a process.  Each :class:`Check` has a verdict (``ok``, ``note`` or
``warn``), what was found, and what to do about it.
"""

from __future__ import annotations

import html
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mpnb.facts import byte_size

__all__ = ["Check", "Report", "doctor", "remove_leaked_shm"]

SHM = Path("/dev/shm")
# Below this, PyTorch DataLoader workers and shared-memory arrays fail (Docker's default is 64 MB).
SMALL_SHM = 256 * 2**20
# A pool's segment younger than this may be in the middle of being set up or torn down.
LEAK_AGE = 60.0
# More than this counts as "no limit" in cgroup files.
UNLIMITED = 2**60


@dataclass(frozen=True)
class Check:
    """One finding: a verdict, what was seen, and the advice."""

    key: str
    title: str
    verdict: str  #: "ok", "note" or "warn"
    found: str
    advice: str = ""


@dataclass(frozen=True)
class Report:
    """The findings of :func:`doctor`; prints as text, shows as a table."""

    checks: tuple[Check, ...]

    def __getitem__(self, key: str) -> Check:
        for check in self.checks:
            if check.key == key:
                return check
        raise KeyError(key)

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == "warn"]

    def __str__(self) -> str:
        lines = ["mpnb doctor"]
        for c in self.checks:
            lines.append(f"[{c.verdict:>4}] {c.title}: {c.found}")
            if c.advice:
                lines.append(f"       -> {c.advice}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        colour = {"ok": "#2e7d32", "note": "#1565c0", "warn": "#c62828"}
        rows = "".join(
            f"<tr><td style='color:{colour[c.verdict]};font-weight:bold'>{c.verdict}</td>"
            f"<td>{html.escape(c.title)}</td><td>{html.escape(c.found)}</td>"
            f"<td>{html.escape(c.advice)}</td></tr>"
            for c in self.checks
        )
        return ("<table><thead><tr><th></th><th>check</th><th>found</th><th>advice</th>"
                f"</tr></thead><tbody>{rows}</tbody></table>")


def doctor() -> Report:
    """Check this kernel's setup for process pools; see :class:`Report`."""
    checks = []
    for probe in _PROBES:
        try:
            checks.append(probe())
        except Exception as exc:  # one broken probe must not hide the others
            checks.append(Check(probe.__name__.lstrip("_"), probe.__name__, "note",
                                f"could not check: {type(exc).__name__}: {exc}"))
    return Report(tuple(checks))


# ------------------------------------------------------------------ probes


def _in_kernel() -> bool:
    return "ipykernel" in sys.modules and type(sys.stdout).__module__.startswith("ipykernel")


def _start_method() -> str:
    # get_start_method() without allow_none would fix the default for good
    return (multiprocessing.get_start_method(allow_none=True)
            or multiprocessing.get_all_start_methods()[0])


def _python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    method = _start_method()
    if method == "fork":
        where = "kernel" if _in_kernel() else "process"
        meaning = (f"children are copies of this {where}: notebook functions reach them, "
                   f"and so do the {where}'s threads and open sockets")
        advice = ("prefer spawn or forkserver (the default from Python 3.14) with "
                  "definitions from a %%mppool cell, or mpnb.Pool")
        verdict = "warn" if _in_kernel() else "note"
    else:
        meaning = ("children start fresh and import what they run: a function or class "
                   "defined in a notebook cell cannot be found there by stdlib pools")
        advice = "define what workers run in a %%mppool cell, or use mpnb.Pool"
        verdict = "note"
    supported = (3, 11) <= sys.version_info[:2] <= (3, 14)
    return Check("python", "Python and start method", verdict if supported else "warn",
                 f"Python {version}, default start method {method!r}: {meaning}",
                 advice if supported else f"mpnb supports Python 3.11 to 3.14; {advice}")


def _threads() -> Check:
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    found = f"{len(others) + 1} thread{'s' if others else ''} alive"
    if others:
        found += " (" + ", ".join(others[:8]) + (", ..." if len(others) > 8 else "") + ")"
    if not others:
        return Check("threads", "Threads in this process", "ok", found)
    return Check("threads", "Threads in this process", "warn" if _start_method() == "fork" else "note",
                 found + "; a fork copies only the forking thread, so a lock another thread "
                 "holds stays locked in the child",
                 "do not fork from here: use spawn or forkserver, or mpnb.Pool")


def _gil() -> Check:
    from mpnb.backends.threads import gil_enabled

    return gil_check(gil_enabled(), hasattr(sys, "_is_gil_enabled"))


def gil_check(enabled: bool, free_threaded_build: bool) -> Check:
    """The GIL line: whether threads run Python code in parallel here, and
    which pool that makes the choice for CPU-bound tasks."""
    if enabled:
        found = ("enabled: threads run Python code one at a time"
                 + (" (a free-threaded build with the GIL turned back on, by PYTHON_GIL=1, -X gil=1 "
                    "or an extension module that needs it)" if free_threaded_build else ""))
        return Check("gil", "GIL", "ok", found,
                     "use processes (mpnb.Pool) for CPU-bound Python code; mpnb.Pool(backend='threads') "
                     "suits tasks that wait (files, network)")
    return Check("gil", "GIL", "note", "disabled (free-threaded Python): threads run Python code in parallel",
                 "try mpnb.Pool(backend='threads') for CPU-bound tasks too: no process starts, nothing is "
                 "pickled, and cell functions need no %%mppool")


def _cpus() -> Check:
    from loky import cpu_count

    machine = os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    quota = _cgroup_cpus(machine)
    usable = cpu_count()
    found = (f"machine {machine}, affinity {affinity}, cgroup quota "
             f"{'none' if quota is None else f'{quota:g}'}: {usable} usable")
    if usable < machine:
        return Check("cpus", "CPUs", "note", found,
                     f"size pools by {usable}, not os.cpu_count() = {machine}: more workers "
                     "only queue for the same CPUs (mpnb.Pool sizes itself this way)")
    return Check("cpus", "CPUs", "ok", found)


def _cgroup_cpus(machine: int) -> float | None:
    for path in ("/sys/fs/cgroup/cpu.max",):
        text = _read(path)
        if text:
            quota, _, period = text.partition(" ")
            return None if quota == "max" else int(quota) / int(period)
    quota_text = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    period_text = _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota_text and period_text and int(quota_text) > 0:
        return int(quota_text) / int(period_text)
    return None


def _memory() -> Check:
    import psutil

    vm = psutil.virtual_memory()
    limit = _cgroup_memory_limit()
    found = f"{byte_size(vm.total)} in the machine, {byte_size(vm.available)} available"
    if limit is not None and limit < vm.total:
        found += f"; cgroup limit {byte_size(limit)}"
        return Check("memory", "Memory", "note", found,
                     "the cgroup limit is what counts: each worker holds its own copy of "
                     "its data, and going over the limit kills a worker without a traceback")
    if vm.available < 2**30:
        return Check("memory", "Memory", "warn", found,
                     "under 1 GiB available: use fewer workers or smaller chunks")
    return Check("memory", "Memory", "ok", found)


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = _read(path)
        if text and text != "max" and int(text) < UNLIMITED:
            return int(text)
    return None


def _shm() -> Check:
    if not SHM.is_dir():
        return Check("shm", "Shared memory (/dev/shm)", "ok",
                     "no /dev/shm on this platform; shared memory uses other means")
    import shutil

    usage = shutil.disk_usage(SHM)
    leaked = _leaked_shm()
    found = f"{byte_size(usage.total)}, {byte_size(usage.free)} free"
    advice = []
    verdict = "ok"
    if usage.total < SMALL_SHM:
        verdict = "warn"
        advice.append("too small for DataLoader workers or shared arrays, which then die with "
                      "a bus error; in Docker start with --shm-size=1g (or --ipc=host)")
    if leaked:
        verdict = "warn"
        size = sum(p.stat().st_size for p in leaked if p.exists())
        names = ", ".join(p.name for p in leaked[:3]) + (", ..." if len(leaked) > 3 else "")
        found += f"; {len(leaked)} leaked segment(s) ({byte_size(size)}) that no process uses: {names}"
        advice.append("processes that died without cleaning up left them; free the memory "
                      "with mpnb.doctor.remove_leaked_shm()")
    return Check("shm", "Shared memory (/dev/shm)", verdict, found, "; ".join(advice))


_SHM_PREFIXES = ("sem.mp-", "sem.loky-", "psm_", "joblib_memmapping_folder_")


def remove_leaked_shm() -> list[str]:
    """Delete the /dev/shm entries :func:`doctor` reports as leaked; return their names."""
    import shutil

    removed = []
    for entry in _leaked_shm():
        try:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry.name)
        except OSError:
            continue
    return removed


def _leaked_shm() -> list[Path]:
    """Our pool-made /dev/shm entries that no live process has mapped or names."""
    uid = os.getuid()
    settled = time.time() - LEAK_AGE
    mine = []
    for entry in SHM.iterdir():
        try:
            info = entry.stat()
            if (entry.name.startswith(_SHM_PREFIXES) and info.st_uid == uid
                    and info.st_mtime < settled):
                mine.append(entry)
        except OSError:
            continue
    if not mine:
        return []
    in_use = _mapped_shm()
    leaked = []
    for entry in mine:
        if str(entry) in in_use:
            continue
        owner = _owner_pid(entry.name)
        if owner is not None and _alive(owner):
            continue
        leaked.append(entry)
    return leaked


def _mapped_shm() -> set[str]:
    """/dev/shm paths mapped by any process we can see (Linux /proc)."""
    paths: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            for line in maps.read_text().splitlines():
                if "/dev/shm/" in line:
                    paths.add(line[line.index("/dev/shm/"):].split(" (deleted)")[0])
        except OSError:
            continue
    return paths


def _owner_pid(name: str) -> int | None:
    """loky and joblib put the creating pid in the name: sem.loky-<pid>-..."""
    for prefix in ("sem.loky-", "joblib_memmapping_folder_"):
        if name.startswith(prefix):
            digits = name[len(prefix):].split("-")[0].split("_")[0]
            return int(digits) if digits.isdigit() else None
    return None


def _alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def _blas() -> Check:
    from threadpoolctl import threadpool_info

    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    env = {n: os.environ[n] for n in names if n in os.environ}
    pools = threadpool_info()
    loaded = ", ".join(f"{p['internal_api']} {p['num_threads']} threads" for p in pools)
    found = (f"loaded: {loaded or 'none yet'}; "
             + (", ".join(f"{k}={v}" for k, v in env.items()) or "no thread variables set"))
    busy = [p for p in pools if p["num_threads"] > 1]
    if busy and not env:
        return Check("blas", "BLAS / OpenMP threads", "warn", found,
                     "every worker would start this many threads too, so N workers fight over "
                     "the same CPUs: limit them in the workers (OMP_NUM_THREADS=1 before the "
                     "pool starts, or threadpoolctl.threadpool_limits(1))")
    return Check("blas", "BLAS / OpenMP threads", "ok" if env or not pools else "note", found)


def _process_limits() -> Check:
    import resource

    import psutil

    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    pids_max = _read("/sys/fs/cgroup/pids.max") or _read("/sys/fs/cgroup/pids/pids.max")
    pids_now = _read("/sys/fs/cgroup/pids.current") or _read("/sys/fs/cgroup/pids/pids.current")
    uid = os.getuid()
    mine = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid)
    parts = [f"RLIMIT_NPROC {'unlimited' if soft == resource.RLIM_INFINITY else soft}"
             f" ({mine} processes of this user)"]
    headroom = [soft - mine] if soft != resource.RLIM_INFINITY else []
    if pids_max and pids_max != "max":
        parts.append(f"cgroup pids.max {pids_max}" + (f" ({pids_now} in use)" if pids_now else ""))
        if pids_now:
            headroom.append(int(pids_max) - int(pids_now))
    found = "; ".join(parts)
    need = 2 * (os.cpu_count() or 1) + 4
    if headroom and min(headroom) < need:
        return Check("proc_limits", "Process limits", "warn", found,
                     f"room for only {min(headroom)} more processes: a pool of {need // 2} "
                     "workers with helpers may fail to start (BlockingIOError / "
                     "'Resource temporarily unavailable'); use fewer workers")
    return Check("proc_limits", "Process limits", "ok", found)


def _worker_output() -> Check:
    if not _in_kernel():
        return Check("output", "Worker output", "ok",
                     "not in a Jupyter kernel: workers print to the same terminal")
    watched = getattr(sys.stdout, "_should_watch", None)
    if watched:
        return Check("output", "Worker output", "ok",
                     "this kernel copies its file descriptors to the cell, so what workers "
                     "print reaches the cell (the output of a pool started in an earlier "
                     "cell may land in that cell)")
    return Check("output", "Worker output", "note",
                 "this kernel does not capture its file descriptors: what workers of stdlib "
                 "pools print, and their tracebacks, go to the Jupyter server log",
                 "use mpnb.Pool, which sends worker output to the cell")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


_PROBES: tuple[Callable[[], Check], ...] = (
    _python, _gil, _threads, _cpus, _memory, _shm, _blas, _process_limits, _worker_output,
)
