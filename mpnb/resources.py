"""Per-worker resources and memory limits of a local pool.

``Pool(worker_env=, gpus=, pin=, max_memory=, soft_memory=)`` become one
:class:`Resources` record, made once when the pool is made (every option is
checked then, and ``worker_env`` is called then, once per slot), and read by
the launcher (each worker's environment and CPU set, by its slot's rank) and
the local engine (memory limits).

A pool of ``n`` workers has ``n`` slots, ranks ``0`` to ``n - 1``.  A worker
that replaces another (a crash, a timeout, Cancel, ``max_tasks_per_child``,
a memory limit) takes the rank of the slot it fills, so it gets the same
environment, device and CPUs.

Memory is watched by sampling: the engine's thread reads each busy worker's
resident memory (psutil) every :data:`SAMPLE_SECONDS`.  It works wherever
psutil does, limits resident memory (what the machine runs out of), not
address space (``RLIMIT_AS`` breaks CUDA, JITs and big thread stacks), and
needs no cgroup.  A task allocating faster than the sampling catches it may
pass the limit by what it allocates in one interval.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from mpnb import limits

__all__ = ["GPU_VARS", "Resources", "SAMPLE_SECONDS", "check", "find_gpus", "parse_size", "resolve"]

#: how often the engine samples busy workers' memory when a limit is set
SAMPLE_SECONDS = 0.02

#: the variables a worker's device is set in: NVIDIA's CUDA, AMD's ROCm
#: (HIP), Intel's Level Zero (which oneAPI's SYCL runtime reads under its
#: own ``ONEAPI_DEVICE_SELECTOR``: setting both would number the device twice)
GPU_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")

#: where ``gpus="auto"`` looks, in this order
GPU_SOURCES = "CUDA_VISIBLE_DEVICES in this process, `nvidia-smi -L`, /proc/driver/nvidia/gpus, /dev/nvidia<N>"

_OPTIONS = ("worker_env", "gpus", "pin", "max_memory", "soft_memory")


@dataclass(frozen=True)
class Resources:
    """What each worker slot gets, by rank (see the module docstring)."""

    envs: tuple[dict[str, str], ...] = ()  # added to each slot's environment
    cpus: tuple[frozenset[int], ...] = ()  # each slot's CPU set (pin=True), else empty
    devices: tuple[str, ...] = ()  # each slot's device (gpus=), else empty
    max_memory: int | None = None  # bytes: a worker past it is killed, its task fails
    soft_memory: int | None = None  # bytes: a worker past it is replaced between tasks
    given: dict[str, Any] = field(default_factory=dict)  # the options as given, for messages

    def env(self, rank: int) -> dict[str, str]:
        return dict(self.envs[rank]) if self.envs else {}

    def cpu_set(self, rank: int) -> frozenset[int] | None:
        return self.cpus[rank] if self.cpus else None

    def device(self, rank: int) -> str | None:
        return self.devices[rank] if self.devices else None

    @property
    def watches_memory(self) -> bool:
        return self.max_memory is not None or self.soft_memory is not None

    @property
    def memory_limit(self) -> int | None:
        """The limit a view shows memory against: the hard one, else the soft one."""
        return self.max_memory if self.max_memory is not None else self.soft_memory


def given(options: Mapping[str, Any]) -> dict[str, Any]:
    """The resource options that were set (not None / False)."""
    return {name: options[name] for name in _OPTIONS if options.get(name) not in (None, False)}


# why each other backend refuses the options, and what to do instead
_ELSEWHERE = {
    "dask": "a dask cluster's workers are its own, started by the cluster. Give each dask worker its "
            "environment, devices, CPUs and memory limit where you start it (e.g. dask worker --memory-limit)",
    "threads": "the threads of backend='threads' share this process's environment, devices, CPUs and "
               "memory. Use mpnb.Pool() (worker processes) for per-worker resources",
    "interpreters": "the subinterpreters of backend='interpreters' share this process's environment, devices, "
                    "CPUs and memory. Use mpnb.Pool() (worker processes) for per-worker resources",
}


def check(options: Mapping[str, Any], backend: str) -> None:
    """Refuse what cannot work, before anything starts: bad values, and any
    resource option on another backend than the local one (a dask cluster's
    workers are not the pool's; the thread engine's threads share this process)."""
    set_ = given(options)
    if backend in _ELSEWHERE and set_:
        name = next(iter(set_))
        raise ValueError(f"{name}={set_[name]!r} is for the local backend: {_ELSEWHERE[backend]}, or drop {name} here.")
    if options.get("worker_env") is not None and not callable(options["worker_env"]):
        raise TypeError(f"worker_env={options['worker_env']!r}: give a function of the worker's rank "
                        f"returning a dict of environment variables, e.g. worker_env=lambda rank: "
                        f"{{'RANK': str(rank)}}; for the same variables in every worker use env=")
    pin = options.get("pin")
    if pin not in (None, False, True):
        raise TypeError(f"pin={pin!r}: give True (each worker its own CPUs) or False")
    if pin and not hasattr(os, "sched_setaffinity"):
        raise ValueError("pin=True needs os.sched_setaffinity, which this platform (e.g. macOS, Windows) "
                         "does not have: drop pin=True here")
    sizes = {name: parse_size(options.get(name), name) for name in ("max_memory", "soft_memory")}
    if sizes["max_memory"] is not None and sizes["soft_memory"] is not None \
            and sizes["soft_memory"] >= sizes["max_memory"]:
        raise ValueError(f"soft_memory={options['soft_memory']!r} is not below max_memory="
                         f"{options['max_memory']!r}: a worker would be killed before it is recycled; "
                         f"give a smaller soft_memory")
    _gpu_ids(options.get("gpus"), discover=False)


def resolve(options: Mapping[str, Any], workers: int, pool_env: Mapping[str, str] = {}) -> Resources:
    """The :class:`Resources` of a local pool of ``workers`` slots (``options``
    checked); the pool's ``env=`` wins over the thread caps of ``pin``."""
    ranks = range(workers)
    envs: list[dict[str, str]] = [{} for _ in ranks]
    cpus: tuple[frozenset[int], ...] = ()
    devices: tuple[str, ...] = ()
    if options.get("pin"):
        cpus = _cpu_sets(workers)
        for env, cpu_set in zip(envs, cpus):
            caps = limits.thread_env(1, len(cpu_set))  # thread caps follow the set
            env.update((k, v) for k, v in caps.items() if k not in pool_env)
    ids = _gpu_ids(options.get("gpus"), discover=True)
    if ids:
        devices = tuple(ids[rank % len(ids)] for rank in ranks)
        for env, device in zip(envs, devices):
            env.update(dict.fromkeys(GPU_VARS, device))
    make = options.get("worker_env")
    if make is not None:
        for rank, env in zip(ranks, envs):
            env.update(_worker_env(make, rank))
    return Resources(tuple(envs) if any(envs) else (), cpus, devices,
                     parse_size(options.get("max_memory"), "max_memory"),
                     parse_size(options.get("soft_memory"), "soft_memory"), given(options))


