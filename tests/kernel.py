"""Real Jupyter kernels for the tests.

In a pytest process ``__main__`` is pytest itself, so the bug mpnb fixes cannot
be reproduced there.  These helpers start a real ipykernel, either to run a
notebook from ``mpnb/notebooks/`` through nbclient or to execute cells one by one
(for interrupts and timing).

Every kernel started here carries a unique ``MPNB_TEST_TAG`` in its
environment.  Every process it starts inherits it, so :func:`leftovers` finds
them even after they were re-parented to init.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    import nbformat

# jupyter_client, nbclient and nbformat are imported where they are used: a
# worker that unpickles a test module's task function imports the module, and
# with them that import took 1.8 s (every worker a test starts paid it)

from mpnb.demo import shown

import mpnb

# the directory above tests/: the checkout, or the copy of the tests that
# `MPNB_INSTALL=wheel scripts/test` runs against an installed wheel
ROOT = Path(__file__).resolve().parents[1]
# the checkout the wheel is built from (the tests' own parent, unless told)
SOURCE = Path(os.environ.get("MPNB_SOURCE") or ROOT)
# the notebooks of the mpnb under test: package data, wherever it is installed
NOTEBOOKS = Path(mpnb.__file__).resolve().parent / "notebooks"
TAG_VAR = "MPNB_TEST_TAG"


KERNEL_NAME = "mpnb-test"


def install_kernelspec() -> None:
    """A kernelspec for *this* interpreter, ahead of any user-wide ``python3``; called once,
    by the process that runs the tests (conftest.py): the workers that import a test module
    for its task functions must not make one (they end without running ``atexit``)."""
    root = Path(tempfile.mkdtemp(prefix="mpnb-kernelspec-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} (mpnb tests)",
        "language": "python",
    }))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    )


def wait_until(condition, what: str, deadline: float = 60.0) -> None:
    """Wait for ``condition()``; fail naming ``what`` after ``deadline`` seconds
    (generous: the suite must pass on a busy machine)."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline} s")
        time.sleep(0.02)


def new_tag() -> str:
    return uuid.uuid4().hex


