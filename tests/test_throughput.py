"""Maps of many fast tasks keep every guarantee.

A worker reads the clock only now and then while its tasks run fast, and
writes only the task's position before each one; the engine gives each idle
worker its share of a map's chunks.  These tests check what must not change
for that: a crash names its task, the live row names the task running,
output comes in task order, every task has its events, and the work is
spread over the workers.  Nothing here measures speed.
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig
import threading
import time

import pytest

import mpnb
from kernel import TAG_VAR
from mpnb.calls import WAIT_TIMEOUT
from mpnb.events import TaskFailed, TaskFinished, TaskStarted
from mpnb.pool import WorkerCrashedError


def identity(x):
    return x


def exit_at_537(x):
    if x == 537:
        os._exit(3)
    return x


def raise_at_537(x):
    if x == 537:
        raise ValueError(f"bad {x}")
    return x


def shout_at_700(x):
    if x == 700:
        print("task 700 speaks")
    return x


def sleep_at_200(x):
    if x == 200:
        time.sleep(120)
    return x


def shout(x):
    print(f"task {x}")
    return x


@pytest.fixture
def pool(tag):
    p = mpnb.Pool(2, live=False, env={TAG_VAR: tag})
    try:
        _wait_ready(p)
        # the engine learns that this function is fast: its chunks then
        # travel several to a message, and run with few clock readings
        assert p.map(identity, range(2000), chunksize=1) == list(range(2000))
        yield p
    finally:
        p.terminate()
        p.join()


def _wait_ready(pool, within=60.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(row.state != "starting" for row in pool.monitor.snapshot()) and len(pool.pids) == 2:
            return
        time.sleep(0.05)
    raise AssertionError(f"workers not ready: {pool.monitor.snapshot()}")


def test_a_crash_inside_a_fast_chunk_names_its_task(pool):
    results = pool.map(exit_at_537, range(1000), on_error="collect")
    crashed = results[537]
    assert isinstance(crashed, WorkerCrashedError), crashed
    text = str(crashed) + " ".join(getattr(crashed, "__notes__", []))
    assert "task 537 (argument 537)" in text and "exit code 3" in text
    assert [r for i, r in enumerate(results) if i != 537] == [i for i in range(1000) if i != 537]


def test_an_exception_inside_a_fast_chunk_fails_its_task_alone(pool):
    """Fast tasks run in batches (one C call each); an exception stops the
    batch at its task, and the batch goes on after it."""
    for _ in range(2):
        results = pool.map(raise_at_537, range(1000), on_error="collect")
        failed = results[537]
        assert isinstance(failed, ValueError) and str(failed) == "bad 537", failed
        assert any("task 537 (argument 537)" in note for note in getattr(failed, "__notes__", [])), failed
        assert [r for i, r in enumerate(results) if i != 537] == [i for i in range(1000) if i != 537]


def test_a_print_inside_a_fast_chunk_comes_in_order(pool, capsys):
    capsys.readouterr()
    assert pool.map(shout_at_700, range(1000)) == list(range(1000))
    assert capsys.readouterr().out == "task 700 speaks\n"


def _wakes(pids) -> int:
    """How many times the kernel ran the threads of processes ``pids`` (``schedstat``)."""
    total = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[2])
    return total


def _until_quiet(pids, within=60.0) -> None:
    """Wait for a second in which no thread of ``pids`` runs."""
    deadline = time.monotonic() + within
    counts = []
    while time.monotonic() < deadline:
        before = _wakes(pids)
        time.sleep(1.0)
        counts.append(_wakes(pids) - before)
        if counts[-1] == 0:
            return
    raise AssertionError(f"the idle workers' threads ran {counts} times in each second")


schedstat = pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="needs Linux's /proc/<pid>/schedstat")


@schedstat
def test_an_idle_worker_wakes_no_thread_after_fast_tasks(pool):
    # batches of fast tasks start the thread that looks at them: it must not
    # go on waking once they are over (nor may anything else in an idle worker)
    assert pool.map(identity, range(20000)) == list(range(20000))
    _until_quiet(pool.pids)


@pytest.mark.parametrize("parked", [False, True], ids=["first-batch", "after-idle"])
def test_the_live_row_names_a_slow_task_among_fast_ones(pool, parked):
    if parked:  # the looking thread started, then waited for the next batch
        if not os.path.exists("/proc/self/schedstat"):
            pytest.skip("needs Linux's /proc/<pid>/schedstat")
        pool.map(identity, range(20000))
        _until_quiet(pool.pids)
    result = pool.map_async(sleep_at_200, range(300), chunksize=300)
    deadline = time.monotonic() + 60
    busy = []
    while time.monotonic() < deadline:
        busy = [row for row in pool.monitor.snapshot() if row.state == "busy" and row.index == 200]
        if busy:
            break
        time.sleep(0.05)
    assert busy, pool.monitor.snapshot()
    assert busy[0].elapsed is not None and busy[0].elapsed >= 0
    pool.cancel()
    with pytest.raises(BaseException):
        result.get(timeout=60)


def test_output_of_fast_tasks_comes_in_task_order(pool, capsys):
    capsys.readouterr()
    assert pool.map(shout, range(1000)) == list(range(1000))
    assert capsys.readouterr().out.splitlines() == [f"task {i}" for i in range(1000)]


def test_every_fast_task_has_its_events_in_time_order(pool):
    cursor = pool.monitor.cursor()
    before = time.monotonic()
    pool.map(identity, range(3000))
    after = time.monotonic()
    events, _ = pool.monitor.events(cursor)
    started = {e.index: e for e in events if isinstance(e, TaskStarted)}
    finished = {e.index: e for e in events if isinstance(e, (TaskFinished, TaskFailed))}
    assert sorted(started) == sorted(finished) == list(range(3000))
    for index, end in finished.items():
        assert before <= started[index].time == end.started <= end.finished <= after


def test_a_map_of_fast_tasks_is_spread_over_the_workers(pool):
    # the first map teaches the engine how fast its chunks are: from then
    # on an idle worker may take several at once, but not all of them
    for _ in range(3):
        before = {row.worker: row.tasks_done for row in pool.monitor.snapshot()}
        assert pool.map(identity, range(20_000)) == list(range(20_000))
        ran = {row.worker: row.tasks_done - before.get(row.worker, 0) for row in pool.monitor.snapshot()}
        assert sum(ran.values()) == 20_000
        assert all(count > 0 for count in ran.values()), ran


def wait_for_file(paths):
    """Touch ``paths[0]``, then wait until ``paths[1]`` exists."""
    started, release = paths
    open(started, "w").close()
    while not os.path.exists(release):
        time.sleep(0.01)
    return "released"


def test_a_slot_read_half_written_is_no_timeout(tag, tmp_path):
    """The engine reads a worker's slot while the worker writes it.  A read
    that pairs the running chunk's seq with a time not written yet (0.0 in
    a fresh slot) must not make the task look hours old and kill it: a task
    cannot have started before its chunk was sent."""
    import struct

    started, release = tmp_path / "started", tmp_path / "release"
    with mpnb.Pool(1, live=False, env={TAG_VAR: tag}, timeout=600) as pool:
        future = pool.submit(wait_for_file, (str(started), str(release)))
        deadline = time.monotonic() + 60
        while not started.exists():
            assert time.monotonic() < deadline, "the task did not start"
            time.sleep(0.02)
        [state] = pool._engine.workers.values()
        slot = struct.Struct("<qqd")
        with open(state.handle.slot_path, "r+b") as file:
            seq, pos, _ = slot.unpack(file.read(slot.size))
            file.seek(0)
            file.write(slot.pack(seq, pos, 0.0))  # as if read between the worker's stores
        time.sleep(1.0)  # the engine looks at the slot every 0.1 s meanwhile
        release.touch()
        assert future.result(timeout=60) == "released"


@schedstat
@pytest.mark.skipif(WAIT_TIMEOUT is not None, reason="SIGINT's handler runs only once a lock's wait ends here")
def test_a_map_waits_without_waking_until_its_tasks_end(pool):
    # no live view: the caller is woken by its call (all ended, a failure,
    # output), not every few milliseconds
    path = f"/proc/self/task/{threading.get_native_id()}/schedstat"

    def wakes() -> int:
        with open(path) as f:
            return int(f.read().split()[2])

    before = wakes()
    assert pool.map(time.sleep, [1.5, 1.5], chunksize=1) == [None, None]
    assert wakes() - before < 10


def test_cancel_from_another_thread_wakes_a_waiting_map(pool):
    timer = threading.Timer(0.5, pool.cancel)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.map(time.sleep, [120, 120], chunksize=1)
    finally:
        timer.join()
    assert time.monotonic() - started < 60  # not once the tasks have ended


def nap(x):
    if x >= 0:
        time.sleep(60)
    return x


def test_an_idle_worker_takes_its_whole_share_of_short_work_at_once(pool):
    # a pace learned at chunksize 1 counts each task's own bookkeeping, so a
    # map's chunks look slower than they run; while each worker's share is
    # short work all together, it goes in one message, not a part of it now
    # and the rest only once the first part's records came back
    engine = pool._engine
    assert pool.map(nap, range(-4, 0), chunksize=1) == list(range(-4, 0))
    engine._paces[next(reversed(engine._paces))] = 0.001  # nap's, the latest learned: 2 ms a chunk of 2
    pool.map_async(nap, range(24), chunksize=2)  # 12 chunks: 6 a worker, 12 ms of work by the pace
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with engine._state_lock:
            held = sorted(len(state.chunks) for state in engine.workers.values())
            queued = len(engine.queue)
        if sum(held) + queued == 12:
            break
        time.sleep(0.01)
    assert (held, queued) == ([6, 6], 0)  # by _AHEAD_SECONDS alone: 5 each, 2 left queued


def faults_of_a_buffer_again(size: int) -> int:
    """The page faults of a block of ``size`` bytes from the C library's
    ``malloc`` (as numpy's arrays get theirs; Python's own allocator is
    mimalloc on a free-threaded build), every page written, made right after
    one of the same size was freed."""
    import ctypes
    import resource

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def written_block() -> int:
        block = libc.malloc(size)
        assert block, "malloc failed"
        ctypes.memset(block, 1, size)
        return block

    libc.free(written_block())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = written_block()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the worker tunes glibc's malloc")
def test_a_tasks_temporary_buffers_do_not_fault_in_afresh_each_time(pool):
    # a task's temporaries (numpy's, pandas') of up to 32 MiB come from the
    # worker's heap, which keeps what is freed: with glibc's fixed limits a
    # block over 128 KiB was mapped afresh, and all its pages faulted in again
    size = 8 << 20
    faults = pool.map(faults_of_a_buffer_again, [size] * 4, chunksize=1)
    pages = size // os.sysconf("SC_PAGE_SIZE")
    assert max(faults) < pages // 4, f"{faults} page faults for a buffer of {pages} pages made again"


class SlowToPickle:
    """A task's argument that pickles as ``(i, path)``: the first slowly (beyond
    SEND_AFTER), the others only once the first task made ``path``, or after 30 s."""

    def __init__(self, i: int, path: str, seen: list[bool]):
        self.i, self.path, self.seen = i, path, seen

    def __reduce__(self):
        if self.i == 0:
            time.sleep(0.05)
        else:
            self.seen.append(wait_for_path(self.path, 30.0))
        return tuple, ((self.i, self.path),)


def wait_for_path(path: str, within: float) -> bool:
    end = time.monotonic() + within
    while not os.path.exists(path):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def touch_first(arg: tuple[int, str]) -> int:
    i, path = arg
    if i == 0:
        open(path, "w").close()
    return i


def test_chunks_slow_to_pickle_reach_the_workers_while_the_rest_are_pickled(pool, tmp_path):
    # a map of large arguments (written to shared memory as they are pickled)
    # must not wait for the last to be pickled before the first task starts
    path, seen = str(tmp_path / "first-started"), []
    items = [SlowToPickle(i, path, seen) for i in range(4)]
    assert pool.map(touch_first, items, chunksize=1) == [0, 1, 2, 3]
    assert seen and all(seen), f"the first task had not started while the next arguments were pickled: {seen}"


def _held_once_sent(engine, n: int) -> list[int]:
    """How many chunks each worker holds once ``n`` are sent, fewest first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with engine._state_lock:
            held = sorted(len(state.chunks) for state in engine.workers.values())
            queued = len(engine.queue)
        if sum(held) == n and not queued:
            return held
        time.sleep(0.01)
    return held


