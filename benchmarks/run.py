"""The benchmark: rounds of every workload for every contender, then a table.

The workloads are in :mod:`benchmarks.workloads`.

In a real kernel, mpnb alone: the same pool workloads with and without the
live widget, and the overhead of a ``%%mppool`` cell over a plain one.

With ``--baseline REV`` (repeatable), mpnb at that git revision is one more
contender, run in a child interpreter that times its own calls
(:mod:`benchmarks.baseline`); ``--baseline HEAD`` puts this revision under
the same conditions as the earlier one;
``--only NAME`` keeps the contenders whose name contains NAME.

Rounds interleave the contenders and the floor's measurements
(A B C ... F, B C ... F A, ...).  At the end every
pool is shut down, the stdlib's and loky's helper processes are stopped, and
the run fails if any child process (or any process carrying the run's tag in
its environment) or new file in ``/dev/shm`` or the temp
directory is left.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import psutil

from benchmarks.baseline import Baseline
from benchmarks.contenders import THREAD_POOLS, WORKERS, all_contenders, import_all
from benchmarks.floor import ROWS as FLOOR_ROWS
from benchmarks.floor import floor_round
from benchmarks.measure import Figure, Layout, table
from benchmarks.workloads import FULL, HIGHER_IS_BETTER, QUICK, UNITS, Sizes, columns, one_round, prepare

ROOT = Path(__file__).resolve().parents[1]
_T0 = time.perf_counter()
REFERENCE = "mpnb.Pool (exec)"  # the ratios are to this contender where no peer ran (--only mpnb)
FLOOR = "the floor"  # its place in the rotation: the floor is measured between contenders
KERNEL_ROWS = ["mpnb.Pool (exec) in a kernel", "mpnb.Pool (exec) in a kernel, live widget"]
#: in the environment of every process the run starts, so the leftover check
#: finds them even when their parent has gone (a baseline child's workers)
TAG_VAR = "MPNB_BENCH_TAG"


# ------------------------------------------------------------------ kernel


class BenchKernel:
    """A real ipykernel of this interpreter, run from the repository root."""

    def __init__(self) -> None:
        from jupyter_client.manager import KernelManager

        self._spec_dir = Path(tempfile.mkdtemp(prefix="mpnb-bench-kernelspec-"))
        spec = self._spec_dir / "kernels" / "mpnb-bench"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "mpnb benchmark", "language": "python",
        }))
        paths = [str(self._spec_dir), os.environ.get("JUPYTER_PATH")]
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, paths))
        self.km = KernelManager(kernel_name="mpnb-bench")
        self.km.start_kernel(cwd=str(ROOT))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 600) -> tuple[float, str]:
        """Execute a cell; return (seconds from request to idle, its stdout)."""
        start = time.perf_counter()
        msg_id = self.kc.execute(code)
        out, deadline = [], time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"the kernel did not finish {code!r} in {timeout} s") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                out.append(content["text"])
            elif kind == "error":
                raise RuntimeError(f"the kernel failed on {code!r}: {content['ename']}: {content['evalue']}")
            elif kind == "status" and content["execution_state"] == "idle":
                return time.perf_counter() - start, "".join(out)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)
        shutil.rmtree(self._spec_dir, ignore_errors=True)


def kernel_rounds(sizes: Sizes) -> tuple[dict[str, dict[str, Figure]], dict[str, Figure], bool]:
    """mpnb in a kernel with and without the live widget; ``%%mppool`` cells."""
    pools = {name: {key: Figure(UNITS[key]) for key in ("cold", "next", "warm", "cs1", "auto")}
             for name in KERNEL_ROWS}
    cells = {name: Figure("ms") for name in ("plain cell: def", "%%mppool cell: def",
                                             "%%mppool -n 2 cell: def + map of 2 tasks (warm pool)")}
    kernel = BenchKernel()
    try:
        kernel.run("%load_ext mpnb\nimport benchmarks.kernel_side as _bench")
        _, out = kernel.run("print(_bench.has_live_widget())")
        live = out.strip() == "True"
        kernel.run("%%mppool -n 2\nwarm = pool.map(abs, [1, 2])")  # start the cell pool once
        for n in range(sizes.rounds):
            for name, flag in zip(pools, (False, True)):
                _, out = kernel.run(f"_bench.pool_round({flag}, {sizes.tasks}, {sizes.auto})")
                for key, value in json.loads(out.strip().splitlines()[-1]).items():
                    pools[name][key].values.append(value * 1e3 if UNITS[key] == "ms" else value)
            body = f"def f_{n}(x):\n    return x + {n}\n"
            cells["plain cell: def"].values.append(kernel.run(body)[0] * 1e3)
            cells["%%mppool cell: def"].values.append(kernel.run(f"%%mppool\n{body.replace('f_', 'g_')}")[0] * 1e3)
            seconds, _ = kernel.run(f"%%mppool -n 2\n{body.replace('f_', 'h_')}r = pool.map(h_{n}, range(2))")
            cells["%%mppool -n 2 cell: def + map of 2 tasks (warm pool)"].values.append(seconds * 1e3)
        kernel.run("pool.shutdown()")
    finally:
        kernel.close()
    if not live:
        del pools[KERNEL_ROWS[1]]
    return pools, cells, live


# ----------------------------------------------------------------- cleanup


def _stop_helpers() -> None:
    """Stop the helper processes the stdlib and loky keep for the whole run."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker
    import multiprocessing.util

    from joblib.externals.loky.backend import resource_tracker as joblib_tracker
    from loky.backend import resource_tracker as loky_tracker

    # what exit would run first: the closed pools' semaphores are unlinked (and
    # unregistered) now, while their tracker runs; stopped first, it would
    # unlink them itself, warn of leaks, and their finalizers fail at exit
    multiprocessing.util._run_finalizers(0)  # type: ignore[attr-defined]
    multiprocessing.forkserver._forkserver._stop()
    for tracker in (multiprocessing.resource_tracker, loky_tracker, joblib_tracker):
        tracker._resource_tracker._stop()


