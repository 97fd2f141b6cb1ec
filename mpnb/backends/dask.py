"""The dask backend: the same :class:`mpnb.Pool` calls on a dask.distributed cluster.

``Pool(backend="dask", address="tcp://host:8786")`` runs the pool's chunks on
:class:`DaskEngine`, an engine of the same contract as the local one
(:mod:`mpnb.backends.base`), so ``map``, ``imap``, ``submit`` and the rest of
the pool's policy are unchanged::

    caller thread (the cell)       engine thread (DaskEngine.run)          dask workers
    ------------------------       ------------------------------          ------------
    map / imap / submit              |                                      |
      | Chunk ----- submit --------> | inbox: ship new cell modules ------> | CellModules plugin
      |                              |        (a worker plugin per module)  |  writes them to its
      |                              | client.map(run_chunk, chunk bytes)   |  local directory
      |                              |   ---------------------------------> | run_chunk: log a
      |                              | <-- "start" (event topic) ---------- |  start event, run the
      |                              | <-- mpnb.report (same topic) ------- |  (and the tasks' reports)
      |                              | <-- records (done callback) -------- |  tasks, capture output
      | <--- Call.deliver ---------- | deliver, feed the ClusterMonitor     |
      | Ctrl-C: cancel ------------> | cancel the call's dask futures       |
                                     | timeout: fail the task here; the worker thread runs on

Functions are pickled once per call on the notebook side (as for local
workers) and travel as bytes inside the task, so the scheduler never needs a
notebook's cell modules; it and the workers need mpnb itself, which the
engine checks when it connects.  ``%%mppool`` cell modules (source and
captured values) are shipped to every worker, present and future, by a
worker plugin named after the module's content hash, and found there by
:mod:`mpnb.cells`: a re-run, changed cell is a new module, so no
worker can run the old code.

Dask runs tasks on threads of long-lived worker processes that other clients
may share, so a running task cannot be stopped: a timed-out or cancelled
task fails at once in the notebook, and its thread finishes on its own.

What runs on the dask workers is in :mod:`mpnb.backends._dask_worker`.
"""

from __future__ import annotations

import functools
import itertools
import os
import pickle
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from queue import Empty
from typing import Any, Callable, Iterable, Iterator, Sequence

from mpnb import cells
from mpnb.backends.base import EngineBase
from mpnb.calls import Call, Chunk, dump_items, read_record
from mpnb.errors import WorkerCrashedError, cancelled, timeout_error
from mpnb.monitor import Monitor, WorkerStatus

INSTALL_HINT = 'the dask backend needs dask.distributed: pip install "mpnb[dask]"'

try:
    from mpnb.backends._dask_worker import CellModules, DaskRecord, identity, run_chunk
except ImportError as _missing:
    if not (_missing.name or "").startswith("distributed"):
        raise
    raise ImportError(f"mpnb.Pool(backend='dask'): {INSTALL_HINT}") from _missing

__all__ = ["ClusterMonitor", "DaskBackendError", "DaskEngine", "connect"]

# how long Pool(backend="dask") waits for the scheduler, and for a first worker
CONNECT_TIMEOUT = float(os.environ.get("MPNB_DASK_CONNECT_TIMEOUT", 10))
# how often the engine looks at timeouts and calls the caller gave up on
_TICK = 0.05
_CELL_PLUGIN = "mpnb-"


class DaskBackendError(RuntimeError):
    """The dask cluster cannot run mpnb tasks (no workers, or workers without mpnb)."""


# ------------------------------------------------------------ notebook side


class _Node:
    """What the monitor knows of one dask worker."""

    __slots__ = ("id", "address", "pid", "running", "done", "failed", "metrics", "progress")

    def __init__(self, worker_id: int, address: str, pid: int | None):
        self.id, self.address, self.pid = worker_id, address, pid
        self.running: dict[int, tuple[int, Sequence[int], float]] = {}  # seq -> (call, indices, since)
        # seq -> (position, done, total, note): the last mpnb.report of the chunk's running task
        self.progress: dict[int, tuple[int, float, float | None, str | None]] = {}
        self.done = self.failed = 0
        self.metrics: dict[str, Any] = {}