@pytest.mark.parametrize("pace, held", [(1e-6, [0, 2]), (0.001, [1, 1])])
def test_a_call_of_tiny_work_goes_to_one_worker_and_more_work_is_shared(pool, pace, held):
    # two tasks of a microsecond each (by the learned pace) run sooner on one
    # worker than a second message and a second worker's wake take; two of a
    # millisecond each go one to each worker
    engine = pool._engine
    assert pool.map(nap, [-1], chunksize=1) == [-1]
    engine._paces[next(reversed(engine._paces))] = pace  # nap's, the latest learned
    pool.map_async(nap, [0, 1], chunksize=1)
    assert _held_once_sent(engine, 2) == held
    with engine._state_lock:
        states = sorted(engine.workers.values(), key=lambda state: len(state.chunks))
        call = states[-1].chunks[0].call.id
        # nap's first call was preloaded into the worker it did not run on: a
        # new call of it sends that worker nothing (its module is imported)
        assert call not in states[0].functions or held == [1, 1]


@pytest.mark.parametrize("pace, held", [(1e-6, [(), (3,)]), (0.001, [(1,), (1, 1)])])
def test_a_call_of_tiny_work_is_chunked_as_one(pool, pace, held):
    # the pool's own chunking: three tasks of a microsecond each (by the
    # learned pace) are one chunk, which its worker runs and reports once;
    # three of a millisecond each are a chunk each, shared by the workers
    engine = pool._engine
    assert pool.map(nap, [-1], chunksize=1) == [-1]
    engine._paces[next(reversed(engine._paces))] = pace  # nap's, the latest learned
    pool.map_async(nap, [0, 1, 2])
    _held_once_sent(engine, len(held[0]) + len(held[1]))
    with engine._state_lock:
        sizes = sorted(tuple(len(chunk.indices) for chunk in state.chunks) for state in engine.workers.values())
    assert sizes == held


