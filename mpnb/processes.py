"""Every process of the kernel: the census behind ``%mpstatus``, leftovers, and the runaway guard.

A notebook starts processes through many doors: mpnb's pools, stdlib
``multiprocessing`` and ``concurrent.futures``, loky and joblib, PyTorch's
DataLoader (forked copies of the kernel), ``subprocess``.  This module looks
at all of them the same way, through psutil's process tree, and asks the
live objects in this process which of them they account for:

    this kernel ── children(recursive) ──> census ── kind (command line, parent)
        │                                    │
        │  MPNB_LINEAGE=<token> (inherited)  ├── owner: a live mpnb pool, loky
        │  and the kernel's session id       │   executor, multiprocessing Process,
        ▼                                    │   resource tracker or forkserver
    processes started here that were         └── leftover: a zombie, a pool worker
    re-parented to init ── orphans ──────────>     nobody accounts for, an orphan

- :func:`status` takes the census: one :class:`ProcessRow` per descendant
  (pid, parent, kind, state, CPU %, memory, age, owner), then the orphans.  It
  prints as a text table and shows as an HTML table in a notebook.
- A row is a *leftover* when it is a zombie, an orphan, or a pool worker
  (or a multiprocessing helper) that is a child of the kernel and that no
  live pool of the kernel accounts for.  Only processes the kernel started
  itself are judged this way: a grandchild's owner lives in another process.
  Each leftover says why, and :func:`kill_leftovers` stops them, each with its
  whole subtree (SIGTERM, then SIGKILL).
- Each mpnb worker has a guardian child (process name ``mpnb-guardian``,
  kind "mpnb worker guardian"), shown with its worker's pool as owner.
- Orphans are found because :func:`mark_lineage` (run by ``%load_ext mpnb``)
  puts a token of this kernel in the environment, which every process started
  later inherits, and because a kernel started by Jupyter leads its own
  session, which even a forked copy stays in.
- :class:`Guard` is a daemon thread that counts the kernel's descendants
  twice a second: one psutil tree walk, which reads every process of the
  machine (2.6 ms with 100 processes, 0.5 % of a core); on a machine so
  crowded that this would pass 1 % of a core, it checks less often.  Past the limit it warns once per episode in the output of the
  running cell, naming the biggest process trees; with ``MPNB_RUNAWAY=kill``
  it also stops the newest processes beyond the limit, with their subtrees.
"""

from __future__ import annotations

import contextvars
import html
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import psutil

from mpnb._worker import GUARDIAN_NAME
from mpnb.facts import byte_size

__all__ = [
    "ACTION_VAR",
    "LIMIT_VAR",
    "LINEAGE_VAR",
    "Guard",
    "ProcessRow",
    "Status",
    "Stopped",
    "configure_guard",
    "default_limit",
    "guard",
    "kill_leftovers",
    "mark_lineage",
    "start_guard",
    "status",
    "stop_guard",
]

# inherited by every process started after %load_ext: tokens of the kernels above it
LINEAGE_VAR = "MPNB_LINEAGE"
# the runaway guard: how many descendants, and what to do past that
LIMIT_VAR = "MPNB_MAX_PROCESSES"
ACTION_VAR = "MPNB_RUNAWAY"
ACTIONS = ("warn", "kill", "off")

# a process younger than this may not be registered with its pool yet
SETTLE = 2.0
# CPU percent of a process seen for the first time is measured over this long
CPU_SAMPLE = 0.2
# how long a leftover gets to exit after SIGTERM, and after SIGKILL
STOP_WAIT = 3.0
# the guard's period, and how many calm checks in a row end an episode
CHECK_INTERVAL = 0.5
CALM_CHECKS = 10
# the most of one CPU the guard may use; it checks less often on a crowded machine
COST = 0.01
# stops reported per episode; a runaway loop would otherwise flood the cell
STOP_REPORTS = 5

MPNB_WORKER = "mpnb worker"
# forked by each mpnb worker to end what the worker leaves; part of its pool
MPNB_GUARDIAN = "mpnb worker guardian"
LOKY_WORKER = "loky worker"
SPAWN_WORKER = "multiprocessing spawn worker"
FORKSERVER = "forkserver"
FORKSERVER_WORKER = "forkserver worker"
RESOURCE_TRACKER = "resource tracker"
KERNEL = "kernel"
KERNEL_FORK = "fork of the kernel"
FORK = "fork of its parent"
OTHER = "other"
# kinds whose owner, when the kernel started them, is an object in the kernel
POOL_KINDS = (LOKY_WORKER, SPAWN_WORKER, FORKSERVER, FORKSERVER_WORKER, RESOURCE_TRACKER, KERNEL_FORK)

