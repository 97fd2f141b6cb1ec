"""Large numpy arrays go to the workers through shared memory, once per call.

Pickling a 200 MB array into every task that uses it costs a copy per task:
in the pipe, in the worker, and the time to make them.  Instead, when the
pool pickles a call's arguments, each numpy array of at least
:data:`SHARE_BYTES` is written once into a file in ``/dev/shm`` (the temp
directory where there is none) and pickled as a reference to that file::

    caller (pickling a chunk)              worker (unpickling it)
    -------------------------              ----------------------
    array seen first time in this call:    attach(path, dtype, shape, order)
      write(2) it to mpnb-shared-<pid>-...   mmap the file read-only
      remember its id                        -> a read-only ndarray on the pages
    seen again: the same reference         the same path again in this batch of
                                             chunks: the same mapping
    call ends (or is interrupted, or is    the worker forgets its mappings when
    garbage-collected): unlink the file      it runs out of queued chunks

The workers' arrays are read-only views of the one copy; a task that writes
to one gets numpy's "assignment destination is read-only" error.  Arrays of
objects and ndarray subclasses are pickled as before, as are arrays below the
threshold.  pandas frames share their numeric blocks the same way: pickling a
frame pickles its blocks' arrays.

:func:`shared_array` makes an array that lives in such a file from the start:
tasks get it (or any view of it) mapped writable, so what they write is in the
notebook's array, with no copy back.  Its file is unlinked when the array is
freed, or at exit.

Results come back the same way, from a local worker only (a dask worker's go
by value)::

    worker (packing a task's value)        parent (loading the record)
    -------------------------------        ---------------------------
    pickle protocol 5: each large buffer   receive_result: map each file
      (a numpy array's, a frame block's)     copy-on-write, unlink it at once
      written to mpnb-shared-<pool>-         -> pickle.loads(data, buffers=maps)
      worker-<n>-<k>, out of band          the value's arrays are writable and
                                             cost no copy

A worker that dies before its record is loaded leaves its files: they are
removed with the worker (:func:`remove_results`), and with the pool.

A file outlives its pool only if the notebook process is killed; the next
process that shares an array or starts a pool removes files of processes
that no longer exist.
"""

from __future__ import annotations

import itertools
import mmap
import os
import pickle
import shutil
import sys
import tempfile
from typing import Any, Literal

from mpnb import exits

__all__ = ["SHARE_BYTES", "NoRoomToShare", "backing_file", "shared_array"]

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


def _new_path() -> str:
    """A new file name in the shared directory, owned by this process."""
    return os.path.join(_directory(), f"{_PREFIX}{os.getpid()}-{next(_names)}-{os.urandom(4).hex()}")