def wait_then_pid(path: str) -> int:
    assert wait_for_path(path, 60.0)
    return os.getpid()


def pid_of(_) -> int:
    return os.getpid()


def test_work_goes_first_to_the_idle_worker_that_worked_last(pool, tmp_path):
    # its caches are warm and its code has run; a new pool's second call
    # went otherwise to the worker started second, which may have just
    # started and still be importing what it was sent to preload
    engine = pool._engine
    deadline = time.monotonic() + 60
    while not all(state.ready for state in list(engine.workers.values())) and time.monotonic() < deadline:
        time.sleep(0.01)
    first = pool.submit(wait_then_pid, str(tmp_path / "first"))
    second = pool.submit(wait_then_pid, str(tmp_path / "second"))  # the other worker: the first is busy
    open(tmp_path / "first", "w").close()
    first_pid = first.result(timeout=60)
    open(tmp_path / "second", "w").close()
    second_pid = second.result(timeout=60)
    assert first_pid != second_pid
    assert pool.map(pid_of, [0]) == [second_pid]
    assert pool.map(pid_of, [0, 1]) == [second_pid] * 2  # tiny by now: one chunk, to that worker


def test_results_queued_behind_a_stalled_task_of_their_message_come_back(pool):
    # by the learned pace the call is tiny work: its 12 chunks travel in one
    # message, whose records wait for its last chunk; its task 10 stalls, and
    # the ten results before it come back anyway, not once it ends (nor lost
    # if its worker were killed before)
    engine = pool._engine
    assert pool.map(nap, [-1], chunksize=1) == [-1]
    engine._paces[next(reversed(engine._paces))] = 1e-6  # nap's, the latest learned
    pool.map_async(nap, range(-10, 2), chunksize=1)  # nap(0) stalls
    call = pool._running[max(pool._running)]
    deadline = time.monotonic() + 30
    while call.contiguous < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert call.contiguous == 10
    assert [call.results[i] for i in range(10)] == list(range(-10, 0))


