"""Large numpy arrays go to the workers through shared memory, once per call.

Pickling a 200 MB array into every task that uses it costs a copy per task:
in the pipe, in the worker, and the time to make them.  Instead, when the
pool pickles a call's arguments, each numpy array of at least
:data:`SHARE_BYTES` is written once into a file in ``/dev/shm`` (the temp
directory where there is none) and pickled as a reference to that file::

    caller (pickling a chunk)              worker (unpickling it)
    -------------------------              ----------------------
    array seen first time in this call:    attach(path, dtype, shape, order)
      write it to mpnb-shared-<pid>-...      mmap the file read-only
      keep it mapped, remember its id        -> a read-only ndarray on the pages
    seen again: the same reference         the same path again in this batch of
                                             chunks: the same mapping
    call ends (or is interrupted, or is    the worker forgets its mappings when
    garbage-collected): unlink the file      it runs out of queued chunks

The workers' arrays are read-only views of the one copy; a task that writes
to one gets numpy's "assignment destination is read-only" error.  Arrays of
objects and ndarray subclasses are pickled as before, as are arrays below the
threshold.  What workers return is pickled as usual (a copy).

A file outlives its call only if the notebook process is killed; the next
process that shares an array removes files of processes that no longer exist.
"""

from __future__ import annotations

import itertools
import mmap
import os
import shutil
import sys
import tempfile
import weakref
from typing import Any, Literal

__all__ = ["SHARE_BYTES", "backing_file"]

#: arrays of at least this many bytes are shared rather than pickled per task
SHARE_BYTES = int(os.environ.get("MPNB_SHARE_BYTES", 1 << 20))

#: an array's memory layout, as numpy names it
Order = Literal["C", "F"]

_PREFIX = "mpnb-shared-"
_names = itertools.count()
_swept = False


def _directory() -> str:
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def _is_shareable(obj: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return (
        numpy is not None
        and type(obj) is numpy.ndarray
        and obj.nbytes >= SHARE_BYTES
        and not obj.dtype.hasobject
    )


class SharedArrays:
    """The arrays one call shares: written on first sight, unlinked by :meth:`release`."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple] = {}
        # the arrays are kept alive so that an id is never reused in this call
        self._arrays: list[Any] = []
        self._files: list[tuple[str, mmap.mmap]] = []
        self._finalizer = weakref.finalize(self, _unlink, self._files)
        _sweep_dead_once()

    def reduce(self, array: Any) -> tuple | None:
        """The pickle reduction of ``array``: a reference to its shared copy,
        or ``None`` when it is pickled as usual."""
        if not _is_shareable(array):
            return None
        args = self._by_id.get(id(array))
        if args is None:
            args = self._by_id[id(array)] = self._write(array)
            self._arrays.append(array)
        return attach, args

    def _write(self, array: Any) -> tuple:
        import numpy

        order: Order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
        path = os.path.join(_directory(), f"{_PREFIX}{os.getpid()}-{next(_names)}-{os.urandom(4).hex()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, array.nbytes)
            buffer = mmap.mmap(fd, array.nbytes)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        # kept mapped until release, so its pages count in this process's memory
        self._files.append((path, buffer))
        numpy.ndarray(array.shape, array.dtype, buffer=buffer, order=order)[...] = array
        return path, array.dtype, array.shape, order

    def release(self) -> None:
        """Unlink the files; workers' mappings stay valid until they drop them."""
        self._finalizer()


def _unlink(files: list[tuple[str, mmap.mmap]]) -> None:
    for path, buffer in files:
        try:
            os.unlink(path)
        except OSError:
            pass
        try:
            buffer.close()
        except BufferError:  # a view of it is still alive here; it unmaps with that view
            pass
    files.clear()


def _sweep_dead_once() -> None:
    """Remove shared files of processes that ended without releasing them."""
    global _swept
    if _swept:
        return
    _swept = True
    sweep_dead(_directory(), _PREFIX)


def sweep_dead(directory: str, prefix: str) -> None:
    """Remove what dead processes left in ``directory``: every file or
    directory named ``<prefix><pid>-...`` whose process no longer exists.

    mpnb names what a process must remove at exit this way (shared arrays,
    pools' worker slots, kernels' cell modules), so that whoever comes next
    removes it when that process was killed first.
    """
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------ worker side

# path -> the whole array mapped from it, while this worker has queued chunks
_attached: dict[str, Any] = {}


def attach(path: str, dtype: Any, shape: tuple, order: Order) -> Any:
    """Map a shared array read-only (called by unpickling, in a worker)."""
    array = _attached.get(path)
    if array is None:
        import numpy

        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        array = _attached[path] = numpy.ndarray(shape, dtype, buffer=buffer, order=order)
    return array


def forget() -> None:
    """Drop this worker's mappings; each unmaps when the last task's view of it is freed."""
    _attached.clear()


def backing_file(array: Any) -> str | None:
    """The shared file ``array`` (or the array it is a view of) is mapped from
    in this worker, or ``None`` when it is an ordinary array."""
    base = array
    while getattr(base, "base", None) is not None and not isinstance(base.base, mmap.mmap):
        base = base.base
    for path, attached in _attached.items():
        if attached is base:
            return path
    return None
