"""A real dask.distributed cluster for the tests: a scheduler and workers as
separate processes on 127.0.0.1, started with the ``dask`` command of this
interpreter.

Every process carries an ``MPNB_TEST_TAG``, so :func:`kernel.leftovers`
finds them, and none inherits a cell-module directory: the workers know
nothing of any notebook, as on other machines.  Workers run without a nanny
(one process each) to spare the test machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kernel import TAG_VAR

# a slow, loaded machine may need this long for dask to start
START_TIMEOUT = 60.0


class Cluster:
    """A scheduler and ``workers`` workers (``threads`` threads each)."""

    def __init__(self, tag: str, workers: int = 2, threads: int = 1, worker_args: tuple[str, ...] = ()):
        self.tag = tag
        self.root = Path(tempfile.mkdtemp(prefix="mpnb-dask-"))
        self.env = dict(os.environ, **{TAG_VAR: tag})
        self.env.pop("MPNB_CELL_DIR", None)
        self.env.pop("PYTEST_CURRENT_TEST", None)
        self.processes: list[subprocess.Popen] = []
        try:
            self.address = self._start_scheduler()
            for n in range(workers):
                self._start_worker(n, threads, worker_args)
            if workers:
                self._wait_for_workers(workers)
        except BaseException:
            self.stop()
            raise

    def _dask(self, *args: str, log: str) -> subprocess.Popen:
        dask = [sys.executable, "-m", "distributed.cli.dask_" + args[0]]
        out = open(self.root / log, "wb")
        proc = subprocess.Popen([*dask, *args[1:]], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=self.root)
        out.close()
        self.processes.append(proc)
        return proc

    def _start_scheduler(self) -> str:
        info = self.root / "scheduler.json"
        proc = self._dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                          "--scheduler-file", str(info), log="scheduler.log")
        deadline = time.monotonic() + START_TIMEOUT
        while not info.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dask scheduler did not start:\n{self.log('scheduler.log')}")
            time.sleep(0.05)
        while True:  # written in one go, but read it only when complete
            try:
                return json.loads(info.read_text())["address"]
            except (json.JSONDecodeError, KeyError):
                time.sleep(0.05)

    def _start_worker(self, n: int, threads: int, extra: tuple[str, ...]) -> None:
        self._dask("worker", self.address, "--host", "127.0.0.1", "--nthreads", str(threads),
                   "--no-nanny", "--no-dashboard", "--name", f"w{n}",
                   "--local-directory", str(self.root / f"w{n}"), *extra, log=f"worker{n}.log")

    def _wait_for_workers(self, count: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=START_TIMEOUT, set_as_default=False) as client:
            client.wait_for_workers(count, timeout=START_TIMEOUT)

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """End every process (workers first) and delete the directories."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)