def _private_tempdir() -> str:
    """A temp directory for this run and its children, so what is left there is ours."""
    import multiprocessing.util

    multiprocessing.util.get_temp_dir()  # in the usual place: multiprocessing removes it at exit
    path = tempfile.mkdtemp(prefix="mpnb-bench-")
    os.environ["TMPDIR"] = tempfile.tempdir = path
    return path


def _leftovers(tmp: str, shm_before: set[str], pids: set[int], within: float = 15.0) -> list[str]:
    """Processes still alive that this process started or that carry the run's
    tag; files left in ``tmp``; new ``/dev/shm`` entries named after one of
    ``pids`` (mpnb's and joblib's carry their creator's pid).  The empty
    per-user directory ``%load_ext mpnb`` keeps is not counted."""
    deadline = time.monotonic() + within
    while True:
        found = [f"process {p.pid} {' '.join(p.cmdline())[:120]}" for p in _our_processes()]
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            # %load_ext mpnb keeps its per-user directory, empty, by design
            if name == f"mpnb-{os.getuid()}" and not os.listdir(path):
                continue
            found.append(f"file {path}")
        found += [f"file /dev/shm/{name}" for name in sorted(_shm() - shm_before)
                  if any(str(pid) in name for pid in pids)]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _our_processes() -> list[psutil.Process]:
    """Live descendants of this process, and live processes carrying the run's tag."""
    me, tag = psutil.Process(), os.environ[TAG_VAR]
    found = {p.pid: p for p in me.children(recursive=True)}
    for proc in psutil.process_iter():
        try:
            if proc.pid != me.pid and proc.environ().get(TAG_VAR) == tag:
                found[proc.pid] = proc
        except psutil.Error:
            pass  # another user's process, or one that just ended
    alive = []
    for proc in found.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


# ------------------------------------------------------------------ report


