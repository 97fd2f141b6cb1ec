"""An earlier revision of mpnb as one more contender, in the same run.

``python -m benchmarks --baseline REV`` extracts ``mpnb/`` at the git revision
REV of this repository into a temporary directory and adds the contender
``mpnb.Pool (exec) @REV``.  Two versions of mpnb cannot be imported in one
process, so that contender lives in a child interpreter with the directory
first on ``sys.path`` (its workers find the same copy: the exec launcher puts
its own mpnb first, then the child's ``sys.path``)::

    benchmark process (this mpnb)            child interpreter (mpnb @REV)
    run.main ─ Baseline.round() ── Round ──▶ serve(): workloads.one_round(...)
                                ◀─ RoundDone ─ figures, timed in the child

The child times the same calls with the same code as the contenders in the
benchmark process (:func:`benchmarks.workloads.one_round`), so the pipe is
never inside a measurement; its memory figures are the child's process tree.
It makes the large array and the pandas frame itself, from the same seeds.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import traceback
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path

from benchmarks.measure import Figure
from benchmarks.workloads import UNITS, Sizes

ROOT = Path(__file__).resolve().parents[1]
ROUND_TIMEOUT = 900.0  # seconds: a full round on a busy machine takes about 60


# ------------------------------------------------------------------ messages


@dataclass(frozen=True)
class Start:
    """Parent to child: the sizes of every round; answered by ``Ready``."""

    sizes: Sizes
    name: str


@dataclass(frozen=True)
class Ready:
    """Child to parent: where the child's mpnb and its workers' mpnb come from."""

    mpnb_file: str
    worker_mpnb_file: str


@dataclass(frozen=True)
class Round:
    """Parent to child: run every workload once on a fresh pool."""


@dataclass(frozen=True)
class RoundDone:
    """Child to parent: one value per column key, as ``one_round`` measured it."""

    values: dict[str, float]


@dataclass(frozen=True)
class Failed:
    """Child to parent: the child could not do what it was asked."""

    traceback: str


@dataclass(frozen=True)
class Stop:
    """Parent to child: shut down and exit."""


# ------------------------------------------------------------------ parent side


def resolve(rev: str) -> tuple[str, str]:
    """The commit ``rev`` names in this repository, and its subject."""
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode:
        raise SystemExit(f"--baseline {rev}: this repository ({ROOT}) has no such revision; "
                         "give a branch, tag or commit it has, for example --baseline main.")
    commit = found.stdout.strip()
    subject = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%s", commit],
                             capture_output=True, text=True).stdout.strip()
    return commit, subject


def extract(rev: str, commit: str, into: str) -> None:
    """``mpnb/`` at ``commit`` (which ``rev`` names) under ``into``, byte-compiled."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "mpnb"], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"--baseline {rev}: revision {commit[:12]} has no mpnb/ directory to compare with "
                         f"({archive.stderr.decode(errors='replace').strip()}); give a later revision.")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    import compileall

    # the installed mpnb has its bytecode cached; the baseline must not pay for compiling
    compileall.compile_dir(os.path.join(into, "mpnb"), quiet=2)


