"""The wire between the local engine and its worker processes.

Every message is pickled into one ``send_bytes``; every field has a name
here, and both ends use these names, never positions.  On the wire a
:data:`Run` or :data:`Record` is a plain tuple, made with ``tuple(run)`` and
named again with ``Run._make`` on arrival: a namedtuple pickles by a call
of Python code per record, several times slower.  This module imports
nothing heavy: it is loaded by every worker at start-up.

::

    engine                                           worker
    ------                                           ------
    (RUNS, [Run, ...])  ------------------------->   run each chunk in turn
    (LOAD, call, fn)    ------------------------->   load a call's function (idle)
    STOP (None)         ------------------------->   leave the serve loop
    Boot (exec workers) ------------------------->   set up, then serve
                        <-------------------------   (HELLO, pid, monotonic time)
                        <-------------------------   (INIT_FAILED, pid, Failure)
                        <-------------------------   (RECORDS, [Record, ...])
                        <-------------------------   (PROGRESS, Progress)

Besides messages, a worker writes the position of each task into its
shared-memory slot (:data:`SLOT`) before it runs, and the chunk's seq and the
time with it whenever it reads the clock: the engine reads the slot for
timeouts and the live view, and after a crash to name the task that was
running.
"""

from __future__ import annotations

import os
import struct
from collections import namedtuple

# Mode and Kind are plain ints, not enum.IntEnum: enum adds 2 ms to every
# worker's start, and an IntEnum member pickles by a call of Python code


class Mode:
    """How a task's item becomes a call of its function (an int)."""

    ARG = 0  #: ``fn(item)``: map and imap over one iterable
    STAR = 1  #: ``fn(*item)``: starmap, and map over several iterables
    KWARGS = 2  #: ``fn(*item[0], **item[1])``: submit and apply


class Kind:
    """The first field of every message (an int)."""

    RUNS = 1  #: engine -> worker: chunks to run, of one call
    HELLO = 2  #: worker -> engine: ready to run tasks
    INIT_FAILED = 3  #: worker -> engine: its set-up (the initializer) raised
    RECORDS = 4  #: worker -> engine: outcomes of tasks
    PROGRESS = 5  #: worker -> engine: how far the running task is (a :data:`Progress`)
    LOAD = 6  #: engine -> worker: ``(LOAD, call, fn_data)``, a call's function to load while idle


#: what the engine sends to make a worker leave its loop
STOP = None

#: one chunk to run.  ``call`` keys the worker's function cache; ``fn_data``
#: is the pickled function, or None when the worker has it cached (the engine
#: mirrors that cache, :data:`FUNCTION_CACHE_SIZE` entries, least recently
#: used first out); ``items_data`` the pickled list of items; ``flush_each``
#: asks for a record after every task, each run alone (the call has a
#: timeout, or the chunk runs carefully after a crash in a batch);
#: ``mode`` is one of :class:`Mode`'s ints.
Run = namedtuple("Run", "seq count call fn_data items_data flush_each mode")

#: outcomes of the tasks of chunk ``seq`` from position ``first`` on:
#: ``values`` (a list, or a :class:`mpnb._task.PackedValues`), ``failures``
#: and ``outputs`` by position in the chunk, ``starts``: the start times of
#: the tasks that were timed, by position (always the first of the record;
#: every one while tasks are slow; the tasks between two timed ones ran
#: evenly between their times), the time the last one ended (the worker's
#: ``time.monotonic``), and ``final`` when the chunk has no more tasks to report.
Record = namedtuple("Record", "seq first values failures outputs starts end final")

#: ``mpnb.report`` from the task at ``position`` of chunk ``seq``: ``done``
#: of ``total`` (floats; total may be None) and a ``note`` (a str or None).
#: At most about ten a second leave a worker (``mpnb.reporting.INTERVAL``).
Progress = namedtuple("Progress", "seq position done total note")

#: what an exec worker reads first from its pipe (see
#: :func:`mpnb._worker.boot`): the parent's ``sys.path``; the site
#: directories whose ``.pth`` files the parent ran and the top-level names
#: their finders find (None: unknown, run them at the start); the parent's
#: interpreter flags as ``multiprocessing`` passes them to a process it
#: spawns; the worker's slot file and its configuration.
Boot = namedtuple("Boot", "path site_dirs site_names flags slot_path config")

