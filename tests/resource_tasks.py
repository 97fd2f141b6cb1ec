"""Tasks of test_resources.py, in a module of their own: a worker imports
only this (and the standard library), so it starts in a moment."""

from __future__ import annotations

import os
import time

DEADLINE = 60.0
# what a task reports of its slot: the variables worker_env and gpus set
SLOT_VARS = ("RANK", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")


def meet(directory: str, name: str, count: int) -> None:
    """Wait until ``count`` tasks have arrived in ``directory``."""
    open(os.path.join(directory, name), "w").close()
    deadline = time.monotonic() + DEADLINE
    while len(os.listdir(directory)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {os.listdir(directory)} arrived")
        time.sleep(0.01)


def slot_facts(directory: str) -> dict:
    """What a task sees of its slot, once the other worker's task runs too."""
    meet(directory, str(os.getpid()), 2)
    return {"pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0)),
            "threads": os.environ.get("OMP_NUM_THREADS"), **{k: os.environ.get(k) for k in SLOT_VARS}}


def crash_rank_1(directory: str) -> None:
    """Ends the worker of slot 1, once the other worker's task runs too."""
    meet(directory, str(os.getpid()), 2)
    if os.environ["RANK"] == "1":
        os._exit(1)


def rank() -> str:
    return os.environ["RANK"]


def runaway_or_wait(n: int):
    """Task 0 allocates without end (up to a 1 GiB safety stop); the others
    finish once it has begun, one of them while it runs."""
    marker = os.environ["MARKER"]
    if n == 0:
        open(marker, "w").close()
        blocks = [b"x" * (8 << 20) for _ in range(128)]  # 1 GiB: the limit failed
        return f"not stopped at {len(blocks) * 8} MiB"
    deadline = time.monotonic() + DEADLINE
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


_held = []


def hold(mib: int) -> int:
    _held.append(b"x" * (mib << 20))
    return os.getpid()