MPNB_OWNER = "mpnb.Pool"
#: the owner of spare workers: started when a pool closed, for the next pool like it
MPNB_SPARE = "mpnb.Pool (spare for the next pool)"

_token: str | None = None


# ------------------------------------------------------------------ census


@dataclass(frozen=True)
class ProcessRow:
    """One process below the kernel (or started by it and re-parented)."""

    pid: int
    ppid: int
    depth: int  #: 1 for the kernel's children; orphans start again at 1
    kind: str
    command: str
    state: str  #: psutil's status: "running", "sleeping", "zombie", ...
    cpu_percent: float | None
    rss: int | None  #: bytes
    age: float  #: seconds since it started
    owner: str | None = None  #: the live object that accounts for it
    leftover: str | None = None  #: why it is flagged; None when it is not
    fix: str | None = None  #: how to stop it, for a leftover
    orphan: bool = False
    process: psutil.Process | None = field(default=None, repr=False, compare=False)

    @property
    def zombie(self) -> bool:
        return self.state == psutil.STATUS_ZOMBIE


@dataclass(frozen=True)
class Status:
    """The census of :func:`status`; prints as text, shows as a table."""

    kernel_pid: int
    kernel_command: str
    rows: tuple[ProcessRow, ...]
    guard: str

    @property
    def leftovers(self) -> list[ProcessRow]:
        return [row for row in self.rows if row.leftover]

    def kinds(self) -> dict[int, str]:
        """``{pid: kind}`` of every row."""
        return {row.pid: row.kind for row in self.rows}

    def __str__(self) -> str:
        return _text(self)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        return _html(self)


@dataclass(frozen=True)
class _Seen:
    """What psutil said about one process, read once."""

    process: psutil.Process
    ppid: int
    cmdline: tuple[str, ...]
    name: str
    state: str
    rss: int | None
    created: float


def mark_lineage() -> str:
    """Put this process's token in ``MPNB_LINEAGE``, for its future children.

    Idempotent.  The token is appended to the tokens already there, so a
    kernel started from another kernel finds its own orphans and the outer
    kernel still finds them too.
    """
    global _token
    if _token is None:
        _token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tokens = [t for t in os.environ.get(LINEAGE_VAR, "").split(",") if t]
        os.environ[LINEAGE_VAR] = ",".join([*tokens, _token])
    return _token


def status(cpu: bool = True) -> Status:
    """Every descendant of this process, and every orphan it left.

    Rows come in tree order (a parent before its children).  With ``cpu``,
    processes not seen by an earlier call are measured for
    :data:`CPU_SAMPLE` seconds; later calls report CPU use since the last one.
    """
    kernel = psutil.Process()
    owners = _owners()  # first: it collects multiprocessing's exited children
    tree = _tree(kernel)
    orphans = _orphan_tree(kernel, {seen.process.pid for seen, _ in tree})
    cpu_use = _cpu_percent([seen.process for seen, _ in tree + orphans]) if cpu else {}
    kernel_cmdline = tuple(_cmdline(kernel))
    # pid -> (kind, command line), filled in tree order: a parent before its children
    known: dict[int, tuple[str, tuple[str, ...]]] = {kernel.pid: (KERNEL, kernel_cmdline)}
    now = time.time()
    rows = [_row(seen, depth, known, owners, cpu_use, now) for seen, depth in tree]
    rows += [_orphan_row(seen, depth, known, cpu_use, now) for seen, depth in orphans]
    return Status(kernel.pid, _short(kernel_cmdline), tuple(rows), _guard_summary())


def _row(seen: _Seen, depth: int, known: dict[int, tuple[str, tuple[str, ...]]],
         owners: dict[int, str], cpu_use: dict[int, float], now: float) -> ProcessRow:
    pid = seen.process.pid
    parent_kind, parent_cmdline = known.get(seen.ppid, (None, None))
    kind = _kind(seen.cmdline, parent_kind, parent_cmdline, seen.name)
    owner = owners.get(pid)
    if owner in (MPNB_OWNER, MPNB_SPARE):
        kind = MPNB_WORKER  # also the spawn/forkserver workers of an mpnb.Pool
    elif kind == MPNB_GUARDIAN:
        owner = owners.get(seen.ppid)  # its worker's pool
    known[pid] = (kind, seen.cmdline)
    reason, fix = _judge(seen, kind, parent_kind, owners, now)
    return ProcessRow(pid, seen.ppid, depth, kind, _short(seen.cmdline), seen.state,
                      cpu_use.get(pid), seen.rss, now - seen.created, owner,
                      reason, fix, process=seen.process)