def kernel_env(tag: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env[TAG_VAR] = tag
    # a kernel must never reuse the caller's cell-module directory
    env.pop("MPNB_CELL_DIR", None)
    # ipykernel stops capturing its children's output when it thinks it runs
    # under pytest; these kernels must behave as they do for users
    env.pop("PYTEST_CURRENT_TEST", None)
    env.update(extra or {})
    return env


def leftovers(tag: str) -> list[psutil.Process]:
    """Processes alive (not zombies) that inherited ``tag``."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def assert_no_leftovers(tag: str, within: float = 10.0) -> None:
    """Fail if any process tagged ``tag`` is still alive after ``within`` s.

    The spare workers of this process are ended first: they belong to the
    process, waiting for its next pool, not to the pool that closed."""
    from mpnb.backends.launcher import end_spares

    deadline = time.monotonic() + within
    while True:
        end_spares()  # again each time: a pool dropped just before may still be closing
        alive = leftovers(tag)
        if not alive:
            return
        if time.monotonic() > deadline:
            described = []
            for p in alive:
                try:
                    # name, state and parent tell a worker from its guardian, stopped or not
                    described.append(f"{p.pid} ({p.name()}, {p.status()}, parent {p.ppid()}) "
                                     f"{' '.join(p.cmdline())[:200]}")
                except psutil.Error:
                    described.append(str(p.pid))
            for p in alive:  # do not let one failure poison the next tests
                try:
                    p.kill()
                except psutil.Error:
                    pass
            raise AssertionError("processes left behind:\n" + "\n".join(described))
        time.sleep(0.1)


# ---------------------------------------------------------------- notebooks


def parameter_cell(parameters: dict[str, Any]) -> nbformat.NotebookNode:
    source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    import nbformat

    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    return cell


def load_notebook(name_or_cells: str | Path | list[str]) -> nbformat.NotebookNode:
    import nbformat

    if isinstance(name_or_cells, list):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(src) for src in name_or_cells]
        return nb
    path = Path(name_or_cells)
    if not path.is_absolute():
        path = NOTEBOOKS / path
    return nbformat.read(path, as_version=4)


def run_notebook(
    name_or_cells: str | Path | list[str],
    parameters: dict[str, Any] | None = None,
    *,
    tag: str | None = None,
    timeout: int = 120,
    allow_errors: bool = False,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> nbformat.NotebookNode:
    """Execute a notebook in a fresh real kernel and return it with outputs.

    ``parameters`` become a first cell (as papermill does).  The kernel is
    shut down afterwards; the caller checks :func:`leftovers` with ``tag``.
    """
    nb = load_notebook(name_or_cells)
    if parameters:
        nb.cells.insert(0, parameter_cell(parameters))
    from nbclient import NotebookClient

    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=KERNEL_NAME,
        allow_errors=allow_errors,
        resources={"metadata": {"path": str(cwd or ROOT)}},
    )
    client.execute(env=kernel_env(tag or new_tag(), env))
    return nb


cell_text = shown  # everything a code cell showed, as text


def notebook_errors(nb: nbformat.NotebookNode) -> list[str]:
    return [
        f"cell {i}: {out.ename}: {out.evalue}"
        for i, cell in enumerate(nb.cells)
        for out in cell.get("outputs", [])
        if out.output_type == "error"
    ]


# ------------------------------------------------------ cell-by-cell kernel


@dataclass
class Reply:
    """What one execute request produced."""

    status: str
    stdout: str = ""
    stderr: str = ""
    results: list[str] = field(default_factory=list)
    displays: list[dict[str, Any]] = field(default_factory=list)
    ename: str = ""
    evalue: str = ""
    traceback: str = ""
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return self.stdout + self.stderr + "".join(self.results)

    def ok(self) -> "Reply":
        assert self.status == "ok", f"{self.ename}: {self.evalue}\n{self.traceback}"
        return self


class Kernel:
    """A real ipykernel driven one cell at a time."""

    def __init__(self, tag: str | None = None, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.tag = tag or new_tag()
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name=KERNEL_NAME)
        self.km.start_kernel(env=kernel_env(self.tag, env), cwd=str(cwd or ROOT))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid  # type: ignore[union-attr]

    def submit(self, code: str) -> str:
        """Send a cell without waiting; returns the message id."""
        # ipykernel 6 goes on aborting requests for a moment after an error
        # reply, so on a busy machine the next cell, sent only after that
        # reply, could be aborted unrun; the cells here are sent one by one
        return self.kc.execute(code, store_history=True, stop_on_error=False)

    def collect(self, msg_id: str, timeout: float = 120) -> Reply:
        """Gather the outputs of ``msg_id`` until the kernel is idle again."""
        start = time.monotonic()
        reply = Reply(status="ok")
        deadline = start + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cell did not finish in {timeout} s; so far: {reply}")
            try:
                msg = self.kc.get_iopub_msg(timeout=remaining)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    reply.stdout += content["text"]
                else:
                    reply.stderr += content["text"]
            elif kind == "execute_result":
                reply.results.append(content["data"].get("text/plain", ""))
            elif kind == "display_data":
                reply.displays.append(content["data"])
            elif kind == "error":
                reply.status = "error"
                reply.ename, reply.evalue = content["ename"], content["evalue"]
                reply.traceback = "\n".join(content["traceback"])
            elif kind == "status" and content["execution_state"] == "idle":
                reply.seconds = time.monotonic() - start
                return reply

    def run(self, code: str, timeout: float = 120) -> Reply:
        return self.collect(self.submit(code), timeout)

    def restart(self) -> None:
        """Restart the kernel as Jupyter's restart button does, then wait for it.

        A request sent while the old kernel goes away can be lost with its
        socket, so wait until the new kernel answers before the next cell.
        """
        self.km.restart_kernel(now=False)
        self._wait_answering()

    def _wait_answering(self, deadline: float = 60.0) -> None:
        """Until the kernel answers a request on shell and publishes its status
        for it on iopub. After a restart, ``wait_for_ready`` can return on a
        reply queued before it (jupyter_client 8.0), a request sent before the
        new kernel listens is lost, and so are iopub messages that reach it
        before the client's subscription does; so ask until both come back."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            msg_id = self.kc.kernel_info()
            reply = status = False
            ask_again = time.monotonic() + 2.0
            while not (reply and status) and time.monotonic() < ask_again:
                for get, seen in ((self.kc.get_shell_msg, "reply"), (self.kc.get_iopub_msg, "status")):
                    try:
                        msg = get(timeout=0.05)
                    except queue.Empty:
                        continue
                    if msg["parent_header"].get("msg_id") == msg_id:
                        reply, status = reply or seen == "reply", status or seen == "status"
            if reply and status:
                return
        raise TimeoutError(f"the kernel did not answer within {deadline} s of its restart")

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def shutdown(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=False)

    def kill(self) -> None:
        """SIGKILL the kernel process, as an OOM killer or a crash would."""
        os.kill(self.pid, 9)
        self.kc.stop_channels()
        self.km.cleanup_resources()


def python_version_label() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"