def _worker_env(make: Callable[[int], Any], rank: int) -> dict[str, str]:
    env = make(rank)
    if env is None:
        return {}
    if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError(f"worker_env({rank}) returned {env!r}: it must return a dict of str to str "
                        f"(environment variables), e.g. {{'RANK': str(rank)}}")
    return dict(env)


# ---------------------------------------------------------------- CPUs


def _cpu_sets(workers: int) -> tuple[frozenset[int], ...]:
    """``workers`` disjoint CPU sets, as even as they can be, of the CPUs this process may use."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < workers:
        raise ValueError(
            f"pin=True gives each worker its own CPUs, but this process may use {len(usable)} CPUs "
            f"({_ranges(usable)}) and the pool has {workers} workers: use workers={len(usable)} or fewer "
            f"with pin=True, or drop pin=True to let the workers share the CPUs")
    size, extra = divmod(len(usable), workers)
    sets, start = [], 0
    for rank in range(workers):
        end = start + size + (rank < extra)
        sets.append(frozenset(usable[start:end]))
        start = end
    return tuple(sets)


def _ranges(cpus: Iterable[int]) -> str:
    """``0-3,8`` for CPUs 0, 1, 2, 3 and 8."""
    parts: list[list[int]] = []
    for cpu in sorted(cpus):
        if parts and parts[-1][1] == cpu - 1:
            parts[-1][1] = cpu
        else:
            parts.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def cpu_label(cpus: frozenset[int] | None) -> str | None:
    return None if cpus is None else "CPU " + _ranges(cpus)


def pin(pid: int, cpus: frozenset[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus``; threads it starts later inherit it."""
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass  # a thread that just ended


