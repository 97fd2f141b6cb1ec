"""Worker processes on this machine, each a fresh Python interpreter.

Every start method starts a new interpreter (never a bare ``fork`` of the
kernel, whose threads and ZMQ sockets must not be copied), hands it the
parent's ``sys.path`` and sets environment variables before anything is
imported:

- ``"exec"`` (the default on POSIX): ``subprocess`` starts
  ``python -S -P -c "from mpnb._worker import boot; ..."`` (vfork+exec),
  which imports only the worker module and reads its setup from the pipe.
  It is the fastest to start: no ``site`` (its ``.pth`` files cost 3 to
  15 ms, most of it an editable install's finder), no launcher module to
  import, nothing to unpickle but the setup.  The worker gets the parent's
  ``sys.path`` instead, and runs ``site``'s ``.pth`` files of the parent's
  site directories only if a module is not found on it (see
  :func:`mpnb._worker.boot`).
- ``"loky"``: loky's process launcher (fork+exec), as loky's executors use.
- ``"spawn"``, ``"forkserver"``: the standard library's.

Each worker gets one end of a private duplex pipe and a 24-byte shared-memory
slot (a file in a private ``0700`` directory, ``mpnb-pool-<pid>-*`` in the
temp directory, swept by the next pool when its process was killed) where it
writes which task it is running.

A worker leads its own process group and, on Linux, is a child subreaper, so
everything its tasks start stays findable below it or in its group:
:meth:`WorkerHandle.kill` ends that whole tree, and so does the worker itself
when its parent dies or it stops (see :func:`mpnb._worker.kill_tree`).

``initargs`` may hold ``multiprocessing`` queues, locks and events, which
pickle only while a process is being started: the initializer is pickled
then, as part of that start, and the file descriptors it needs go to the
worker with it (the ``exec`` launcher does what ``popen_spawn_posix`` does,
with ``subprocess``'s ``pass_fds``).
"""

from __future__ import annotations

import io
import mmap
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import ChainMap
from multiprocessing import Pipe
from multiprocessing.context import set_spawning_popen
from typing import Any, cast

from mpnb import _worker, exits
from mpnb._protocol import SLOT, Boot
from mpnb.resources import Resources, pin
from mpnb.shared import remove_results, sweep_dead, sweep_dead_shared

# Held while a worker starts, from its pipe's creation until the child's ends
# are closed here, and taken by every os.fork() of this process before it
# forks (a fork Pool, a library that forks): a process forked in that window
# would keep the child's ends open (the start's exec-error pipe among them),
# so that subprocess waits forever for the new worker's exec and no end of
# file ever tells the engine that a worker died.  Re-entrant: a start method
# may itself fork inside the window (loky 3.4 forks to exec its
# resource tracker), and that child closes what it does not need.
_STARTING = threading.RLock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_STARTING.acquire, after_in_parent=_STARTING.release,
                        after_in_child=_STARTING.release)

POOL_DIR_PREFIX = "mpnb-pool-"