class ClusterMonitor(Monitor):
    """The status table of a pool on a dask cluster: one row per dask worker.

    Rows come from the scheduler (``Client.scheduler_info()``, read again by
    every :meth:`sample`), with this pool's own tasks on top: which task each
    worker runs now (from the start event each chunk sends) and how many it
    finished or failed.  ``cpu_percent`` and ``rss`` are the worker process's
    as the scheduler last heard them (every heartbeat, about a second).
    """

    def __init__(self, client: Any, pids: dict[str, int]):
        super().__init__()
        self._client = client
        self._ids = itertools.count()
        self._nodes: dict[str, _Node] = {}
        self._pids = dict(pids)
        self.refresh()

    # -- writers (the engine thread)

    def refresh(self) -> None:
        """Read the scheduler's list of workers: new ones get a row, gone ones lose it."""
        workers = self._client.scheduler_info(n_workers=-1)["workers"]
        now = time.monotonic()
        with self._lock:
            for address, info in workers.items():
                node = self._nodes.get(address)
                if node is None:
                    node = self._nodes[address] = _Node(next(self._ids), address, self._pids.get(address))
                    self._emit(1, "one", (_events().WorkerStarted, (node.id, node.pid or 0, now)))
                node.metrics = info.get("metrics", {})
            for address in [a for a in self._nodes if a not in workers]:
                node = self._nodes.pop(address)
                self._emit(1, "one", (_events().WorkerStopped, (node.id, node.pid or 0, now, None, "left the cluster")))

    def threads(self) -> int:
        """The cluster's worker threads, as the scheduler counts them."""
        return sum(info["nthreads"] for info in self._client.scheduler_info(n_workers=-1)["workers"].values())

    def chunk_started(self, address: str, pid: int, seq: int, call: int, indices: Sequence[int]) -> None:
        with self._lock:
            node = self._node(address, pid)
            node.running[seq] = (call, indices, time.monotonic())

    def chunk_progress(self, address: str, seq: int, position: int, done: float, total: float | None,
                       note: str | None) -> None:
        """The task at ``position`` of chunk ``seq`` reported how far it is (``mpnb.report``)."""
        with self._lock:
            node = self._nodes.get(address)
            if node is not None and seq in node.running:
                node.progress[seq] = (position, done, total, note)

    def chunk_done(self, address: str, pid: int, seq: int, call: int, indices: Sequence[int],
                   starts: list[float] | dict[int, float], end: float, errors: dict[int, str]) -> None:
        """A chunk's tasks ended on ``address`` (times on this machine's clock)."""
        with self._lock:
            node = self._node(address, pid)
            node.running.pop(seq, None)
            node.progress.pop(seq, None)
            node.failed += len(errors)
            node.done += len(indices) - len(errors)
            worker = node.id
        self.tasks_ended(worker, pid, call, indices, starts, end, errors)

    def _node(self, address: str, pid: int | None) -> _Node:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = _Node(next(self._ids), address, pid)
        if node.pid is None:
            node.pid = pid
        return node

    # -- readers

    def snapshot(self) -> list[WorkerStatus]:
        """One row per dask worker: address, pid, this pool's task running there."""
        now = time.monotonic()
        with self._lock:
            rows = []
            for node in sorted(self._nodes.values(), key=lambda n: n.id):
                executing = node.metrics.get("task_counts", {}).get("executing", 0)
                state = "busy" if node.running or executing else "idle"
                status = WorkerStatus(node.id, node.pid, state, tasks_done=node.done,
                                      tasks_failed=node.failed, address=node.address)
                if node.running:
                    seq = min(node.running, key=lambda s: node.running[s][2])
                    call, indices, since = node.running[seq]
                    status = replace(status, call=call, index=indices[0], since=since, elapsed=now - since)
                    position, done, total, note = node.progress.get(seq, (-1, None, None, None))
                    if 0 <= position < len(indices):
                        status = replace(status, index=indices[position], task_done=done, task_total=total,
                                         note=note)
                rows.append(status)
            return rows

    def sample(self) -> list[WorkerStatus]:
        """:meth:`snapshot` with each worker's CPU percent and memory, from the scheduler."""
        try:
            self.refresh()
        except Exception:  # the client is closed or the scheduler is gone: last known rows
            pass
        with self._lock:
            metrics = {node.id: node.metrics for node in self._nodes.values()}
        return [
            replace(row, cpu_percent=metrics.get(row.worker, {}).get("cpu"),
                    rss=metrics.get(row.worker, {}).get("memory"))
            for row in self.snapshot()
        ]