def _orphan_row(seen: _Seen, depth: int, known: dict[int, tuple[str, tuple[str, ...]]],
                cpu_use: dict[int, float], now: float) -> ProcessRow:
    pid = seen.process.pid
    parent_kind, parent_cmdline = known.get(seen.ppid, (None, None))
    if parent_kind is None:  # re-parented: compare with the kernel, which it may be a fork of
        parent_kind, parent_cmdline = known[os.getpid()]
    kind = _kind(seen.cmdline, parent_kind, parent_cmdline, seen.name)
    known[pid] = (kind, seen.cmdline)
    if depth == 1:
        reason = (f"started from this kernel, but its parent died and it was re-parented "
                  f"to pid {seen.ppid} ({_name(seen.ppid)})")
    else:
        reason = "below an orphan of this kernel"
    return ProcessRow(pid, seen.ppid, depth, kind, _short(seen.cmdline), seen.state,
                      cpu_use.get(pid), seen.rss, now - seen.created, None, reason,
                      _STOP_FIX, orphan=True, process=seen.process)


_STOP_FIX = "%mpstatus --kill-leftovers stops it with its subprocesses"


def _judge(seen: _Seen, kind: str, parent_kind: str | None, owners: dict[int, str],
           now: float) -> tuple[str | None, str | None]:
    """``(why it is a leftover, how to stop it)``, or ``(None, None)``."""
    if seen.state == psutil.STATUS_ZOMBIE:
        why = "a zombie: it exited, but its parent has not collected its exit status"
        if parent_kind == KERNEL:
            return why, "%mpstatus --kill-leftovers collects it"
        return why, f"it goes away when its parent, pid {seen.ppid}, collects it or exits"
    started_here = parent_kind in (KERNEL, FORKSERVER)
    if not started_here or now - seen.created < SETTLE:
        return None, None
    pid = seen.process.pid
    if kind == MPNB_WORKER and owners.get(pid) not in (MPNB_OWNER, MPNB_SPARE):
        return "a worker of an mpnb.Pool that was shut down or dropped", _STOP_FIX
    if kind in POOL_KINDS and pid not in owners:
        return (f"a {kind} that no live pool, executor or multiprocessing Process "
                f"of this kernel accounts for"), _STOP_FIX
    return None, None


def _kind(cmdline: tuple[str, ...], parent_kind: str | None,
          parent_cmdline: tuple[str, ...] | None, name: str = "") -> str:
    """What a process is, from its command line, its parent and its name."""
    if name == GUARDIAN_NAME:  # a fork of its worker: same command line
        return MPNB_GUARDIAN
    text = " ".join(cmdline)
    if "from mpnb._worker import boot" in text:
        return MPNB_WORKER
    if "loky.backend.popen_loky" in text:
        return MPNB_WORKER if "--process-name mpnb-worker-" in text else LOKY_WORKER
    if "resource_tracker import main" in text:
        return RESOURCE_TRACKER
    if "multiprocessing.forkserver import main" in text:
        return FORKSERVER_WORKER if parent_kind == FORKSERVER else FORKSERVER
    if "--multiprocessing-fork" in cmdline:
        return SPAWN_WORKER
    if cmdline and parent_cmdline is not None and cmdline == parent_cmdline:
        return KERNEL_FORK if parent_kind == KERNEL else FORK
    return OTHER


def _owners() -> dict[int, str]:
    """``{pid: owner}`` for every process a live object of this process accounts for.

    The one place that reads other libraries' registries: mpnb's live
    engines (their ``worker_pids()``), loky's (and joblib's copy of loky's) executor manager threads,
    multiprocessing's children, and the pids of the resource trackers and the
    forkserver.  Modules not imported yet own nothing.
    """
    owners: dict[int, str] = {p.pid: f"multiprocessing {p.name}"
                              for p in multiprocessing.active_children() if p.pid is not None}
    for name in ("loky.process_executor", "joblib.externals.loky.process_executor"):
        module = sys.modules.get(name)
        for thread in list(getattr(module, "_threads_wakeups", {}).keys()):
            if thread.is_alive():
                owners.update((pid, "loky executor") for pid in list(getattr(thread, "processes", {})))
    for helper in helpers():
        if helper.pid is not None:
            owners[helper.pid] = helper.owner
    launcher = sys.modules.get("mpnb.backends.launcher")
    if launcher is not None:  # exec workers waiting for the next pool
        owners.update((pid, MPNB_SPARE) for pid in launcher.spare_pids())
    base = sys.modules.get("mpnb.backends.base")
    for engine in base.live_engines() if base is not None else ():
        # what runs on this machine only: a dask engine's rows are the cluster's processes
        owners.update((pid, MPNB_OWNER) for pid in engine.worker_pids())
    return owners