class WorkerHandle:
    """The parent's side of one worker process."""

    def __init__(self, worker_id: int, process, conn, slot_path: str):
        self._tree_ended = False
        self.worker_id = worker_id
        self.process = process
        self.conn = conn
        self.slot_path = slot_path
        self._pidfd = _pidfd(process.pid)
        fd = os.open(slot_path, os.O_RDONLY)
        try:
            self._slot = mmap.mmap(fd, SLOT.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def sentinel(self) -> int:
        """Ready when the worker has ended.  A pidfd where there is one: the
        launcher's pipe stays open while a process a task forked holds a copy."""
        return self._pidfd if self._pidfd is not None else self.process.sentinel

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def current(self) -> tuple[int, int, float]:
        """``(chunk seq, position, start time)`` of the task running now.

        Written by the worker before each task; ``seq`` is -1 before the
        first one.
        """
        seq, pos, started, end, reached = SLOT.unpack_from(self._slot, 0)
        if end > pos + 1 and pos <= reached < end:  # inside a batch: the task it has reached
            pos = reached
        return seq, pos, started

    def crash_position(self) -> tuple[int, int, int]:
        """``(chunk seq, position, batch end)`` as the worker wrote them last:
        the task it ran, or, with a batch end (not 0), the first task of the
        batch of tasks it ran in one C call (one of them was running)."""
        seq, pos, _, end, _ = SLOT.unpack_from(self._slot, 0)
        return seq, pos, end

    def kill(self) -> None:
        """End the worker and everything its tasks started; every path that
        stops a worker comes here (timeout, Cancel, crash, shutdown, exit)."""
        running = _running(self.pid)
        _worker.kill_tree(self.pid)
        if not running and not self._tree_ended:
            # it ended by itself (a crash): what left its group is found by its mark
            _worker.kill_marked(self.slot_path)
            # and the results it wrote but never sent go now, before its crash is reported
            remove_results(self.slot_path)
        self._tree_ended = True

    def join(self, timeout: float | None = None) -> None:
        self.process.join(timeout)

    def crash_report(self) -> str:
        """What faulthandler wrote when the worker crashed, if anything."""
        try:
            with open(self.slot_path + ".fault", encoding="utf-8", errors="replace") as f:
                return f.read().strip()
        except OSError:
            return ""

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        try:
            self._slot.close()
        except (BufferError, ValueError):
            pass
        if isinstance(self.process, _ExecProcess):
            self.process.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        for path in (self.slot_path, self.slot_path + ".fault"):
            try:
                os.unlink(path)
            except OSError:
                pass
        remove_results(self.slot_path)  # results it wrote and never sent (it died)


START_METHODS = ("exec", "loky", "spawn", "forkserver")
DEFAULT_METHOD = "exec" if os.name == "posix" else "loky"

# mpnb's own directory, after the standard library's (-S: no site-packages
# yet); boot() then puts the parent's whole sys.path in place
_HOME = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = f"import sys; sys.path.append({_HOME!r}); " + "from mpnb._worker import boot; boot({fd}, {parent})"
# -S: no site (see the module docstring); -P: nothing of the current
# directory shadows a module before boot() sets sys.path.  Not -E: the
# environment (PYTHONHASHSEED, PYTHONWARNINGS, ...) applies as in the parent.
_FLAGS = ("-S", "-P")


#: what the finders of well-known ``.pth`` files find (besides setuptools'
#: editable installs, whose modules list theirs)
_KNOWN_FINDERS = {"_distutils_hack": ("distutils", "pip"), "_virtualenv": ("distutils", "setuptools")}


def site_setup() -> tuple[list[str], list[str] | None]:
    """What an exec worker (started without ``site``) needs of this
    process's ``site``: the site directories whose ``.pth`` files it ran,
    and the top-level names that the import finders those files installed
    find (an editable install's packages).  The worker runs the ``.pth``
    files when it first imports one of those names; ``None`` for the names
    when a finder's names are unknown: then at its start."""
    site = sys.modules.get("site")
    if site is None or sys.flags.no_site:
        return [], []
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    dirs = [d for d in dirs if d in sys.path]
    imported = _pth_imports(dirs)
    names: set[str] = set()
    for finder in sys.meta_path:
        module_name = (finder if isinstance(finder, type) else type(finder)).__module__
        if module_name not in imported:
            continue  # not installed by site: a worker installs it as the parent did, by importing
        found: Any = _KNOWN_FINDERS.get(module_name)
        mapping = getattr(sys.modules.get(module_name), "MAPPING", None)
        if found is None and isinstance(mapping, dict):
            namespaces = getattr(sys.modules[module_name], "NAMESPACES", {})
            found = [*mapping, *namespaces]  # setuptools' editable finder
        if found is None:
            return dirs, None
        names.update(name.partition(".")[0] for name in found)
    return dirs, sorted(names)


def _pth_imports(dirs: list[str]) -> set[str]:
    """The modules the ``import`` lines of the ``.pth`` files in ``dirs`` name."""
    found: set[str] = set()
    for directory in dirs:
        try:
            files = [f for f in os.listdir(directory) if f.endswith(".pth")]
        except OSError:
            continue
        for name in files:
            try:
                with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
                    lines = [line for line in f if line.startswith(("import ", "import\t"))]
            except OSError:
                continue
            for line in lines:
                for statement in line.split(";"):
                    words = statement.replace(",", " ").split()
                    if words[:1] == ["import"]:
                        found.update(word for word in words[1:] if word.isidentifier())
                # setuptools' distutils shim: enabled and __import__('_distutils_hack').add_shim()
                for call in line.split("__import__(")[1:]:
                    found.add(call[1:].partition(call[:1])[0])
    return found


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)  # Linux 5.3+; the worker is not reaped yet
    except (AttributeError, OSError):
        return None


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        import psutil

        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


