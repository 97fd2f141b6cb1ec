"""What runs on a dask worker for an mpnb pool.

:func:`run_chunk` is the dask task of one chunk: it runs the tasks with the
same pieces as a local worker (:mod:`mpnb._task`) and returns a
:data:`DaskRecord`: the chunk's one :class:`~mpnb._protocol.Record`, with the
pid and address of the worker that ran it.  :class:`CellModules` is the
worker plugin that brings the notebook's ``%%mppool`` modules to every
worker, present and future; :mod:`mpnb.cells` finds them there.

Unlike a local worker, a dask worker runs several tasks at once on threads
of a process that other clients may share, so output is captured per thread
(:mod:`mpnb._capture`) and no task ever owns the process.
"""

from __future__ import annotations

import os
import threading
from collections import namedtuple
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from mpnb import _capture as capture, cells, reporting
from mpnb._task import caller, dumps, hide_frames_of, load_failure, loads, pack, run_on_thread

hide_frames_of(__file__)

#: what :func:`run_chunk` returns, pickled: the chunk's record (``first`` 0,
#: ``final``; times on the worker's clock) and where it ran
DaskRecord = namedtuple("DaskRecord", "pid address record")


def run_chunk(topic: str, seq: int, count: int, fn_data: bytes, items_data: bytes, mode: int) -> bytes:
    """Run chunk ``seq`` of ``count`` tasks on this dask worker; return its
    :data:`DaskRecord`, pickled.  ``mode`` is a :class:`~mpnb._protocol.Mode`."""
    from distributed import get_worker

    worker = get_worker()
    # the engine learns on its topic where and when the chunk started
    # events travel as msgpack: named fields in a dict
    worker.log_event(topic, {"seq": seq, "pid": os.getpid(), "address": worker.address})
    try:
        task = caller(loads(fn_data), mode)
        items = loads(items_data)
    except BaseException as exc:  # most often a module the worker lacks
        return dumps(DaskRecord(os.getpid(), worker.address, pack(load_failure(seq, count, exc))))
    local = capture.install()
    _route_tqdm()
    position = [0]  # of the task running now, for its progress reports

    def send(done: float, total: float | None, note: str | None) -> None:
        worker.log_event(topic, {"seq": seq, "position": position[0], "done": done, "total": total, "note": note,
                                 "pid": os.getpid(), "address": worker.address})

    reporting.set_thread_sink(send)
    try:
        record = run_on_thread(seq, task, items, local, position)
    finally:
        reporting.set_thread_sink(None)
    return dumps(DaskRecord(os.getpid(), worker.address, pack(record)))


_tqdm_routed = False
_route_lock = threading.Lock()


def _route_tqdm() -> None:
    """tqdm bars of mpnb tasks report to the live view, now or once tqdm is
    imported (bars of other work on this worker are left as they are)."""
    global _tqdm_routed
    with _route_lock:
        if _tqdm_routed:
            return
        _tqdm_routed = True
    from mpnb._worker import _after_import

    _after_import("tqdm.std", reporting.quiet_tqdm)
    _after_import("tqdm.notebook", reporting.quiet_tqdm_notebook)


class CellModules(WorkerPlugin):
    """A dask worker plugin that brings cell modules to the worker.

    Dask runs ``setup`` on every worker now connected and on every worker
    that joins later.  It writes the files (:func:`mpnb.cells.files_to_ship`)
    into the worker's own directory and has :mod:`mpnb.cells` look there.
    The files are named by content hash, so writing a module that is already
    there changes nothing.
    """

    idempotent = True

    def __init__(self, name: str, files: dict[str, bytes]):
        self.name = name
        self.files = files

    def setup(self, worker: Any) -> None:
        directory = Path(worker.local_directory) / "mpnb-cells"
        directory.mkdir(mode=0o700, exist_ok=True)
        cells.write_files(directory, self.files)
        cells.add_directory(directory)


def identity() -> tuple[str, int]:
    """Run on each worker and on the scheduler when the engine connects:
    proves that mpnb imports there, and says which version and process."""
    import mpnb

    return mpnb.__version__, os.getpid()