def _events():
    from mpnb import events

    return events


class _Running:
    """A chunk submitted to dask and not yet ended."""

    __slots__ = ("chunk", "future", "address", "started")

    def __init__(self, chunk: Any, future: Any):
        self.chunk, self.future = chunk, future
        self.address: str | None = None
        self.started: float | None = None  # when its start event arrived


class DaskEngine(EngineBase):
    """Runs a pool's chunks as dask tasks (see the module docstring).

    Dask's done callbacks and start events only post messages to the
    engine's inbox: one thread decides.  A submitted future is running once
    its task's start event arrives; a future cancelled before that is
    dropped from the cluster and never runs.
    """

    backend = "dask"

    def __init__(self, client: Any, owns_client: bool, pids: dict[str, int]):
        monitor = ClusterMonitor(client, pids)
        super().__init__("mpnb-dask-engine", monitor, max(1, monitor.threads()))
        self.cluster_monitor = monitor
        self.client = client
        self.owns_client = owns_client
        self.address = client.scheduler.address
        self.topic = f"mpnb-{uuid.uuid4().hex}"
        self.running: dict[int, _Running] = {}
        self.keys: dict[str, int] = {}  # dask key -> chunk seq
        self.shipped: set[str] = set()
        client.subscribe_topic(self.topic, self._on_event)

    def _on_event(self, event: tuple) -> None:
        _, started = event  # (time, the event's fields)
        if "done" in started:  # a task's mpnb.report: only the monitor needs it
            self.cluster_monitor.chunk_progress(started["address"], started["seq"], started["position"],
                                                started["done"], started["total"], started["note"])
            return
        self.inbox.put(_Started(started["seq"], started["pid"], started["address"], time.monotonic()))

    def _on_done(self, future: Any) -> None:
        self.inbox.put(_Done(future))

    # -- the loop

    def _loop(self) -> None:
        while not (self.stopping and not self.running):
            finished = []
            for message in self._next_messages():
                if isinstance(message, _Done):
                    finished.append(message.future)
                else:
                    self._take(message)
            if finished:
                self._finish(finished)
            self._check_running()

    def _next_messages(self) -> list[Any]:
        try:
            messages = [self.inbox.get(timeout=_TICK if self.running else None)]
        except Empty:
            return []
        while True:
            try:
                messages.append(self.inbox.get_nowait())
            except Empty:
                return messages

    def _on_message(self, message: Any) -> None:
        if isinstance(message, _Started):
            self._on_start(message)
        else:
            super()._on_message(message)

    def _on_cancel(self, call: Call, done: threading.Event) -> None:
        self._cancel([r for r in self.running.values() if r.chunk.call is call])
        done.set()

    def _on_shutdown(self, cancel_pending: bool) -> None:
        if cancel_pending:
            self._cancel(list(self.running.values()))

    def _held(self) -> Iterator[tuple[Chunk, Iterable[int]]]:
        running, self.running = self.running, {}
        for entry in running.values():
            yield entry.chunk, range(len(entry.chunk.indices))

    def _close(self) -> None:
        try:
            self.client.unsubscribe_topic(self.topic)
        except Exception:
            pass
        if self.owns_client:
            try:
                self.client.close(timeout=5)
            except Exception:
                pass

    # -- submitting

    def _on_submit(self, chunks: list[Chunk]) -> None:
        try:
            self._ship_cell_modules()
        except Exception as exc:
            for chunk in chunks:
                self._fail(chunk, range(len(chunk.indices)), functools.partial(_shipping_error, exc))
            return
        ready: list[Chunk] = []
        for chunk in chunks:
            if chunk.call.cancelled or (chunk.call.future is not None and chunk.call.future.cancelled()):
                self._drop(chunk)
                continue
            if chunk.call.timeout is not None and len(chunk.indices) > 1:
                # a timeout is per task: each runs alone, so its start is known
                ready.extend(Chunk(chunk.call, [i], [item], dump_items([item]))
                             for i, item in zip(chunk.indices, chunk.items))
            else:
                ready.append(chunk)
        if ready:
            self._run_on_cluster(ready)

    def _run_on_cluster(self, ready: list[Chunk]) -> None:
        keys = [f"mpnb-{chunk.call.id}-{chunk.seq}-{uuid.uuid4().hex[:8]}" for chunk in ready]
        futures = self.client.map(
            run_chunk,
            [self.topic] * len(ready),
            [c.seq for c in ready],
            [len(c.indices) for c in ready],
            [c.call.fn_bytes for c in ready],
            [c.data for c in ready],
            [int(c.call.mode) for c in ready],
            key=keys,
            pure=False,
        )
        for key, chunk, future in zip(keys, ready, futures):
            self.running[chunk.seq] = _Running(chunk, future)
            self.keys[key] = chunk.seq
            future.add_done_callback(self._on_done)

    def _ship_cell_modules(self) -> None:
        """Send every cell module this kernel imported that the cluster lacks."""
        prefix = f"{cells.__name__}.{cells.PREFIX}"
        for name in [n for n in list(sys.modules) if n.startswith(prefix) and n not in self.shipped]:
            files = cells.files_to_ship(sys.modules[name])
            if not files:
                continue
            self.client.register_plugin(CellModules(_CELL_PLUGIN + name, files), name=_CELL_PLUGIN + name)
            self.shipped.add(name)

    # -- results

    def _on_start(self, started: _Started) -> None:
        entry = self.running.get(started.seq)
        if entry is None:
            return
        entry.address, entry.started = started.address, started.when
        future = entry.chunk.call.future
        if future is not None and not future.set_running_or_notify_cancel():
            # cancelled while pending: its thread runs on, its result is dropped
            self._cancel([entry])
            return
        self.cluster_monitor.chunk_started(started.address, started.pid, started.seq, entry.chunk.call.id,
                                           entry.chunk.indices)

    def _finish(self, futures: list[Any]) -> None:
        entries = []
        for future in futures:
            seq = self.keys.pop(future.key, None)
            entry = self.running.pop(seq, None) if seq is not None else None
            if entry is not None:
                entries.append(entry)
        ok = {e.future.key: e for e in entries if e.future.status == "finished"}
        # by key: errors="skip" leaves out a future that failed meanwhile
        gathered = self.client.gather({key: e.future for key, e in ok.items()}, errors="skip") if ok else {}
        for entry in entries:
            data = gathered.get(entry.future.key)
            if data is not None:
                self._deliver(entry, data)
            else:
                self._lost(entry)

    def _deliver(self, entry: _Running, data: bytes) -> None:
        done: DaskRecord = pickle.loads(data)
        pid, address, record = done
        offset = time.monotonic() - record.end  # the worker's clock to this machine's
        chunk, call = entry.chunk, entry.chunk.call
        indices, values, failed, errors, output = read_record(chunk, record, f"on dask worker {address} (pid {pid})")
        self.cluster_monitor.chunk_done(address, pid, chunk.seq, call.id, indices,
                                        {pos: started + offset for pos, started in record.starts.items()},
                                        record.end + offset, errors)
        call.deliver(indices, values, failed, output)

    def _lost(self, entry: _Running) -> None:
        """A chunk whose dask task failed as a whole (not one of its tasks)."""
        future = entry.future
        if future.status == "cancelled" or entry.chunk.call.cancelled:
            self._fail_entry(entry, range(len(entry.chunk.indices)), cancelled)
            return
        try:
            error = future.exception(timeout=5)
        except Exception as exc:
            error = exc
        self._fail_entry(entry, range(len(entry.chunk.indices)), lambda where: _task_lost(where, error))

    # -- timeouts and cancels

    def _check_running(self) -> None:
        now = time.monotonic()
        given_up = [e for e in self.running.values() if e.chunk.call.cancelled]
        if given_up:
            self._cancel(given_up)
        for entry in list(self.running.values()):
            timeout = entry.chunk.call.timeout
            if timeout is None or entry.started is None or now - entry.started <= timeout:
                continue
            del self.running[entry.chunk.seq]
            self.client.cancel([entry.future])
            seconds = now - entry.started
            self._fail_entry(entry, [0], lambda where: timeout_error(
                where, seconds, timeout, f"dask cannot stop a running task, so it goes on in its thread on "
                f"{entry.address} until it returns, and its result is dropped"))

    def _cancel(self, entries: list[_Running]) -> None:
        if not entries:
            return
        for entry in entries:
            self.running.pop(entry.chunk.seq, None)
        self.client.cancel([e.future for e in entries])
        for entry in entries:
            self._fail_entry(entry, range(len(entry.chunk.indices)), cancelled)

    def _fail_entry(self, entry: _Running, positions: Iterable[int],
                    make_error: Callable[[str], BaseException]) -> None:
        place = f" on dask worker {entry.address}" if entry.address else ""
        self._fail(entry.chunk, positions, make_error, place, entry.address)

    def _record_failures(self, chunk: Chunk, indices: Sequence[int], errors: dict[int, str], worker: Any) -> None:
        """As the base, with ``worker`` a dask worker's address."""
        now = time.monotonic()
        self.cluster_monitor.chunk_done(worker, 0, chunk.seq, chunk.call.id, indices, [now] * len(indices), now,
                                        errors)