# ---------------------------------------------------------------- initargs


class _ExecSpawning:
    """What multiprocessing's reducers ask of a process being started, as
    ``popen_spawn_posix.Popen`` answers it: the file descriptors a queue or
    connection needs are collected, and keep their numbers in the worker."""

    def __init__(self) -> None:
        from multiprocessing.popen_spawn_posix import _DupFd

        self.DupFd = _DupFd
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return fd


def _refuse_fork_semlock(lock) -> tuple:
    """Reduce a multiprocessing lock, refusing one the worker cannot open."""
    import _multiprocessing

    try:
        state = lock.__getstate__()  # Python 3.12+ refuses a fork-context one here
        if state[3] is not None:  # a named semaphore: check it still exists
            _multiprocessing.SemLock._rebuild(*state)
    except (FileNotFoundError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "fork" not in str(exc):
            raise
        kind = type(lock).__name__
        raise ValueError(
            f"initargs hold a multiprocessing {kind} (perhaps inside a Queue or Event) made "
            f"by the 'fork' start method, the default context on Linux before Python 3.14; "
            f"it cannot reach workers that start as fresh interpreters. Make it with "
            f"multiprocessing.get_context('spawn').{kind}() (or 'forkserver'), and the same "
            f"for the Queue or Event that holds it."
        ) from None
    return lock.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


def _child_pickler() -> type:
    import cloudpickle
    from multiprocessing import synchronize
    from multiprocessing.reduction import ForkingPickler

    from mpnb import serialize

    locks = {cls: _refuse_fork_semlock for cls in
             (synchronize.Lock, synchronize.RLock, synchronize.Semaphore, synchronize.BoundedSemaphore)}

    class ChildPickler(serialize.Pickler):
        """mpnb's pickler (notebook functions by value, their file names kept)
        plus multiprocessing's reducers (connections and sockets as file
        descriptors for the child)."""

        # ForkingPickler's reducers for connections and sockets (a private table, checked by test_primitives)
        dispatch_table = ChainMap(locks, getattr(ForkingPickler, "_extra_reducers"),
                                  cloudpickle.CloudPickler.dispatch_table)

    return ChildPickler


class _Initializer:
    """``(initializer, initargs)``, pickled only while a worker is being
    started, the one moment multiprocessing lets queues and locks pickle;
    the worker receives the bytes and loads them in its set-up."""

    def __init__(self, initializer, initargs: tuple):
        self.call = (initializer, tuple(initargs))

    def dumps(self) -> bytes:
        buffer = io.BytesIO()
        _child_pickler()(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(self.call)
        return buffer.getvalue()

    def __reduce__(self):
        return bytes, (self.dumps(),)

    def check(self) -> None:
        """Pickle it once as a start would, so that what cannot reach a
        worker is refused when the pool is made."""
        set_spawning_popen(cast(Any, _ExecSpawning()))
        try:
            self.dumps()
        except ValueError:  # a fork-context lock: its message names the fix
            raise
        except Exception as exc:
            raise self._problem(exc) from exc
        finally:
            set_spawning_popen(None)

    def _problem(self, exc: BaseException) -> BaseException:
        """The pickle doctor's sentence for what does not pickle: the path
        from ``initializer`` or ``initargs[i]``, the type, why, the fix."""
        from mpnb.pickling import PicklingProblem, diagnose, function_label

        initializer, initargs = self.call
        named = [(initializer, function_label(initializer))]
        named += [(arg, f"initargs[{i}]") for i, arg in enumerate(initargs)]
        for obj, name in named:
            try:
                found = diagnose(obj, by_value=True, name=name)
            except Exception:  # the doctor must not hide the real error
                found = None
            if found is not None:
                return PicklingProblem(found)
        return pickle.PicklingError(f"the initializer and its initargs cannot be sent to a worker: {exc}")


class _ExecProcess:
    """A worker started by ``subprocess``, with the ``Process`` attributes the
    handle uses; its sentinel is a pipe the child holds open until it ends."""

    def __init__(self, conn_fd: int, env: dict[str, str], fds: list[int]):
        sentinel, child_sentinel = os.pipe()
        try:
            # process_group: leads its own group from the start (see _worker._die_with_parent)
            self._popen = subprocess.Popen(
                [sys.executable, *_FLAGS, "-c", _BOOT.format(fd=conn_fd, parent=os.getpid())],
                env=env, pass_fds=(conn_fd, child_sentinel, *fds), close_fds=True,
                process_group=0,
            )
        except BaseException:
            os.close(sentinel)
            raise
        finally:
            os.close(child_sentinel)
        self.sentinel = sentinel
        self.pid = self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        os.close(self.sentinel)


class Launcher:
    """Starts worker processes on this machine (the local engine's mechanics).

    ``method`` is how: ``"exec"`` (the default on POSIX), ``"loky"``, or
    the standard library's ``"spawn"`` or ``"forkserver"`` (see the module
    docstring).  Never ``fork``: a kernel's threads and sockets must not be
    copied.

    ``env`` is set in each worker before it imports anything but mpnb's
    worker module (thread caps, the nesting depth); ``config`` goes to
    :func:`mpnb._worker.main`.  ``resources`` adds each slot's own variables
    (by its rank) and pins it to its CPUs (:mod:`mpnb.resources`).
    """

    def __init__(self, env: dict[str, str], config: dict[str, Any], method: str = DEFAULT_METHOD,
                 resources: Resources | None = None):
        if method not in START_METHODS:
            raise ValueError(f"start method {method!r}: use one of {', '.join(START_METHODS)}")
        if method == "exec" and os.name != "posix":
            method = "loky"  # subprocess cannot pass a pipe this way on Windows
        if method == "exec":
            self._context = None
        elif method == "loky":
            from loky.backend.context import get_context

            self._context = get_context("loky")
        else:
            self._context = multiprocessing.get_context(method)
        self.method = method
        self.resources = resources or Resources()
        self._env = dict(env)
        self._config = dict(config, env=dict(env))
        self._config["authkey"] = bytes(multiprocessing.current_process().authkey)  # for Manager proxies
        if config.get("initializer") is not None:
            self._config["initializer"] = _Initializer(*config["initializer"])
            self._config["initializer"].check()
        self._site = site_setup() if method == "exec" else ([], [])
        self._flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
        _sweep_dead_pools_once()
        # the owner's pid in the name: the next pool removes it if the owner was killed
        self._dir = tempfile.mkdtemp(prefix=f"{POOL_DIR_PREFIX}{os.getpid()}-")  # mode 0700
        # also at interpreter exit, should the engine's thread not get there
        self._remove_dir = exits.finalize(self, _remove_pool_files, self._dir)
        self._exec_envs: dict[int, dict[str, str]] = {}  # by rank: what spares must match

    def start_worker(self, worker_id: int, rank: int = 0) -> WorkerHandle:
        """Start a worker for slot ``rank`` (its environment and CPUs)."""
        env = {**self._env, **self.resources.env(rank)}
        # a spawn or forkserver worker sets it from here, before the initializer runs
        config = dict(self._config, env=env) if env != self._env else self._config
        if self.method == "exec":
            self._exec_envs[rank] = exec_env = {**os.environ, **env}
            adopted = self._adopt(worker_id, rank, exec_env, config)
            if adopted is not None:
                return adopted
        slot_path = os.path.join(self._dir, f"worker-{worker_id}")
        with open(slot_path, "wb") as f:
            f.write(SLOT.pack(-1, -1, 0.0, 0, -1))
        setup, fds = self._boot(slot_path, config) if self.method == "exec" else (b"", [])
        # no fork of this process may copy the new worker's pipe ends (see _STARTING)
        with _STARTING:
            parent_end, child_end = Pipe(duplex=True)
            try:
                process = self._start(worker_id, child_end, slot_path, config, env, fds)
            except BaseException:
                parent_end.close()
                raise
            finally:
                child_end.close()
        self._pin(process.pid, rank)
        if setup:
            parent_end.send_bytes(setup)
        return WorkerHandle(worker_id, process, parent_end, slot_path)

    def _pin(self, pid: int, rank: int) -> None:
        cpus = self.resources.cpu_set(rank)
        if cpus is not None:
            # an exec worker waits for its setup: one thread, nothing imported
            # yet; another has every thread pinned, and those it starts later
            # inherit the set
            pin(pid, cpus)

    def _adopt(self, worker_id: int, rank: int, exec_env: dict[str, str],
               config: dict[str, Any]) -> WorkerHandle | None:
        """A spare started with this environment, given its set-up, or None."""
        spare = SPARES.take(exec_env)
        if spare is None:
            return None
        setup, fds = self._boot(spare.slot_path, config)
        if fds:  # descriptors must be passed at the start: it cannot serve this pool
            spare.end()
            return None
        self._pin(spare.process.pid, rank)
        try:
            spare.conn.send_bytes(setup)
        except OSError:  # it ended meanwhile
            spare.end()
            return None
        return WorkerHandle(worker_id, spare.process, spare.conn, spare.slot_path)

    def _boot(self, slot_path: str, config: dict[str, Any]) -> tuple[bytes, list[int]]:
        """An exec worker's set-up, pickled, and the descriptors it holds
        (a multiprocessing queue's or lock's in the initializer's arguments)."""
        spawning = _ExecSpawning()
        set_spawning_popen(cast(Any, spawning))
        try:
            boot = Boot(sys.path, *self._site, self._flags, slot_path, config)
            return pickle.dumps(boot, pickle.HIGHEST_PROTOCOL), spawning.fds
        finally:
            set_spawning_popen(None)

    def _start(self, worker_id: int, child_end: Any, slot_path: str, config: dict[str, Any],
               env: dict[str, str], fds: list[int]) -> Any:
        if self.method == "exec":
            return _ExecProcess(child_end.fileno(), {**os.environ, **env, _worker.WORKER_VAR: slot_path}, fds)
        # the mark is in a process's environment from its start only where the
        # launcher takes one; spawn and forkserver workers set it themselves,
        # which reaches what they exec but not what they fork
        extra = {"env": {**env, _worker.WORKER_VAR: slot_path}} if self.method == "loky" else {}
        assert self._context is not None
        process = self._context.Process(
            target=_worker.main,
            args=(child_end, slot_path, config),
            name=f"mpnb-worker-{worker_id}",
            **extra,
        )
        process.start()
        return process

    def close(self) -> None:
        """The pool is done: remove its files, and have spares ready for a next
        pool like it (exec workers only; see :class:`_Spares`)."""
        self._remove_dir()
        if self._exec_envs:
            SPARES.want([self._exec_envs[rank] for rank in sorted(self._exec_envs)])


def _remove_pool_files(directory: str) -> None:
    """Remove the pool's directory (the workers' slots) and the result files its workers left."""
    shutil.rmtree(directory, True)
    remove_results(directory)


_swept = False


def _sweep_dead_pools_once() -> None:
    global _swept
    if not _swept:
        _swept = True
        sweep_dead(tempfile.gettempdir(), POOL_DIR_PREFIX)
        sweep_dead_shared()  # results of a pool whose process was killed


# ---------------------------------------------------------------- spares

#: ``0`` turns spare workers off
SPARES_VAR = "MPNB_SPARES"


class _Spare:
    """An exec worker started ahead: blocked reading its set-up from its pipe."""

    def __init__(self, env: dict[str, str], process: _ExecProcess, conn: Any, slot_path: str):
        self.env = env
        self.cwd = os.getcwd()  # the process's, which it inherited
        self.process = process
        self.conn = conn
        self.slot_path = slot_path

    def end(self) -> None:
        """Close its pipe (it then exits by itself: see :func:`mpnb._worker.boot`),
        kill it if it has not within a second, and remove its slot."""
        try:
            self.conn.close()
        except OSError:
            pass
        self.process.join(1.0)
        if self.process.exitcode is None:
            _worker.kill_tree(self.process.pid)
            self.process.join(1.0)
        self.process.close()
        try:
            os.unlink(self.slot_path)
        except OSError:
            pass


class _Spares:
    """Exec workers started ahead for the next pool.

    A notebook makes one pool after another (``with mpnb.Pool() as pool:``
    in cell after cell), mostly with the same options.  When a pool of exec
    workers closes, as many interpreters as it had workers are started in
    the background with the same environment, and wait for a set-up; the
    next pool whose workers' environment (variables, working directory) is
    the same adopts them instead of starting interpreters, so its first
    result comes in milliseconds, not tens.  Anything else (another pool
    size, whose thread caps differ; a changed variable; descriptors its
    initializer must pass at the start) starts workers as before.

    Only the last closed pool's kind is kept: asking for others ends the
    spares that no longer match.  A spare holds nothing of any pool: it has
    imported mpnb's worker module, no task, no initializer.  It ends when
    its pipe closes: at the end of this process, however it ends, or
    :meth:`end_all`; a process forked from this one closes its copies of the
    pipes.  They are started by one thread of their own, which lives as long
    as the process: ``PR_SET_PDEATHSIG`` counts from the thread that starts
    a process, and an adopted spare must not die with a pool's engine thread.
    ``MPNB_SPARES=0`` turns them off.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: list[_Spare] = []
        self._wanted: list[dict[str, str]] = []
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._dir: str | None = None
        self._count = 0
        self._closed = False
        self._starting = False

    def take(self, env: dict[str, str]) -> _Spare | None:
        """A live spare started with ``env``, no longer counted as a spare.

        One still being started is waited for (for at most a second): the
        next pool may come right after the last closed, and a spare whose
        process exists, even if its interpreter is still booting, is sooner
        ready than a new one."""
        cwd = os.getcwd()
        deadline = time.monotonic() + 1.0
        with self._cond:
            while True:
                for n, spare in enumerate(self._ready):
                    if spare.env == env and spare.cwd == cwd and spare.process.exitcode is None:
                        del self._ready[n]
                        if env in self._wanted:  # not made again
                            self._wanted.remove(env)
                        return spare
                pending = self._wanted.count(env) > sum(spare.env == env for spare in self._ready)
                left = deadline - time.monotonic()
                if not pending or self._closed or left <= 0:
                    return None
                self._cond.wait(left)

    def want(self, envs: list[dict[str, str]]) -> None:
        """Spares with these environments (one each), and no others."""
        if os.environ.get(SPARES_VAR) == "0" or os.name != "posix":
            return
        with self._cond:
            if self._closed or sys.is_finalizing():
                return
            self._generation += 1
            self._wanted = list(envs)
            keep, surplus = [], []
            unmatched = list(envs)
            for spare in self._ready:
                if spare.env in unmatched and spare.process.exitcode is None:
                    unmatched.remove(spare.env)
                    keep.append(spare)
                else:
                    surplus.append(spare)
            self._ready = keep
            if unmatched and self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="mpnb-spares", daemon=True)
                self._thread.start()
                self._stop_at_exit()
            self._cond.notify_all()
        for spare in surplus:
            spare.end()

    def pids(self) -> list[int]:
        with self._cond:
            return [spare.process.pid for spare in self._ready]

    def _stop_at_exit(self) -> None:
        """Registered once the thread runs, so after the engines' own exit hooks
        (an engine starts before a pool closes), and so run before them: the
        pools the interpreter's exit shuts down then ask for no spares."""
        exits.at_exit(self.end_all, closing=True)
        exits.before_threads_join(self.end_all, closing=True)  # as the engines' (mpnb.backends.base)

    def end_all(self, closing: bool = False) -> None:
        """End every spare (and, ``closing``, make no more and remove their
        directory: at exit)."""
        with self._cond:
            self._generation += 1
            self._closed = self._closed or closing
            ready, self._ready, self._wanted = self._ready, [], []
            thread = self._thread
            self._cond.notify_all()
        for spare in ready:
            spare.end()
        if thread is not threading.current_thread():
            with self._cond:  # a spare being started now is ended by _serve: wait for that
                deadline = time.monotonic() + 5.0
                while self._starting and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                if not (self._starting or self._ready or self._wanted) and self._dir is not None:
                    # nothing uses the directory of their slots now (one made later makes it again)
                    shutil.rmtree(self._dir, True)
                    self._dir = None
        if closing and thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def _missing(self) -> dict[str, str] | None:
        unmatched = list(self._wanted)
        for spare in self._ready:
            if spare.env in unmatched:
                unmatched.remove(spare.env)
        return unmatched[0] if unmatched and not self._closed else None

    def _serve(self) -> None:
        while True:
            with self._cond:
                env = self._missing()
                while env is None:
                    if self._closed:
                        return
                    self._cond.wait()
                    env = self._missing()
                generation = self._generation
                self._starting = True
            try:
                spare: _Spare | None = self._start(env)
            except Exception:  # no spare: the next pool starts its workers itself
                spare = None
            with self._cond:
                keep = spare is not None and self._generation == generation and not self._closed
                if keep:
                    self._ready.append(spare)  # type: ignore[arg-type]
                elif spare is None and self._generation == generation:
                    self._wanted = []
                self._cond.notify_all()  # a pool may be waiting for it (take)
            if spare is not None and not keep:
                spare.end()  # asked for others (or none) meanwhile
            with self._cond:
                self._starting = False
                self._cond.notify_all()

    def _start(self, env: dict[str, str]) -> _Spare:
        if self._dir is None:
            # the owner's pid in the name: the next pool removes it if this process was killed
            self._dir = tempfile.mkdtemp(prefix=f"{POOL_DIR_PREFIX}{os.getpid()}-")
        self._count += 1
        slot_path = os.path.join(self._dir, f"worker-spare{self._count}")
        with open(slot_path, "wb") as f:
            f.write(SLOT.pack(-1, -1, 0.0, 0, -1))
        with _STARTING:
            parent_end, child_end = Pipe(duplex=True)
            try:
                process = _ExecProcess(child_end.fileno(), {**env, _worker.WORKER_VAR: slot_path}, [])
            except BaseException:
                parent_end.close()
                os.unlink(slot_path)
                raise
            finally:
                child_end.close()
        return _Spare(env, process, parent_end, slot_path)

    def _close_in_forked_child(self) -> None:
        # a forked copy must not hold the spares' pipes open past this process;
        # the spares are not its children, and the thread was not copied
        for spare in self._ready:
            for close in (spare.conn.close, spare.process.close):
                try:
                    close()
                except OSError:
                    pass
        self.__init__()  # type: ignore[misc]


SPARES = _Spares()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=SPARES._close_in_forked_child)


def spare_pids() -> list[int]:
    """Process ids of the spare workers waiting for a pool (see :class:`_Spares`)."""
    return SPARES.pids()


def end_spares() -> None:
    """End the spare workers now (a next pool starts its own)."""
    SPARES.end_all()
