"""Worker processes on this machine, each a fresh Python interpreter.

Every start method starts a new interpreter (never a bare ``fork`` of the
kernel, whose threads and ZMQ sockets must not be copied), hands it the
parent's ``sys.path`` and sets environment variables before anything is
imported:

- ``"exec"`` (the default on POSIX): ``subprocess`` starts
  ``python -c "from mpnb._worker import boot; ..."`` (vfork+exec), which
  imports only the worker module and reads its setup from the pipe.  It is
  the fastest to start: no launcher module to import, nothing to unpickle
  but the setup.
- ``"loky"``: loky's process launcher (fork+exec), as loky's executors use.
- ``"spawn"``, ``"forkserver"``: the standard library's.

Each worker gets one end of a private duplex pipe and a 24-byte shared-memory
slot (a file in a private ``0700`` directory) where it writes which task it
is running.
"""

from __future__ import annotations

import mmap
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from multiprocessing import Pipe
from typing import Any

from mpnb import _worker


class WorkerHandle:
    """The parent's side of one worker process."""

    def __init__(self, worker_id: int, process, conn, slot_path: str):
        self.worker_id = worker_id
        self.process = process
        self.conn = conn
        self.slot_path = slot_path
        fd = os.open(slot_path, os.O_RDONLY)
        try:
            self._slot = mmap.mmap(fd, _worker.SLOT.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def current(self) -> tuple[int, int, float]:
        """``(chunk seq, position, start time)`` of the task running now.

        Written by the worker before each task; ``seq`` is -1 before the
        first one.
        """
        return _worker.SLOT.unpack_from(self._slot, 0)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

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
        for path in (self.slot_path, self.slot_path + ".fault"):
            try:
                os.unlink(path)
            except OSError:
                pass


START_METHODS = ("exec", "loky", "spawn", "forkserver")
DEFAULT_METHOD = "exec" if os.name == "posix" else "loky"

# mpnb's own directory first, in case only the parent's sys.path finds it;
# boot() then puts the parent's whole sys.path in place
_HOME = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = f"import sys; sys.path.insert(0, {_HOME!r}); " + "from mpnb._worker import boot; boot({fd})"


class _ExecProcess:
    """A worker started by ``subprocess``, with the ``Process`` attributes the
    handle uses; its sentinel is a pipe the child holds open until it ends."""

    def __init__(self, conn_fd: int, env: dict[str, str]):
        sentinel, child_sentinel = os.pipe()
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-c", _BOOT.format(fd=conn_fd)],
                env=env, pass_fds=(conn_fd, child_sentinel), close_fds=True,
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


class LocalBackend:
    """Starts worker processes on this machine.

    ``method`` is how: ``"exec"`` (the default on POSIX), ``"loky"``, or
    the standard library's ``"spawn"`` or ``"forkserver"`` (see the module
    docstring).  Never ``fork``: a kernel's threads and sockets must not be
    copied.

    ``env`` is set in each worker before it imports anything but mpnb's
    worker module (thread caps, the nesting depth); ``config`` goes to
    :func:`mpnb._worker.main`.
    """

    def __init__(self, env: dict[str, str], config: dict[str, Any], method: str = DEFAULT_METHOD):
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
            import multiprocessing

            self._context = multiprocessing.get_context(method)
        self.method = method
        self._env = dict(env)
        self._config = dict(config, env=dict(env))
        self._dir = tempfile.mkdtemp(prefix="mpnb-pool-")  # mode 0700
        self._lock = threading.Lock()

    def start_worker(self, worker_id: int) -> WorkerHandle:
        slot_path = os.path.join(self._dir, f"worker-{worker_id}")
        with open(slot_path, "wb") as f:
            f.write(_worker.SLOT.pack(-1, -1, 0.0))
        parent_end, child_end = Pipe(duplex=True)
        if self.method == "exec":
            with self._lock:
                process = _ExecProcess(child_end.fileno(), {**os.environ, **self._env})
            child_end.close()
            parent_end.send_bytes(pickle.dumps((sys.path, slot_path, self._config), pickle.HIGHEST_PROTOCOL))
            return WorkerHandle(worker_id, process, parent_end, slot_path)
        extra = {"env": self._env} if self.method == "loky" else {}
        process = self._context.Process(
            target=_worker.main,
            args=(child_end, slot_path, self._config),
            name=f"mpnb-worker-{worker_id}",
            **extra,
        )
        with self._lock:
            process.start()
        child_end.close()
        return WorkerHandle(worker_id, process, parent_end, slot_path)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