def machine() -> str:
    cores = psutil.cpu_count(logical=False)
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} logical CPUs ({cores} cores), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
            f"{WORKERS} workers per pool")


def versions() -> str:
    """The versions of the libraries raced; one not installed (a free-threaded build
    may lack some) is said so, after the run, instead of losing it."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    names = ("mpnb", "loky", "joblib", "mpire", "pebble", "cloudpickle", "numpy")
    return ", ".join(f"{name} {of(name)}" for name in names)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one round, small sizes")
    parser.add_argument("--rounds", type=int, help="rounds of every workload (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument("--no-kernel", action="store_true", help="skip the workloads in a Jupyter kernel")
    parser.add_argument("--baseline", metavar="REV", action="append",
                        help="add mpnb at this git revision (a branch, tag or commit of this repository) "
                             "as the contender 'mpnb.Pool (exec) @REV', run in a child interpreter; "
                             "may be repeated")
    parser.add_argument("--only", metavar="NAME", action="append",
                        help="run only the contenders whose name contains NAME (any case; may be repeated), "
                             "for example --only mpnb")
    return parser.parse_args(argv)


def _chosen(names: list[str], only: list[str] | None) -> list[str]:
    """The names ``--only`` keeps (all without it)."""
    if not only:
        return names
    kept = [name for name in names if any(word.lower() in name.lower() for word in only)]
    if not kept:
        raise SystemExit(f"--only {' '.join(only)}: no contender's name contains it; the names are: "
                         + "; ".join(names) + ".")
    return kept


def _rounds(contenders: list, sizes: Sizes, figures: dict[str, dict[str, Figure]]) -> None:
    """Every contender and the floor every round, interleaved; the baseline's round runs in its child."""
    data = prepare(sizes)
    turns = [*contenders, FLOOR]
    for n in range(sizes.rounds):
        # each round starts one contender later, so none always runs first
        shift = n % len(turns)
        for contender in turns[shift:] + turns[:shift]:
            name = getattr(contender, "name", contender)
            print(f"round {n + 1}/{sizes.rounds}: {name}", file=sys.stderr, flush=True)
            if contender is FLOOR:
                floor_round(sizes, data, figures)
            elif isinstance(contender, Baseline):
                contender.round(figures[contender.name])
            else:
                one_round(contender, sizes, data, figures[contender.name])