#: where multiprocessing and loky keep a helper process they start once per
#: process: module -> (its instance, the attributes of its pid and of the
#: write end of the pipe that keeps it alive, what ``%mpstatus`` calls it)
_HELPERS = {
    "multiprocessing.resource_tracker": ("_resource_tracker", "_pid", "_fd", "multiprocessing resource tracker"),
    "loky.backend.resource_tracker": ("_resource_tracker", "_pid", "_fd", "loky resource tracker"),
    "joblib.externals.loky.backend.resource_tracker": ("_resource_tracker", "_pid", "_fd", "loky resource tracker"),
    "multiprocessing.forkserver": ("_forkserver", "_forkserver_pid", "_forkserver_alive_fd",
                                   "multiprocessing forkserver"),
}


@dataclass(frozen=True)
class Helper:
    """A resource tracker or forkserver of this process: it ignores SIGTERM
    (a tracker) and ends when the pipe ``fd`` writes to reaches EOF."""

    owner: str
    pid: int | None  # None where this process did not start it (it inherited the pipe)
    fd: int | None  # None where it is not running


def helpers() -> list[Helper]:
    """This process's resource trackers and forkserver, as their modules
    record them (modules not imported yet have none)."""
    found = []
    for name, (instance, pid_attribute, fd_attribute, owner) in _HELPERS.items():
        helper = getattr(sys.modules.get(name), instance, None)
        pid, fd = getattr(helper, pid_attribute, None), getattr(helper, fd_attribute, None)
        if isinstance(pid, int) or isinstance(fd, int):
            found.append(Helper(owner, pid if isinstance(pid, int) else None, fd if isinstance(fd, int) else None))
    return found