@dataclass(frozen=True)
class _Started:
    """A chunk's task started on a dask worker (its start event)."""

    seq: int
    pid: int
    address: str
    when: float


@dataclass(frozen=True)
class _Done:
    """A chunk's dask future ended."""

    future: Any


def _task_lost(where: str, error: BaseException | None) -> BaseException:
    name = type(error).__name__
    if name == "KilledWorker":
        exc: BaseException = WorkerCrashedError(
            f"{where} was running each time a dask worker died, so dask gave up on it "
            f"({error}); likely cause: a crash in native code or the worker running out of "
            "memory (the workers' logs say which)"
        )
    else:
        exc = RuntimeError(f"{where} could not run on the dask cluster: {name}: {error}")
    exc.__cause__ = error
    return exc


def _shipping_error(error: BaseException, where: str = "") -> BaseException:
    exc = DaskBackendError(
        f"the notebook's %%mppool modules could not be sent to the dask workers: "
        f"{type(error).__name__}: {error}"
    )
    exc.__cause__ = error
    return exc


# ---------------------------------------------------------------- connect


def connect(address: Any, *, workers: int | None, initializer: Any, env: Any, context: str | None,
            max_tasks_per_child: int | None = None) -> DaskEngine:
    """Connect to the dask scheduler at ``address`` and start an engine for a Pool.

    ``address`` is a scheduler address (``"tcp://host:8786"``), a
    ``distributed.Client`` (used as it is and left open), or ``None`` for the
    default client of this process.  Raises a clear error, after at most
    :data:`CONNECT_TIMEOUT` seconds, when the scheduler cannot be reached,
    has no workers, or a worker or the scheduler cannot import mpnb.
    """
    import distributed

    _refuse_local_options(workers, initializer, env, context)
    if max_tasks_per_child is not None:
        raise ValueError(
            f"mpnb.Pool(backend='dask') does not take max_tasks_per_child={max_tasks_per_child!r}: the "
            "cluster's workers are shared and not the pool's to restart (dask's own lifetime settings, "
            "distributed.worker.lifetime, restart them). Leave it out.")
    client, owns = _client(distributed, address)
    try:
        pids = _check_cluster(client)
        engine = DaskEngine(client, owns, pids)
    except BaseException:
        if owns:
            client.close()
        raise
    engine.start()
    return engine