# ---------------------------------------------------------------- memory


class MemoryProbe:
    """Reads one process's resident memory (psutil: on Linux one small read of /proc)."""

    __slots__ = ("pid", "last", "_process")

    def __init__(self, pid: int):
        self.pid = pid
        self.last = 0  # bytes at the last sample
        self._process: Any = None

    def sample(self) -> int:
        import psutil

        try:
            if self._process is None:
                self._process = psutil.Process(self.pid)
            self.last = self._process.memory_info().rss
        except psutil.Error:
            pass  # it ended: its sentinel says so
        return self.last


# ---------------------------------------------------------------- GPUs


def _gpu_ids(gpus: Any, discover: bool) -> list[str]:
    if gpus is None:
        return []
    if gpus == "auto":
        if not discover:
            return []
        found = find_gpus()
        if not found:
            raise ValueError(f"gpus='auto' found no GPU here (it looked at {GPU_SOURCES}): pass the "
                             f"device ids, e.g. gpus=[0, 1], or drop gpus=")
        return found
    if isinstance(gpus, int) and not isinstance(gpus, bool):
        if gpus < 1:
            raise ValueError(f"gpus={gpus}: give a number of devices of 1 or more, a list of ids, or 'auto'")
        return [str(i) for i in range(gpus)]
    if isinstance(gpus, (list, tuple)) and gpus and all(
            isinstance(g, (int, str)) and not isinstance(g, bool) and str(g).strip() for g in gpus):
        return [str(g).strip() for g in gpus]
    raise TypeError(f"gpus={gpus!r}: give 'auto', a number of devices (gpus=2 for ids 0 and 1), "
                    f"or a list of device ids or UUIDs, e.g. gpus=[0, 1]")


def find_gpus() -> list[str]:
    """The GPUs of this machine, without importing a GPU library (see :data:`GPU_SOURCES`)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # this process was given devices: share those
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        found = re.findall(r"^GPU (\d+):", listing, re.MULTILINE)
        if found:
            return found
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        pass
    try:
        nodes = [n for n in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", n)]
    except OSError:
        nodes = []
    return [str(i) for i in range(len(nodes))]


# ---------------------------------------------------------------- sizes

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024 ** 2, "mib": 1024 ** 2, "mb": 1000 ** 2,
          "g": 1024 ** 3, "gib": 1024 ** 3, "gb": 1000 ** 3, "t": 1024 ** 4, "tib": 1024 ** 4, "tb": 1000 ** 4}


def parse_size(value: Any, name: str) -> int | None:
    """Bytes from an int or a size such as ``"2GiB"``, ``"500MB"``, ``"1.5G"`` (G: GiB)."""
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match and unit in _UNITS:
            number = float(match.group(1)) * _UNITS[unit]
    if number is None or number < 1:
        raise ValueError(f"{name}={value!r}: give a size per worker as bytes (an int) or a string such as "
                         f"'2GiB', '500MB' or '1.5G'")
    return int(number)