#: (chunk seq, position in chunk, time, batch end, batch task) of the task
#: running now.  The position is written before every task; the seq and time
#: only before the tasks the worker times (see :data:`STRIDE_SECONDS`), so
#: the time is when the task started or a little before: exact for a slow
#: task, and for every task of a call with a timeout.  Between two timed
#: tasks of a fast chunk the worker runs the tasks in one C call (``map``):
#: then the position is the batch's first task and the batch end its last
#: + 1, else the batch end is 0.  A crash inside a batch names no task: its
#: tasks run again one by one (``careful``), which finds the culprit.  While
#: a batch runs, a thread of the worker writes the task it has reached into
#: the batch task, every :data:`BATCH_LOOK_SECONDS`, for the live view.
SLOT = struct.Struct("<qqdqq")

#: how often a worker looks which task of a batch runs (a slow one among fast ones)
BATCH_LOOK_SECONDS = 0.1

#: a worker reads the clock about this often: before every task while tasks
#: take longer than this, else every as many tasks as fit in it by the pace
#: since its last reading (at most twice as many as the time before) ...
STRIDE_SECONDS = 0.05
#: ... down to once every this many tasks
MAX_STRIDE = 1024

#: how many shipped functions a worker keeps
FUNCTION_CACHE_SIZE = 8

#: the records of a message's chunks that ended wait for its last chunk,
#: but no longer than until one is made this long after the last send
FLUSH_SECONDS = 0.2
#: a chunk that has run this long sends the records it has so far, and again
#: after as long (each send wakes the engine, which takes a core from a busy
#: worker for a moment: every 0.2 s, it cost a map of 1 ms tasks some 0.3%)
PARTIAL_SECONDS = 0.5


# ---------------------------------------------------------------- framing

#: a message's length before it, as ``multiprocessing.connection`` frames
#: them (so that the parent's end is a ``Connection``): 4 bytes, or -1 and 8
SIZE = struct.Struct("!i")
BIG_SIZE = struct.Struct("!Q")
#: what the parent reads at once from a worker's pipe (a pipe's usual capacity)
READ_AT_ONCE = 1 << 16


def read_frames(fd: int) -> list[bytes | bytearray]:
    """The messages waiting on the pipe ``fd``, which must be readable:
    all that is there, in one read where ``Connection.recv_bytes`` takes two
    a message and a poll to see whether another waits.  A message only
    partly there is being written: it is read to its end.  ``EOFError`` at
    the end of the pipe."""
    data = os.read(fd, READ_AT_ONCE)
    if not data:
        raise EOFError
    frames: list[bytes | bytearray] = []
    at = 0
    while at < len(data):
        if len(data) - at < 4:
            data += _read_exactly(fd, 4 - (len(data) - at))
        (n,) = SIZE.unpack_from(data, at)
        at += 4
        if n == -1:
            if len(data) - at < 8:
                data += _read_exactly(fd, 8 - (len(data) - at))
            (n,) = BIG_SIZE.unpack_from(data, at)
            at += 8
        if at + n <= len(data):
            frames.append(data[at:at + n])
            at += n
            continue
        message = bytearray(n)  # the rest is on its way: read into place, not joined
        have = len(data) - at
        message[:have] = memoryview(data)[at:]
        _read_into(fd, message, have)
        frames.append(message)
        break
    return frames


def write_frame(fd: int, data: bytes) -> None:
    """Send one message on the pipe ``fd``, framed as ``Connection.send_bytes``
    frames it, in one write when it is small (as that does, without its layers)."""
    n = len(data)
    header = SIZE.pack(n) if n <= 0x7FFFFFFF else SIZE.pack(-1) + BIG_SIZE.pack(n)
    if n <= 16384:
        _write_all(fd, memoryview(header + data))
    else:
        _write_all(fd, memoryview(header))
        _write_all(fd, memoryview(data))


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, n: int) -> bytes:
    buffer = bytearray(n)
    _read_into(fd, buffer, 0)
    return bytes(buffer)


def _read_into(fd: int, buffer: bytearray, at: int) -> None:
    view = memoryview(buffer)
    while at < len(buffer):
        got = os.readv(fd, [view[at:]])
        if not got:
            raise EOFError
        at += got