def _settled(engine, looks_at_is_none: bool) -> float | None:
    """The end of the engine loop's wait once it is (or is not) None, read under its lock."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with engine._state_lock:
            if (engine._looks_at is None) == looks_at_is_none:
                return engine._looks_at
        time.sleep(0.01)
    raise AssertionError(f"the loop's wait never became {'endless' if looks_at_is_none else 'bounded'}")


def test_a_call_wakes_the_engine_only_for_a_deadline_sooner_than_its_wait(pool):
    # a call's caller sends its chunks itself and wakes the loop only when the
    # loop must look sooner than it will: waking it for a deadline it already
    # waits for made it take the interpreter's lock in the middle of the call
    engine = pool._engine
    assert _settled(engine, True) is None  # idle: the loop waits for a message
    assert engine._sooner(0.1) and not engine._sooner(None)
    pool.map_async(time.sleep, [30], chunksize=1, timeout=600)  # a timeout: the loop looks every 0.1 s
    assert _settled(engine, False) <= time.monotonic() + 0.1
    assert not engine._sooner(0.1) and not engine._sooner(None)  # a second call's own deadline: no wake


def _threads(pid) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _page_faults(pids) -> int:
    """The minor page faults of processes ``pids`` so far (``/proc/<pid>/stat``)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            total += int(f.read().rsplit(")", 1)[1].split()[7])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads and page faults in /proc")