def _see(process: psutil.Process) -> _Seen | None:
    try:
        with process.oneshot():
            state = process.status()
            rss = None if state == psutil.STATUS_ZOMBIE else process.memory_info().rss
            return _Seen(process, process.ppid(), tuple(_cmdline(process)), _process_name(process),
                         state, rss, process.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _process_name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "?"


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline() or [f"[{process.name()}]"]
    except (psutil.ZombieProcess, psutil.AccessDenied):
        try:
            return [f"[{process.name()}]"]
        except psutil.Error:
            return ["?"]


def _tree(kernel: psutil.Process) -> list[tuple[_Seen, int]]:
    """The kernel's descendants, parents before children, with their depth."""
    seen = [s for s in map(_see, kernel.children(recursive=True)) if s is not None]
    return _depth_first(seen, {kernel.pid})


def _depth_first(seen: list[_Seen], roots: set[int]) -> list[tuple[_Seen, int]]:
    """Order ``seen`` as trees hanging from the pids in ``roots``."""
    below: dict[int, list[_Seen]] = {}
    for s in seen:
        below.setdefault(s.ppid, []).append(s)
    ordered: list[tuple[_Seen, int]] = []
    stack = [(s, 1) for root in sorted(roots) for s in reversed(_by_age(below.get(root, [])))]
    while stack:
        s, depth = stack.pop()
        ordered.append((s, depth))
        stack.extend((c, depth + 1) for c in reversed(_by_age(below.get(s.process.pid, []))))
    return ordered


def _by_age(seen: list[_Seen]) -> list[_Seen]:
    return sorted(seen, key=lambda s: (s.created, s.process.pid))


def _orphan_tree(kernel: psutil.Process, descendants: set[int]) -> list[tuple[_Seen, int]]:
    """Processes started from this kernel that are no longer below it."""
    leader = os.getsid(0) == kernel.pid
    if _token is None and not leader:
        return []
    uid = os.getuid()
    found = []
    for process in psutil.process_iter(["uids"]):
        uids = process.info["uids"]
        if process.pid in descendants or process.pid == kernel.pid or uids is None or uids.real != uid:
            continue
        if _started_here(process, kernel, leader):
            seen = _see(process)
            if seen is not None and seen.state != psutil.STATUS_ZOMBIE:
                found.append(seen)
    pids = {s.process.pid for s in found}
    roots = {s.ppid for s in found if s.ppid not in pids}
    return _depth_first(found, roots)


def _started_here(process: psutil.Process, kernel: psutil.Process, leader: bool) -> bool:
    try:
        if leader and os.getsid(process.pid) == kernel.pid:
            mine = True
        else:
            mine = _token is not None and _token in process.environ().get(LINEAGE_VAR, "").split(",")
        # it may have been started by a descendant after the tree was read
        return mine and kernel not in process.parents()
    except (psutil.Error, OSError):
        return False


_cpu_seen: dict[int, psutil.Process] = {}


def _cpu_percent(processes: list[psutil.Process]) -> dict[int, float]:
    """CPU percent of each process since the last call (or over CPU_SAMPLE s)."""
    fresh = False
    for process in processes:
        if _cpu_seen.get(process.pid) != process:
            _cpu_seen[process.pid] = process
            fresh = True
            try:
                process.cpu_percent(None)
            except psutil.Error:
                pass
    if fresh:
        time.sleep(CPU_SAMPLE)
    use = {}
    for process in processes:
        try:
            use[process.pid] = _cpu_seen[process.pid].cpu_percent(None)
        except psutil.Error:
            pass
    for pid in set(_cpu_seen) - {p.pid for p in processes}:
        del _cpu_seen[pid]
    return use


def _command_of(pid: int) -> str:
    try:
        return _short(_cmdline(psutil.Process(pid)), 50)
    except psutil.Error:
        return "exited"


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"


# -------------------------------------------------------------- stopping


@dataclass(frozen=True)
class Stopped:
    """What :func:`kill_leftovers` did to one process."""

    pid: int
    kind: str
    outcome: str  #: "terminated", "killed", "collected" or why it is still there


def kill_leftovers(census: Status | None = None) -> list[Stopped]:
    """Stop every leftover of :func:`status` (or of ``census``), tree by tree.

    Each leftover that is not below another leftover is stopped together
    with all its descendants: SIGTERM, then SIGKILL to those still running
    after :data:`STOP_WAIT` seconds.  Zombies of this process are collected;
    a zombie of another process cannot be, and says so.
    """
    census = census or status(cpu=False)
    flagged = {row.pid for row in census.leftovers}
    done: list[Stopped] = []
    for row in census.leftovers:
        if row.ppid in flagged or row.process is None:
            continue  # stopped with its parent's tree
        if row.zombie:
            done.append(Stopped(row.pid, row.kind, _collect_zombie(row)))
        else:
            done.extend(_stop_tree(row.process, census.kinds()))
    return done


def _collect_zombie(row: ProcessRow) -> str:
    if row.ppid != os.getpid():
        return f"still there: a zombie of pid {row.ppid}, which must collect it"
    _reap([row.pid])
    return "collected"


def _stop_tree(root: psutil.Process, kinds: dict[int, str]) -> list[Stopped]:
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for process in tree:
        _send(process, signal.SIGTERM)
    alive = _wait_gone(tree, STOP_WAIT)
    for process in alive:
        _send(process, signal.SIGKILL)
    still = _wait_gone(alive, STOP_WAIT)
    _reap([p.pid for p in tree])
    return [
        Stopped(p.pid, kinds.get(p.pid, OTHER),
                "still running" if p in still else "killed" if p in alive else "terminated")
        for p in tree
    ]


def _send(process: psutil.Process, signum: int) -> bool:
    try:
        process.send_signal(signum)
        return True
    except psutil.Error:
        return False


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process has exited (or is a zombie); the ones still running.

    Not ``psutil.wait_procs``: for a child of this process that would call
    ``waitpid`` and steal the exit status its owner (a multiprocessing
    ``Process``, a ``subprocess.Popen``) is waiting for.
    """
    deadline = time.monotonic() + timeout
    alive = list(processes)
    while alive:
        alive = [p for p in alive if _running(p)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return alive


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap(pids: Iterable[int]) -> None:
    """Collect exited children of this process that no owner will collect."""
    owned = {p.pid for p in multiprocessing.active_children()}  # collects multiprocessing's own
    for pid in set(pids) - owned:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


# ---------------------------------------------------------- runaway guard


def default_limit() -> int:
    """The guard's default limit: ``max(64, 8 x usable CPUs)``.

    Room for two pools at mpnb's own per-pool maximum (``MPNB_MAX_WORKERS``,
    four workers per CPU) or eight pools of one worker per CPU, with their
    resource trackers and forkservers; at least 64, so a small machine can
    run several libraries' pools and DataLoaders at once without a warning.
    A fork bomb doubles with every generation and passes any such limit
    within moments, so the margin costs little.
    """
    from mpnb.limits import cpu_count

    return max(64, 8 * cpu_count())


def _limit_from(raw: str, source: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{source}: the process limit must be a whole number of at least 1 "
                         f"(the default here is {default_limit()})")
    return value


def _action_from(raw: str, source: str) -> str:
    action = raw.strip().lower()
    if action not in ACTIONS:
        raise ValueError(f"{source}: what to do with runaway processes must be "
                         f"one of {', '.join(ACTIONS)}")
    return action


def _settings_from_env() -> tuple[int, str]:
    raw_limit = os.environ.get(LIMIT_VAR, "").strip()
    limit = _limit_from(raw_limit, f"{LIMIT_VAR}={raw_limit!r}") if raw_limit else default_limit()
    raw_action = os.environ.get(ACTION_VAR, "").strip()
    action = _action_from(raw_action, f"{ACTION_VAR}={raw_action!r}") if raw_action else "warn"
    return limit, action


class Guard:
    """Counts this process's descendants; warns about, or stops, runaways.

    An mpnb worker's guardian (see :func:`mpnb._worker._start_guardian`) is
    counted as part of its worker, not on its own.

    ``check()`` runs every :data:`CHECK_INTERVAL` seconds in a daemon thread.
    An *episode* starts when the count of live descendants passes ``limit``
    and ends after :data:`CALM_CHECKS` checks in a row at or below it; each
    episode is announced once.  With ``action == "kill"`` every check of an
    episode also stops the newest processes beyond the limit, each with its
    subtree.  The counters (``checks``, ``warnings``, ``stopped``) let a
    caller wait for the guard instead of sleeping.
    """

    def __init__(self, limit: int, action: str, write: Callable[[str], None]):
        self.limit = limit
        self.action = action
        self.checks = 0
        self.warnings = 0
        self.stopped: list[int] = []
        self._write = write
        self._kernel = psutil.Process()
        self._episode = False
        self._calm = 0
        self._reports = 0
        self._halt = threading.Event()
        # a fresh context: ipykernel then routes output to the cell running now
        self._thread = threading.Thread(target=contextvars.Context().run, args=(self._loop,),
                                        name="mpnb-runaway-guard", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _loop(self) -> None:
        wait = CHECK_INTERVAL
        while not self._halt.wait(wait):
            spent = time.thread_time()
            try:
                self.check()
            except psutil.Error:
                pass  # the kernel's tree changed under the walk; the next check sees it
            # a walk reads every process of the machine: on a crowded host, look
            # less often, so that the guard never takes more than COST of a core
            wait = max(CHECK_INTERVAL, (time.thread_time() - spent) / COST)

    def check(self) -> None:
        """Count once; announce a new episode; stop processes if asked to."""
        try:
            processes = self._kernel.children(recursive=True)
            if len(processes) > self.limit:
                # zombies hold no resources but a pid; a worker's guardian is part of the worker
                processes = [p for p in processes if _running(p) and _process_name(p) != GUARDIAN_NAME]
            if len(processes) <= self.limit:
                self._calm += 1
                if self._calm >= CALM_CHECKS:
                    self._episode = False
                return
            self._calm = 0
            if not self._episode:
                self._episode = True
                self._reports = 0
                self._write(_runaway_message(self._kernel, processes, self.limit, self.action))
                self.warnings += 1
            if self.action == "kill":
                self._stop_newest(processes)
        finally:
            self.checks += 1

    def _stop_newest(self, processes: list[psutil.Process]) -> None:
        newest = sorted(processes, key=_created)[self.limit:]
        killed = _kill_subtrees(newest)
        if not killed:
            return
        self.stopped.extend(killed)
        self._reports += 1
        if self._reports <= STOP_REPORTS:
            shown = ", ".join(map(str, killed[:20])) + (", ..." if len(killed) > 20 else "")
            more = (" Further stops in this episode are not reported."
                    if self._reports == STOP_REPORTS else "")
            self._write(f"mpnb: the runaway guard stopped {len(killed)} processes with SIGKILL, "
                        f"the newest beyond the limit of {self.limit} and their subprocesses "
                        f"(pids {shown}).{more} To only warn: %mpstatus --on-runaway warn.\n")


def _created(process: psutil.Process) -> tuple[float, int]:
    try:
        return process.create_time(), process.pid
    except psutil.Error:
        return 0.0, process.pid


def _kill_subtrees(roots: list[psutil.Process]) -> list[int]:
    """SIGKILL ``roots`` and everything below them; the pids killed.

    Each process is first stopped (SIGSTOP), so a runaway cannot start new
    children between the listing of its subtree and the kill.
    """
    frozen: list[psutil.Process] = [p for p in roots if _send(p, signal.SIGSTOP)]
    for process in list(frozen):
        try:
            below = process.children(recursive=True)
        except psutil.Error:
            continue
        frozen.extend(p for p in below if p not in frozen and _send(p, signal.SIGSTOP))
    return [p.pid for p in frozen if _send(p, signal.SIGKILL)]


def _runaway_message(kernel: psutil.Process, processes: list[psutil.Process], limit: int, action: str) -> str:
    families = ", ".join(_biggest_trees(kernel, processes))
    then = ("it now stops the newest ones beyond the limit (MPNB_RUNAWAY=kill)" if action == "kill"
            else "%mpstatus --on-runaway kill (or MPNB_RUNAWAY=kill) makes it stop the newest ones")
    return (
        f"mpnb: runaway processes: this kernel has {len(processes)} processes below it, more than "
        f"the limit of {limit} ({LIMIT_VAR}).\n"
        f"Biggest trees: {families}.\n"
        f"Fix: look for a loop that starts pools or processes without stopping them, shut down the "
        f"pools you no longer use (pool.shutdown(), or a with-block), and see every process with "
        f"%mpstatus. If this many is intended, raise the limit with %mpstatus --limit N. The guard "
        f"warns once per episode; {then}.\n"
    )


def _biggest_trees(kernel: psutil.Process, processes: list[psutil.Process]) -> list[str]:
    """The kernel's direct children, then the three processes with most below them."""
    parent: dict[int, int] = {}
    for process in processes:
        try:
            parent[process.pid] = process.ppid()
        except psutil.Error:
            pass
    below: dict[int, int] = {}
    for pid in parent:
        up = parent[pid]
        while up in parent:
            below[up] = below.get(up, 0) + 1
            up = parent[up]
    direct = sum(1 for ppid in parent.values() if ppid == kernel.pid)
    trees = [f"the kernel (pid {kernel.pid}) started {direct} directly"]
    for pid, count in sorted(below.items(), key=lambda item: -item[1])[:3]:
        trees.append(f"pid {pid} ({_command_of(pid)}) has {count} below it")
    return trees