class Baseline:
    """The contender ``mpnb.Pool (exec) @REV``, driven in a child interpreter.

    Creating it resolves the revision (a wrong one stops the run before it
    starts anything); ``start()`` extracts it and starts the child; ``round(figures)``
    appends one value to each of ``figures``; ``close()`` stops the child and
    removes the directory.
    """

    def __init__(self, rev: str):
        self.rev = rev
        self.name = f"mpnb.Pool (exec) @{rev}"
        self.commit, self.subject = resolve(rev)
        self.pid = 0
        self._dir = ""
        self._child: subprocess.Popen | None = None
        self._conn: Connection | None = None

    def start(self, sizes: Sizes) -> None:
        self._dir = tempfile.mkdtemp(prefix="mpnb-bench-baseline-")
        extract(self.rev, self.commit, self._dir)
        ours, theirs = Pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [self._dir, str(ROOT), env.get("PYTHONPATH")]))
        # -P: no current directory first on sys.path, where this checkout's mpnb/ would win
        code = f"from benchmarks.baseline import child_main; child_main({theirs.fileno()})"
        self._child = subprocess.Popen([sys.executable, "-P", "-c", code], cwd=str(ROOT), env=env,
                                       pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn, self.pid = ours, self._child.pid
        ready = self._ask(Start(sizes, self.name), Ready, timeout=120)
        home = os.path.join(self._dir, "mpnb", "")
        for who, path in (("the child", ready.mpnb_file), ("the child's workers", ready.worker_mpnb_file)):
            if not path.startswith(home):
                raise RuntimeError(f"{self.name}: {who} imported mpnb from {path}, not from the "
                                   f"extracted revision in {home}; the comparison would be void.")

    def round(self, figures: dict) -> None:
        done = self._ask(Round(), RoundDone, timeout=ROUND_TIMEOUT)
        for key, value in done.values.items():
            figures.setdefault(key, Figure(UNITS[key])).values.append(value)  # cpu_steal: not a column

    def _ask(self, request, answer: type, timeout: float):
        assert self._conn is not None, "start() first"
        self._conn.send(request)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.name}: the child interpreter did not answer {request!r} in {timeout:.0f} s")
        try:
            reply = self._conn.recv()
        except EOFError:
            code = self._child.wait(timeout=30) if self._child else None
            raise RuntimeError(f"{self.name}: the child interpreter ended (exit code {code}) before it "
                               "answered; whatever it printed is above, on stderr") from None
        if isinstance(reply, Failed):
            raise RuntimeError(f"{self.name} failed in the child interpreter:\n{reply.traceback}")
        assert isinstance(reply, answer), reply
        return reply

    def close(self) -> None:
        """Stop the child (its pools are shut down after every round) and remove the copy."""
        try:
            if self._child is not None and self._child.poll() is None:
                try:
                    self._conn.send(Stop())
                    self._child.wait(timeout=60)
                except (OSError, subprocess.TimeoutExpired):
                    self._child.kill()  # the leftover check then names any worker it left
                    self._child.wait()
        finally:
            if self._conn is not None:
                self._conn.close()
            if self._dir:
                shutil.rmtree(self._dir, ignore_errors=True)


# ------------------------------------------------------------------ child side


def _check_workers() -> str:
    """The mpnb file a worker of this mpnb imports (one throwaway pool)."""
    import mpnb

    from benchmarks.tasks import mpnb_file

    pool = mpnb.Pool(1, context="exec")
    try:
        return pool.map(mpnb_file, [0])[0]
    finally:
        pool.shutdown()


def serve(conn: Connection) -> None:
    """Answer the parent's requests until ``Stop`` or the pipe closes."""
    import warnings

    import mpnb
    import mpnb.pool  # noqa: F401  (as import_all does: no cold start pays for an import)

    from benchmarks.contenders import Mpnb
    from benchmarks.measure import Figure
    from benchmarks.workloads import UNITS, one_round, prepare

    warnings.simplefilter("ignore", DeprecationWarning)
    start = conn.recv()
    contender = Mpnb("exec")
    contender.name = start.name
    data = prepare(start.sizes)
    conn.send(Ready(mpnb.__file__, _check_workers()))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if isinstance(request, Stop):
            return
        figures = {key: Figure(unit) for key, unit in UNITS.items()}
        try:
            one_round(contender, start.sizes, data, figures)
        except Exception:
            conn.send(Failed(traceback.format_exc()))
            continue
        conn.send(RoundDone({key: figure.values[0] for key, figure in figures.items()}))


def child_main(fd: int) -> None:
    """The child interpreter's entry: serve the parent over the pipe at ``fd``."""
    channel = Connection(fd)
    try:
        serve(channel)
    except Exception:
        channel.send(Failed(traceback.format_exc()))
        raise