def test_an_idle_worker_gets_ready_for_a_first_map_of_many_fast_tasks(tag):
    # a worker idle for a moment (no message for 20 ms) touches the memory a
    # large call's small objects take and starts the thread that looks at
    # batches: the first map of many fast tasks then pays neither page faults
    # nor a thread start
    with mpnb.Pool(1, live=False, env={TAG_VAR: tag}) as pool:
        assert pool.map(identity, [0]) == [0]  # one task alone: no batch
        (pid,) = pool.pids
        deadline = time.monotonic() + 60
        while _threads(pid) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _threads(pid) == 2, "the batch-looking thread did not start while the worker was idle"
        time.sleep(0.2)  # its first look, then it waits for a batch
        before = _page_faults([pid])
        assert pool.map(identity, list(range(20000))) == list(range(20000))
        faults = _page_faults([pid]) - before
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return  # mimalloc gives freed pages back: nothing is warmed there
    assert faults < 60, f"the first map of 20,000 tasks took {faults} page faults in a warmed worker"


class _Clock:
    """The worker's clock in one process, moved on by the tasks themselves:
    what the worker does depends on how long its tasks take, not on how
    fast this machine runs them."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def task(self, ms: float) -> float:
        self.now += ms / 1000
        return ms

    sleep = staticmethod(time.sleep)


class _Sent:
    """A worker's connection that keeps what is sent."""

    def __init__(self):
        self.messages = []

    def send_bytes(self, data: bytes) -> None:
        self.messages.append(data)

    def poll(self, timeout: float = 0.0) -> bool:
        return True


def _timed_positions(worker, sent, task, seq: int, items: list) -> list[int]:
    """Run one chunk in ``worker``, here; the positions of the tasks it read the clock before."""
    import pickle

    from mpnb._protocol import Record

    last = worker._run_tasks(seq, task, items, False, seq)
    records = [Record(*r) for data in sent.messages for r in pickle.loads(data)[1]] + [last]
    sent.messages.clear()
    assert [v for r in records for v in r.values] == items
    return sorted(pos for r in records for pos in r.starts)