_guard: Guard | None = None


def guard() -> Guard | None:
    """The running runaway guard of this process, if any."""
    return _guard


def start_guard(shell: Any = None) -> Guard | None:
    """Start the guard with the settings of the environment (``%load_ext``).

    Returns ``None`` when ``MPNB_RUNAWAY=off``.  A bad setting raises
    ``ValueError`` naming the variable.
    """
    limit, action = _settings_from_env()
    return configure_guard(limit, action, shell)


def configure_guard(limit: int | None = None, action: str | None = None, shell: Any = None) -> Guard | None:
    """Change the guard's limit or action, starting it if needed; ``"off"`` stops it.

    What is not given comes from the running guard, else from the environment.
    """
    global _guard
    if limit is not None:
        limit = _limit_from(str(limit), f"limit {limit}")
    if action is not None:
        action = _action_from(action, f"on runaway {action!r}")
    if _guard is None:
        env_limit, env_action = _settings_from_env()
        limit, action = limit or env_limit, action or env_action
    else:
        limit, action = limit or _guard.limit, action or _guard.action
    if action == "off":
        stop_guard()
        return None
    if _guard is None:
        _guard = Guard(limit, action, _cell_writer(shell))
        _guard.start()
    _guard.limit, _guard.action = limit, action
    return _guard


