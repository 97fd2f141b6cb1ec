"""A real JupyterLab and a real chromium for the browser test.

::

    pytest process                     JupyterLab server (tagged env)       chromium
    --------------                     ------------------------------       --------
    lab_server(root, tag) --spawn----> 127.0.0.1:<free port>, token  <-HTTP- page
      poll /api/status (token)         root: a temp dir with the notebook    (Playwright)
                                         \\-> kernel (mpnb-test spec)
                                               \\-> pool workers
    open_chromium() --Playwright-----------------------------------------> headless,
                                                                           temp profile

The server is started from the test's interpreter with everything that could
reach the network turned off (news, update checks, the extension manager's
PyPI look-ups), a private config, settings and workspace directory, and
``expose_app_in_browser`` so the page can run JupyterLab commands.  Its
environment carries the test's ``MPNB_TEST_TAG``; the kernels and workers it
starts inherit it, so :func:`kernel.assert_no_leftovers` finds any of them
after the server is gone.

Chromium is Debian's (``shutil.which("chromium")``), launched by Playwright
with a fixed set of flags; browsers are never downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from kernel import TAG_VAR, kernel_env

__all__ = ["LabServer", "PageLog", "chromium_path", "lab_server", "open_chromium"]

# how long the server may take to answer /api/status, and to stop
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# frontend plugins that fetch from the internet; disabled in page_config.json
DISABLED_PLUGINS = {
    # Jupyter news and "a newer version is available"
    "@jupyterlab/apputils-extension:announcements": True,
    # lists and searches PyPI
    "@jupyterlab/extensionmanager-extension": True,
}

# settings: every cell rendered (no windowing), so the DOM holds the whole notebook
USER_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def chromium_path() -> str | None:
    """Debian's chromium on ``PATH``, or ``None``."""
    return shutil.which("chromium")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LabServer:
    """A running JupyterLab: its address, token, root directory and log."""

    process: subprocess.Popen
    port: int
    token: str
    root: Path
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lab_url(self, notebook: str) -> str:
        return f"{self.base_url}/lab/tree/{notebook}?token={self.token}&reset"

    def request(self, path: str, method: str = "GET", timeout: float = 10.0) -> Any:
        """Call the REST API with the token; the decoded JSON reply (or None)."""
        req = urllib.request.Request(
            self.base_url + path,
            method=method,
            headers={"Authorization": f"token {self.token}"},
            data=b"" if method == "POST" else None,
        )
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            body = reply.read()
        return json.loads(body) if body else None

    def log(self, tail: int = 6000) -> str:
        """The end of the server's output (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError as exc:
            return f"(no server log: {exc})"

    def kernels(self) -> list[dict[str, Any]]:
        return self.request("/api/kernels")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"JupyterLab exited with status {self.process.returncode} before it was ready.\n"
                    f"server log:\n{self.log()}"
                )
            try:
                self.request("/api/status", timeout=2.0)
                return
            except (OSError, urllib.error.URLError) as exc:
                last_error = exc
            time.sleep(0.2)
        raise RuntimeError(
            f"JupyterLab did not answer /api/status within {START_TIMEOUT:.0f} s "
            f"(last error: {last_error!r}).\nserver log:\n{self.log()}"
        )

    def stop(self) -> None:
        """Ask the server to shut down (it stops its kernels); kill it if it will not."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.request("/api/shutdown", method="POST")
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()


def _write_private_config(home: Path) -> dict[str, str]:
    """Config, settings and workspace directories of this server alone."""
    config = home / "config"
    labconfig = config / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": DISABLED_PLUGINS}))
    settings = home / "user-settings"
    for name, values in USER_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    for name in ("workspaces", "runtime", "data"):
        (home / name).mkdir()
    return {
        "JUPYTER_CONFIG_DIR": str(config),
        # the notebook-signing key and runtime files, away from the user's own
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }


@contextlib.contextmanager
def lab_server(root: Path, tag: str) -> Iterator[LabServer]:
    """Run JupyterLab on ``root`` (a temporary directory) until the block ends.

    The server, its kernels and their workers carry ``tag``.  On exit the
    server is shut down through its API; the caller checks for leftovers.
    """
    home = Path(tempfile.mkdtemp(prefix="mpnb-lab-"))
    try:
        env = kernel_env(tag, _write_private_config(home))
        port, token = _free_port(), secrets.token_hex(24)
        log_path = home / "server.log"
        argv = [
            sys.executable, "-m", "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            "--ServerApp.terminals_enabled=False",
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        server = LabServer(process, port, token, root, log_path)
        try:
            server._wait_ready()
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class PageLog:
    """What the page said: console errors, uncaught exceptions, outside requests."""

    errors: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)

    def attach(self, page: Any, base_url: str) -> None:
        def on_console(msg: Any) -> None:
            if msg.type == "error":
                where = f"{msg.location.get('url', '')}:{msg.location.get('lineNumber', '')}"
                self.errors.append(f"console.error: {msg.text} ({where})")

        def on_request(request: Any) -> None:
            url = request.url
            if not url.startswith((base_url, "ws://127.0.0.1", "data:", "blob:", "about:")):
                self.outside_requests.append(url)

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("request", on_request)


@contextlib.contextmanager
def open_chromium(playwright: Any, tag: str) -> Iterator[Any]:
    """Debian's chromium, headless, with a fresh profile; the browser object.

    Its processes carry ``tag`` too, so a chromium left running is found.
    """
    executable = chromium_path()
    if executable is None:
        raise RuntimeError("chromium is not on PATH; scripts/test installs Debian's chromium package")
    browser = playwright.chromium.launch(
        executable_path=executable,
        args=CHROMIUM_ARGS,
        headless=True,
        env={**os.environ, TAG_VAR: tag},
    )
    try:
        yield browser
    finally:
        browser.close()