def test_tasks_of_a_few_ms_are_timed_now_and_then_and_slow_ones_each(monkeypatch, tmp_path):
    # tasks of 2 ms run in batches between readings of the clock (a reading
    # before each cost some 4 us a task); tasks over STRIDE_SECONDS are each
    # timed, and so are the tasks after a slow one among fast ones
    from mpnb import _task, _worker, reporting
    from mpnb._protocol import SLOT, STRIDE_SECONDS

    clock = _Clock()
    monkeypatch.setattr(_worker, "time", clock)  # the worker module's alone
    monkeypatch.setattr(_worker, "_libc", lambda: None)  # no mallopt in this process
    monkeypatch.setattr(reporting, "process_sink", reporting.process_sink)  # restored after
    monkeypatch.setattr(_task, "share_results", _task.share_results)
    slot = tmp_path / "slot"
    slot.write_bytes(bytes(SLOT.size))
    sent = _Sent()
    worker = _worker._Worker(sent, str(slot))
    worker.look_wake = threading.Lock()  # no batch-looking thread in this process
    worker.look_wake.acquire()

    timed = _timed_positions(worker, sent, clock.task, 1, [2] * 1000)
    assert timed[0] == 0 and len(timed) < 100, f"{len(timed)} of 1,000 tasks of 2 ms timed"
    slow = STRIDE_SECONDS * 1000 + 1
    assert _timed_positions(worker, sent, clock.task, 2, [slow] * 20) == list(range(20))
    mixed = [2] * 300 + [1000] + [2] * 10
    timed = _timed_positions(worker, sent, clock.task, 3, mixed)
    after = next(pos for pos in timed if pos > 300)  # the reading that ends the slow task's batch
    assert after + 1 in timed, f"the task after the slow one's batch was not timed alone: {timed}"


def test_the_parent_reads_what_waits_on_a_workers_pipe_in_one_go():
    # every message waiting, in multiprocessing.connection's framing (the
    # parent's end is a Connection), as the worker and a Connection write
    # them: one larger than the pipe holds, which arrives while it is read,
    # and a length whose first bytes come alone
    import multiprocessing.connection
    import select

    from mpnb._protocol import SIZE, read_frames
    from mpnb._worker import _PipeConnection

    read_end, write_end = os.pipe()
    try:
        messages = [b"a", b"", b"x" * 5000, bytes(range(256)) * 1000]
        worker_end = _PipeConnection(write_end)
        writer = threading.Thread(target=lambda: [worker_end.send_bytes(m) for m in messages])
        writer.start()
        got: list = []
        while len(got) < len(messages):
            assert select.select([read_end], [], [], 60)[0]
            got += read_frames(read_end)
        writer.join()
        assert [bytes(m) for m in got] == messages
        with multiprocessing.connection.Connection(os.dup(write_end)) as connection:
            connection.send_bytes(b"from a Connection")
        assert read_frames(read_end) == [b"from a Connection"]
        os.write(write_end, SIZE.pack(3)[:2])
        rest = threading.Timer(0.2, os.write, (write_end, SIZE.pack(3)[2:] + b"abc"))
        rest.start()
        assert read_frames(read_end) == [b"abc"]
        rest.join()
        os.close(write_end)
        write_end = -1
        with pytest.raises(EOFError):
            read_frames(read_end)
    finally:
        os.close(read_end)
        if write_end != -1:
            os.close(write_end)


def pause(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_a_maps_automatic_chunks_shrink_toward_its_end_once_the_pace_is_known(pool):
    # multiprocessing's chunksize (400 tasks / (4 x 2 workers) = 50) left a
    # worker that fell behind a whole chunk for the other to wait on
    engine = pool._engine
    assert pool.map(pause, [0.002] * 8, chunksize=1) == [0.002] * 8  # the pace: some 2 ms a task
    pool.map_async(pause, [60.0] * 400)  # held and queued until the fixture ends the pool
    deadline, chunks = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        with engine._state_lock:
            chunks = [*engine.queue, *(c for state in engine.workers.values() for c in state.chunks)]
        if sum(len(chunk.indices) for chunk in chunks) == 400:
            break
        time.sleep(0.01)
    sizes = [len(chunk.indices) for chunk in sorted(chunks, key=lambda chunk: chunk.indices[0])]
    assert sum(sizes) == 400, sizes
    assert sizes[0] == 50 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 25, sizes


@pytest.mark.parametrize("n, pace, sizes", [
    (10_000, None, 1250),  # the pace not known yet: multiprocessing's size
    (20_000, 2e-7, 2500),  # trivial tasks: their least chunk is over it
    (16, 0.25, [2, 2, 2, 2, 2, 2, 1, 1, 1, 1]),
    (400, 0.001, [50, 50, 50, 50, 50, 38, 28, 21, 20, 20, 20, 3]),
])
def test_automatic_chunk_sizes(n, pace, sizes):
    from mpnb.calls import chunk_sizes

    got = chunk_sizes(n, 2, pace)
    assert (got if isinstance(got, int) else list(got)) == sizes