def stop_guard() -> None:
    """Stop the guard thread (``%unload_ext``)."""
    global _guard
    if _guard is not None:
        _guard.stop()
        _guard = None


def _cell_writer(shell: Any) -> Callable[[str], None]:
    """Write to the output of the cell the kernel runs now (stderr elsewhere)."""
    kernel = getattr(shell, "kernel", None)

    def write(text: str) -> None:
        stream: Any = sys.stderr  # in a kernel, ipykernel's OutStream
        set_parent = getattr(stream, "set_thread_parent", None)
        token = None
        if kernel is not None and set_parent is not None:
            token = set_parent(kernel.get_parent("shell"))
        try:
            stream.write(text)
            stream.flush()
        finally:
            if token is not None:
                stream.reset_thread_parent(token)

    return write


def _guard_summary() -> str:
    current = _guard
    if current is None:
        return "runaway guard: off (%mpstatus --on-runaway warn starts it)"
    return (f"runaway guard: limit {current.limit} processes ({LIMIT_VAR}, %mpstatus --limit N), "
            f"on runaway: {current.action} ({ACTION_VAR}, %mpstatus --on-runaway warn|kill|off)")


# -------------------------------------------------------------- rendering


def _short(cmdline: tuple[str, ...] | list[str], width: int = 90) -> str:
    if not cmdline:
        return "?"
    program = os.path.basename(cmdline[0]) or cmdline[0]
    text = " ".join([program, *cmdline[1:]])
    return text if len(text) <= width else text[: width - 3] + "..."