def _refuse_local_options(workers: int | None, initializer: Any, env: Any, context: str | None) -> None:
    given = [
        (workers is not None, f"workers={workers!r}", "the cluster's workers decide how many tasks run at once"),
        (initializer is not None, "initializer=", "dask workers are shared and already running; use "
         "Client.register_plugin with a distributed.WorkerPlugin to prepare them"),
        (bool(env), "env=", "set environment variables where the dask workers are started"),
        (context is not None, f"context={context!r}", "dask starts its own worker processes"),
    ]
    for wrong, option, why in given:
        if wrong:
            raise ValueError(f"mpnb.Pool(backend='dask') does not take {option}: {why}. Leave it out.")


def _client(distributed: Any, address: Any) -> tuple[Any, bool]:
    if isinstance(address, distributed.Client):
        return address, False
    if address is None:
        try:
            return distributed.default_client(), False
        except ValueError:
            raise ValueError(
                "mpnb.Pool(backend='dask') needs the scheduler's address: "
                "Pool(backend='dask', address='tcp://host:8786'), or a distributed.Client as address"
            ) from None
    if not isinstance(address, str):
        raise TypeError(
            f"mpnb.Pool(address=...) takes a scheduler address such as 'tcp://host:8786' or a "
            f"distributed.Client, not a {type(address).__name__}"
        )
    try:
        client = distributed.Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConnectionError(
            f"mpnb could not connect to the dask scheduler at {address!r} within {CONNECT_TIMEOUT:g} s "
            f"({type(exc).__name__}: {exc}). Check the address (the scheduler prints it as "
            "'Scheduler at: tcp://host:port') and that the scheduler runs; "
            "MPNB_DASK_CONNECT_TIMEOUT sets how long to wait."
        ) from exc
    return client, True