def _byte_compile() -> None:
    """Compile mpnb's modules and the benchmark's to bytecode, as ``pip install``
    does: where ``PYTHONDONTWRITEBYTECODE`` is set, a checkout's workers would
    otherwise compile them at every start, and the standard library's pools
    load their installed bytecode."""
    import compileall

    import mpnb

    for package in (mpnb, sys.modules[__package__]):
        compileall.compile_dir(os.path.dirname(package.__file__), quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = Sizes(**{**sizes.__dict__, "rounds": args.rounds})
    warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, on 3.12+
    os.environ[TAG_VAR] = uuid.uuid4().hex  # every process of this run inherits it
    contenders: list = all_contenders()
    baselines = [Baseline(rev) for rev in dict.fromkeys(args.baseline or [])]
    contenders[1:1] = baselines  # beside the mpnb they are compared with
    names = _chosen([c.name for c in contenders] + KERNEL_ROWS, args.only)
    contenders = [c for c in contenders if c.name in names]
    tmp, shm_before = _private_tempdir(), _shm()
    _byte_compile()
    started = datetime.datetime.now()
    import_all(contenders)
    figures = {name: {key: Figure(UNITS[key]) for key in columns(sizes)}
               for name in [c.name for c in contenders] + list(FLOOR_ROWS)}
    cells: dict[str, Figure] = {}
    live = False
    try:
        for baseline in baselines:
            if baseline in contenders:
                baseline.start(sizes)
        _rounds(contenders, sizes, figures)
        if not args.no_kernel and set(KERNEL_ROWS) & set(names):
            print("kernel rounds", file=sys.stderr, flush=True)
            pools, cells, live = kernel_rounds(sizes)
            figures.update(pools)
    finally:
        for baseline in baselines:
            baseline.close()
    _stop_helpers()
    left = _leftovers(tmp, shm_before, {os.getpid(), *(b.pid for b in baselines)} - {0})
    if not left:
        shutil.rmtree(tmp, ignore_errors=True)

    report = render(sizes, figures, cells, live, left, started, args, baselines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 1 if left else 0


def _command(args: argparse.Namespace) -> str:
    words = ["python -m benchmarks"]
    words += ["--quick"] if args.quick else []
    words += [f"--rounds {args.rounds}"] if args.rounds else []
    words += [f"--baseline {rev}" for rev in args.baseline or []]
    words += [f"--only {word}" for word in args.only or []]
    words += ["--no-kernel"] if args.no_kernel else []
    return " ".join(words)


def render(sizes, figures, cells, live, left, started, args, baselines: list[Baseline]) -> str:
    heads = columns(sizes)
    layout = Layout(columns=heads, better={k: 1 if UNITS[k] in HIGHER_IS_BETTER else -1 for k in heads},
                    peers=frozenset(name for name in figures if _is_peer(name)),
                    floors={key: row for row, keys in FLOOR_ROWS.items() for key in keys},
                    reference=REFERENCE)
    lines = [
        f"# Benchmark {started:%Y-%m-%d %H:%M}",
        "",
        f"`{_command(args)}`: {sizes.rounds} interleaved rounds, each starting one contender later; "
        "median (min–max), **bold** where it is the best of its column; ×p = the median ÷ the best "
        f"peer's (the best contender not mpnb; ×r = ÷ {REFERENCE}'s where no peer ran); "
        "×f = the median ÷ the floor's or the ideal's (the last rows, measured in the same rounds).",
        "mpnb's and the benchmark's modules are byte-compiled first, as an install is.",
        f"Machine: {machine()}.",
        f"Versions: {versions()}.",
    ]
    for baseline in (b for b in baselines if b.name in figures):
        lines.append(f"{baseline.name}: mpnb at {baseline.commit[:12]} ({baseline.subject}), in a child "
                     "interpreter that times the same calls itself; its memory is that child's process tree.")
    lines += ["", table(figures, layout), ""]
    stolen = [f"{name} {row['cpu_steal'].text()}" for name, row in figures.items()
              if "cpu_steal" in row and row["cpu_steal"].values]
    if stolen:
        tick = 1e3 / os.sysconf("SC_CLK_TCK")
        lines += ["CPU time the host took from this machine (steal, both CPUs together) during each "
                  f"contender's CPU-bound map, in ticks of {tick:g} ms, median (min–max): "
                  + "; ".join(stolen) + ". Each 20 ms of it lengthens the map by 10 to 20 ms: "
                  "0.01 to 0.02 of its speed-up.", ""]
    if cells:
        if not live:
            lines += ["The live widget is not in this mpnb (Pool has no `live=`): measured without it only.", ""]
        cell_layout = Layout(columns={"time": "time"}, better={"time": -1}, peers=frozenset(),
                             reference="plain cell: def")
        lines += ["In a kernel (round trip of an execute request, client side):", "",
                  table({name: {"time": f} for name, f in cells.items()}, cell_layout), ""]
    clean = "no process, no file in /dev/shm or the temp directory."
    lines.append("Left behind: " + ("; ".join(left) if left else clean))
    lines.append("")
    lines.append(f"Run took {time.perf_counter() - _T0:.0f} s.")
    return "\n".join(lines)


def _is_peer(name: str) -> bool:
    """A pool that is not mpnb, and not a floor row: a process pool, the
    peers of mpnb's ratios (a thread pool is the thread engine's, see
    :data:`benchmarks.contenders.THREAD_POOLS`)."""
    return not name.startswith("mpnb") and name not in FLOOR_ROWS and name not in THREAD_POOLS