def _age(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} m {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} m"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _note(row: ProcessRow) -> str:
    if row.leftover:
        return "LEFTOVER"
    return row.owner or ""


def _headline(census: Status) -> str:
    below = sum(1 for row in census.rows if not row.orphan)
    orphans = sum(1 for row in census.rows if row.orphan)
    parts = [f"{below} processes below it"]
    if orphans:
        parts.append(f"{orphans} orphaned")
    parts.append(f"{len(census.leftovers)} leftover")
    return f"mpnb: kernel pid {census.kernel_pid} ({census.kernel_command}): " + ", ".join(parts)


def _text(census: Status) -> str:
    header = ("pid", "parent", "kind", "state", "CPU %", "memory", "age", "owner", "command")
    table = [header] + [
        ("  " * (row.depth - 1) + str(row.pid), str(row.ppid), row.kind, row.state,
         _cpu(row.cpu_percent), byte_size(row.rss), _age(row.age), _note(row), row.command)
        for row in census.rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    orphans = sum(1 for row in census.rows if row.orphan)
    if orphans:
        lines.insert(len(lines) - orphans, "started here, now outside the kernel's tree (orphans):")
    return "\n".join([_headline(census), *lines, *_leftover_lines(census), census.guard])


def _leftover_lines(census: Status) -> list[str]:
    if not census.leftovers:
        return []
    lines = ["leftovers:"]
    lines.extend(f"  {row.pid} ({row.kind}): {row.leftover}; {row.fix}" for row in census.leftovers)
    lines.append("  %mpstatus --kill-leftovers stops them all, each with its subprocesses "
                 f"(SIGTERM, then SIGKILL after {STOP_WAIT:.0f} s)")
    return lines


def _html(census: Status) -> str:
    esc = html.escape
    head = "".join(f"<th>{h}</th>" for h in
                   ("pid", "parent", "kind", "state", "CPU %", "memory", "age", "owner / leftover", "command"))
    rows = []
    for row in census.rows:
        if row.orphan and row is next(r for r in census.rows if r.orphan):
            rows.append("<tr><td colspan='9'><i>started here, now outside the kernel's tree "
                        "(orphans):</i></td></tr>")
        style = " style='background:#fdecea'" if row.leftover else ""
        note = (f"<b>leftover</b>: {esc(row.leftover)}; {esc(row.fix or '')}" if row.leftover
                else esc(row.owner or ""))
        indent = "&nbsp;" * 3 * (row.depth - 1) + ("&#8627; " if row.depth > 1 else "")
        rows.append(
            f"<tr{style}><td>{indent}{row.pid}</td><td>{row.ppid}</td><td>{esc(row.kind)}</td>"
            f"<td>{esc(row.state)}</td><td>{_cpu(row.cpu_percent)}</td><td>{byte_size(row.rss)}</td>"
            f"<td>{_age(row.age)}</td><td>{note}</td><td><code>{esc(row.command)}</code></td></tr>"
        )
    foot = ""
    if census.leftovers:
        foot = ("<p><code>%mpstatus --kill-leftovers</code> stops the leftovers, each with its "
                f"subprocesses (SIGTERM, then SIGKILL after {STOP_WAIT:.0f} s).</p>")
    return (f"<p><b>{esc(_headline(census))}</b></p><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{foot}<p><small>{esc(census.guard)}</small></p>")


# ------------------------------------------------------------------ magic


def magic(shell: Any, kill: bool = False, limit: int | None = None, on_runaway: str | None = None) -> Status:
    """What ``%mpstatus`` does: configure the guard, stop leftovers, take the census."""
    if limit is not None or on_runaway is not None:
        configure_guard(limit, on_runaway, shell)
        print(_guard_summary())
    if kill:
        stopped = kill_leftovers()
        if not stopped:
            print("mpnb: no leftovers to stop")
        for s in stopped:
            print(f"mpnb: {s.pid} ({s.kind}): {s.outcome}")
    return status()