def _check_cluster(client: Any) -> dict[str, int]:
    """Wait for a worker; make sure the scheduler and every worker import mpnb."""
    import mpnb

    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
    except TimeoutError:
        raise DaskBackendError(
            f"the dask cluster at {client.scheduler.address} has no workers (waited "
            f"{CONNECT_TIMEOUT:g} s); start some with `dask worker {client.scheduler.address}`"
        ) from None
    answers = dict(client.run(identity, on_error="return"))
    try:
        answers["the scheduler"] = client.run_on_scheduler(identity)
    except Exception as exc:
        answers["the scheduler"] = exc
    wrong = {where: answer for where, answer in answers.items()
             if isinstance(answer, BaseException) or answer[0] != mpnb.__version__}
    if wrong:
        where, answer = next(iter(wrong.items()))
        problem = (f"cannot import mpnb ({answer})" if isinstance(answer, BaseException)
                   else f"has mpnb {answer[0]}")
        raise DaskBackendError(
            f"{len(wrong)} of the dask cluster's processes cannot run mpnb tasks: {where} {problem}. "
            f"The scheduler and every worker need mpnb {mpnb.__version__}, as in this notebook: "
            f"pip install mpnb=={mpnb.__version__} in their environment, then restart them."
        )
    return {where: answer[1] for where, answer in answers.items() if where != "the scheduler"}