def _is_shareable(obj: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return (
        numpy is not None
        and type(obj) is numpy.ndarray
        and obj.nbytes >= SHARE_BYTES
        and not obj.dtype.hasobject
    )


class NoRoomToShare(OSError):
    """A large array argument could not be written to shared memory (a full
    ``/dev/shm``): the error of each task that has it, as it is."""


class SharedArrays:
    """The arrays one call shares: written on first sight, unlinked by :meth:`release`."""

    def __init__(self) -> None:
        # by array id: its reference's arguments, or why it could not be written
        self._by_id: dict[int, tuple | NoRoomToShare] = {}
        # the arrays are kept alive so that an id is never reused in this call
        self._arrays: list[Any] = []
        self._files: list[str] = []
        self._finalizer = exits.finalize(self, _unlink_all_paths, self._files)
        _sweep_dead_once()

    def reduce(self, array: Any) -> tuple | None:
        """The pickle reduction of ``array``: a reference to its shared copy,
        or ``None`` when it is pickled as usual."""
        placed = _in_shared_array(array)
        if placed is not None:  # any size: what tasks write must land in it
            self._arrays.append(array)
            return attach_writable, placed
        if not _is_shareable(array):
            return None
        args = self._by_id.get(id(array))
        if args is None:
            self._arrays.append(array)
            try:
                args = self._write(array)
            except NoRoomToShare as exc:  # every task that has it fails alike, with no second try
                args = exc
            self._by_id[id(array)] = args
        if isinstance(args, NoRoomToShare):
            raise NoRoomToShare(*args.args)  # a new one: each task's error has its own traceback
        return attach, args

    def _write(self, array: Any) -> tuple:
        order: Order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
        path = _new_path()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._files.append(path)
        written = False
        try:
            # written, not mapped and copied into: a write fills each page of
            # /dev/shm once, where a mapping has it zeroed first and faults on
            # every page (200 MB: 60 ms against 140 ms), and a full /dev/shm
            # fails the write instead of killing this process with SIGBUS
            for block in _blocks(array, order):
                _write_all(fd, block)
            written = True
        except OSError as exc:
            raise NoRoomToShare(
                exc.errno,
                f"sharing an array of shape {array.shape} and dtype {array.dtype} with the workers needs "
                f"{array.nbytes:,} bytes in {_directory()} ({exc.strerror}); free some, give the machine (or "
                f"container) a larger /dev/shm, or send large arrays in the pipe instead with MPNB_SHARE_BYTES "
                f"set above {array.nbytes}") from None
        finally:
            os.close(fd)
            if not written:  # what it holds of /dev/shm is freed at once
                _unlink_path(path)
                self._files.remove(path)
        return path, array.dtype, array.shape, order

    def release(self) -> None:
        """Unlink the files; workers' mappings stay valid until they drop them."""
        self._finalizer()


def _unlink_all_paths(paths: list[str]) -> None:
    for path in paths:
        _unlink_path(path)
    paths.clear()


def _blocks(array: Any, order: Order) -> Any:
    """``array``'s bytes in ``order``, as buffers to write one after the
    other: itself when it is contiguous, else copies of about 8 MB of rows."""
    import numpy

    if array.flags.c_contiguous or array.flags.f_contiguous:
        yield array.reshape(-1, order=order).view(numpy.uint8)  # a view, not a copy
        return
    rows = max(1, (8 << 20) // max(1, array[:1].nbytes))
    for start in range(0, len(array), rows):
        yield numpy.ascontiguousarray(array[start:start + rows]).reshape(-1).view(numpy.uint8)


def _write_all(fd: int, data: Any) -> None:
    """Write all of ``data`` (a bytes-like object) to ``fd``."""
    view = memoryview(data)
    done = 0
    while done < view.nbytes:
        done += os.write(fd, view[done:done + (1 << 30)])


def _sweep_dead_once() -> None:
    """Remove shared files of processes that ended without releasing them."""
    global _swept
    if _swept:
        return
    sweep_dead_shared()


def sweep_dead_shared() -> None:
    """Remove the shared files (arrays, results) of processes that no longer exist."""
    global _swept
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


# ------------------------------------------------------------ shared_array


class _SharedMap(mmap.mmap):
    """The mapping of a :func:`shared_array`'s file, which knows its path."""

    path: str
    address: int  # where the array over the whole file starts in memory


def shared_array(shape: Any, dtype: Any = float) -> Any:
    """A numpy array of zeros in shared memory, for tasks to write into in place.

    Give it (or any view of it, such as ``out[i]`` or ``out[:, 2:5]``) to a
    task of a local pool: the task gets the same memory, writable, so what it
    writes is in this array when the task ends, with nothing copied back.
    It is an ordinary ``numpy.ndarray`` here.  Its file is removed when the
    array and its views are freed, or when the interpreter exits.  Tasks
    writing to the same elements at once race, as threads would.  A dask
    pool's workers get a copy instead (they may run on other machines).
    """
    import numpy

    dtype = numpy.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(f"mpnb.shared_array(dtype={dtype}): an array of Python objects cannot be shared "
                        f"between processes; use a numeric, bool, string or structured dtype of those")
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    nbytes = max(1, int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize)
    _sweep_dead_once()
    path = _new_path()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _reserve(fd, nbytes, f"mpnb.shared_array({shape}, {dtype})")
        buffer = _SharedMap(fd, nbytes)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    buffer.path = path
    exits.finalize(buffer, _unlink_path, path)  # when the last view goes, or at exit (here only)
    array = numpy.ndarray(shape, dtype, buffer=buffer)
    buffer.address = array.__array_interface__["data"][0]
    return array


def _reserve(fd: int, nbytes: int, what: str) -> None:
    """Give the file its pages now: a full /dev/shm then fails here, with a
    sentence, rather than with SIGBUS when a page is first written."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        raise OSError(exc.errno, f"{what} needs {nbytes:,} bytes in {_directory()}, which has not so "
                      f"much free ({exc.strerror}); free some, or give the machine (or container) a "
                      f"larger /dev/shm") from None


def _unlink_path(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _in_shared_array(array: Any) -> tuple | None:
    """Where ``array`` lies in a :func:`shared_array`'s file, as the arguments
    of :func:`attach_writable`, or None when it is not in one."""
    numpy = sys.modules.get("numpy")
    if numpy is None or type(array) is not numpy.ndarray:
        return None
    base = array
    while isinstance(base, numpy.ndarray):
        base = base.base
    if not isinstance(base, _SharedMap):
        return None
    offset = array.__array_interface__["data"][0] - base.address
    return base.path, len(base), offset, array.dtype, array.shape, array.strides


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


def attach_writable(path: str, size: int, offset: int, dtype: Any, shape: tuple, strides: tuple) -> Any:
    """Map a :func:`shared_array` writable and return the view a task was given."""
    whole = _attached.get(path)
    if whole is None:
        import numpy

        with open(path, "r+b") as f:
            buffer = mmap.mmap(f.fileno(), size)
        whole = _attached[path] = numpy.ndarray((size,), numpy.uint8, buffer=buffer)
    return type(whole)(shape, dtype, buffer=whole, offset=offset, strides=strides)


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


# ------------------------------------------------------------ results

_results = itertools.count()


def results_prefix(marker: str) -> str | None:
    """Where a local worker puts its results' buffers, as a file name prefix,
    or None where there is no ``/dev/shm`` (a file on disk would cost more
    than the pipe).

    ``marker`` is the worker's slot (``<temp>/mpnb-pool-<pid>-<x>/worker-3``)
    or its pool's directory (``<temp>/mpnb-pool-<pid>-<x>``): the prefix of one
    worker's files, or of all the pool's.  The owner's pid comes first, so
    :func:`sweep_dead` removes them once the pool's process is gone.
    """
    if _directory() != "/dev/shm":
        return None
    directory, name = os.path.split(marker)
    if name.startswith("worker-"):
        pool = os.path.basename(directory).split("-", 2)[2]
        return os.path.join(_directory(), f"{_PREFIX}{pool}-{name}-")
    return os.path.join(_directory(), f"{_PREFIX}{name.split('-', 2)[2]}-")


def remove_results(marker: str) -> None:
    """Remove the result files a worker (or a whole pool, by its directory)
    wrote and the parent did not load: it died, or its record was dropped."""
    where = results_prefix(marker)
    if where is None:
        return
    directory, prefix = os.path.split(where)
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        _unlink_path(os.path.join(directory, name))


class SharedResult:
    """A task's value pickled with its large buffers left out, in files
    (worker side).  Loading it in the parent maps the files and unlinks
    them at once, whatever becomes of the record after."""

    __slots__ = ("data", "files")

    def __init__(self, data: bytes, files: list[tuple[str, int]]):
        self.data, self.files = data, files

    def __reduce__(self):
        return (receive_result, (self.data, self.files))


def dump_result(value: Any, prefix: str) -> Any:
    """``value`` pickled (as bytes), or a :class:`SharedResult` when it holds
    buffers of at least :data:`SHARE_BYTES`: each goes into a file named
    ``prefix<n>``, and the pickle refers to it out of band."""
    files: list[tuple[str, int]] = []

    def place(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: in the pickle
            return True
        if raw.nbytes < SHARE_BYTES:
            return True
        written = _write_result(raw, f"{prefix}{next(_results)}")
        if written is None:
            return True  # no room in /dev/shm: the pipe it is
        files.append(written)
        return False

    try:
        try:
            data = pickle.dumps(value, 5, buffer_callback=place)
        except Exception:  # not importable here: cloudpickle, as _task.dumps does
            _unlink_all(files)
            import cloudpickle

            data = cloudpickle.dumps(value, 5, buffer_callback=place)
    except BaseException:
        _unlink_all(files)
        raise
    return SharedResult(data, files) if files else data


def _write_result(raw: memoryview, path: str) -> tuple[str, int] | None:
    """Write a buffer into a new file; None when there is no room for it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, raw)
    except OSError:
        os.unlink(path)
        return None
    finally:
        os.close(fd)
    return path, raw.nbytes


def _unlink_all(files: list[tuple[str, int]]) -> None:
    _unlink_all_paths([path for path, _ in files])
    files.clear()


class ReceivedResult:
    """A :class:`SharedResult` as the parent received it: the pickle and its
    buffers mapped copy-on-write (the files are gone already), or the error
    that stopped mapping them."""

    __slots__ = ("data", "buffers", "error")

    def __init__(self, data: bytes, buffers: list[mmap.mmap], error: BaseException | None):
        self.data, self.buffers, self.error = data, buffers, error

    def load(self) -> Any:
        if self.error is not None:
            raise self.error
        return pickle.loads(self.data, buffers=self.buffers)


def receive_result(data: bytes, files: list[tuple[str, int]]) -> ReceivedResult:
    """Map a result's files and unlink them (parent side, while its record
    is unpickled).  Private copy-on-write mappings: the arrays are writable,
    their pages are the file's until written, and nothing is left on disk."""
    buffers: list[mmap.mmap] = []
    error = None
    for path, size in files:
        try:
            if error is None:
                with open(path, "rb") as f:
                    buffers.append(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY))
        except OSError as exc:
            error = exc
        finally:
            _unlink_path(path)
    return ReceivedResult(data, buffers, error)
