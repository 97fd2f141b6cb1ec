"""A kernel's shutdown that the pools it used do not hold up.

On a shutdown or restart request ipykernel SIGTERMs the processes of its own
process group, then waits for them in growing sleeps (0.01 s up to 10 s)
before it SIGKILLs them.  A resource tracker ignores SIGTERM: multiprocessing
starts one for a spawn or forkserver Pool, queue or ``SharedMemory``, and
loky (joblib) its own.  A tracker ends only when the last process holding
its pipe is gone, the kernel among them.  So a kernel that used such a pool
outlives the client's patience: jupyter_client SIGTERMs it after half its
``shutdown_wait_time`` (2.5 s of the default 5), the kernel's exit hooks never
run, and the forkserver's directory stays in the temp directory.

With ``%load_ext mpnb`` the kernel's ``do_shutdown`` (:func:`install`) first
does what Python's exit would do, before ipykernel's SIGTERMs:

1. mpnb's own pools end (their workers lead their own process groups, which
   ipykernel does not signal, and may hold a tracker's pipe);
2. multiprocessing's finalizers of priority 0 and up run, as at exit: pools
   are terminated and joined, their semaphores unlinked and unregistered;
3. the kernel's end of the pipe that keeps each tracker and the forkserver
   alive is pointed at ``/dev/null`` (:func:`mpnb.processes.helpers`), and a
   thread waits to reap each (ipykernel counts a zombie among the children
   it waits for).

The forkserver exits at once; each tracker sees EOF as soon as the processes
ipykernel SIGTERMs are gone, unlinks what is still registered, and exits by
itself: the kernel exits cleanly, its exit hooks run.  Whatever fails here is left to the
shutdown as it was: the hook never stops a kernel from shutting down.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from mpnb import processes
from mpnb.backends.base import kill_all

__all__ = ["install", "uninstall", "release_children"]

_MARK = "__mpnb_shutdown__"


def install(shell: Any) -> None:
    """Run :func:`release_children` first when the kernel shuts down or restarts."""
    kernel = getattr(shell, "kernel", None)
    if kernel is None or not hasattr(kernel, "do_shutdown") or _installed(kernel):
        return
    original = kernel.do_shutdown

    def do_shutdown(restart: bool) -> Any:
        try:
            release_children()
        except Exception:  # the kernel shuts down whatever happens here
            pass
        return original(restart)

    setattr(do_shutdown, _MARK, True)
    kernel.do_shutdown = do_shutdown


def uninstall(shell: Any) -> None:
    kernel = getattr(shell, "kernel", None)
    if kernel is not None and _installed(kernel):
        del kernel.do_shutdown


def _installed(kernel: Any) -> bool:
    return getattr(vars(kernel).get("do_shutdown"), _MARK, False)


def release_children() -> None:
    """End this process's pools as its exit would, and let go of its resource
    trackers' pipes, so that every tracker can see EOF and exit by itself."""
    kill_all()
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util._run_finalizers(0)  # what exit runs first (exitpriority >= 0): pools, semaphores
    for helper in processes.helpers():
        if helper.fd is None:
            continue
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, helper.fd)  # later registrations go nowhere, and start no new tracker
        finally:
            os.close(null)
        if helper.pid is not None:
            # reaped once it exits: ipykernel counts a zombie child as one still to end
            threading.Thread(target=_reap, args=(helper.pid,), name="mpnb-reap", daemon=True).start()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except OSError:  # reaped by someone else, or not our child
        pass
