"""The live status widget in a real browser.

JupyterLab runs on 127.0.0.1 with a temporary root holding
``mpnb/notebooks/live_status.ipynb``; Debian's chromium, driven by Playwright,
opens it, runs all cells, and the test reads the page's DOM: the contract the
widget keeps (``.mpnb-live``, ``tr.mpnb-worker[data-pid][data-state]``,
``.mpnb-progress``, ``.mpnb-task-progress``, ``.mpnb-cancel``, ``.mpnb-errors``, ``.mpnb-summary``,
``svg.mpnb-timeline rect.mpnb-task``).  Every wait is on a condition of the
page with a generous deadline; a failure shows the page's text, the browser
console and the server's log.  Screenshots go to ``tests/artifacts/``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterator

import nbformat
import psutil
import pytest

from browser import LabServer, PageLog, chromium_path, lab_server, open_chromium
from kernel import KERNEL_NAME, NOTEBOOKS, ROOT, assert_no_leftovers, leftovers

pytestmark = pytest.mark.browser

NOTEBOOK = "live_status.ipynb"
ARTIFACTS = ROOT / "tests" / "artifacts"
WORKERS = 2
LONG_TASKS = 16
FAILING_TASKS, FAILING_INDEX = 8, 3
STATES = {"starting", "idle", "busy", "dead", "restarting"}
# the deadline of each condition of the page; the whole test takes far less
WAIT_MS = 90_000

# the notebook panel is open and its kernel is connected and idle
KERNEL_IDLE = """() => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = panel && panel.sessionContext && panel.sessionContext.session
        && panel.sessionContext.session.kernel;
    return !!(kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle'
        && panel.content && panel.content.widgets.length > 0);
}"""

# the run is over: the kernel is idle and every code cell ran, or one raised
# (JupyterLab stops a run at the first error)
FINISHED = """(panel) => {
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    const cells = [...panel.content.model.cells].filter(c => c.type === 'code');
    const raised = cells.some(c => [...Array(c.outputs.length).keys()]
        .some(i => c.outputs.get(i).type === 'error'));
    return !!kernel && kernel.status === 'idle' && (raised || cells.every(c => c.executionCount !== null));
}"""

ALL_RAN = "() => (" + FINISHED + ")(window.jupyterapp.shell.currentWidget)"

# the live widget shows a row with a pid per worker, one of them busy: what it
# shows; or {finished: true} when the run ended without that
LIVE_ROWS = """(workers) => {
    const live = document.querySelector('.mpnb-live');
    const rows = live ? [...live.querySelectorAll('tr.mpnb-worker')] : [];
    const pids = rows.map(r => parseInt(r.dataset.pid, 10));
    const states = rows.map(r => r.dataset.state);
    if (rows.length !== workers || !pids.every(p => p > 0) || !states.includes('busy'))
        return (""" + FINISHED + """)(window.jupyterapp.shell.currentWidget) && {finished: true};
    const progress = live.querySelector('.mpnb-progress');
    return {
        pids: pids,
        states: states,
        progress: progress && {done: progress.dataset.done, total: progress.dataset.total},
        cancel: live.querySelectorAll('.mpnb-cancel').length,
        errors: live.querySelectorAll('.mpnb-errors').length,
    };
}"""

# a worker row of the live widget shows a task's own progress (mpnb.progress
# with ``note``) past its start, and a bar; what it shows
TASK_PROGRESS = """(note) => {
    const reports = [...document.querySelectorAll('.mpnb-live tr.mpnb-worker .mpnb-task-progress')]
        .filter(r => r.textContent.includes(note) && parseFloat(r.dataset.done) > 0);
    return reports.length > 0 && {
        text: reports[0].textContent, done: reports[0].dataset.done, total: reports[0].dataset.total,
        bars: reports[0].querySelectorAll('span').length,
        header: document.querySelector('.mpnb-live .mpnb-progress').textContent,
    };
}"""

# the live progress counts at least ``done`` tasks
PROGRESS_AT_LEAST = """(done) => {
    const progress = document.querySelector('.mpnb-live .mpnb-progress');
    return !!progress && parseInt(progress.dataset.done, 10) >= done;
}"""

# what the last code cell printed, once it ran and the kernel is idle
STDOUT_OF_LAST = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const cells = [...panel.content.model.cells];
    const last = cells[cells.length - 1];
    if (last.executionCount === null || panel.sessionContext.session.kernel.status !== 'idle') return false;
    return last.outputs.toJSON().filter(o => o.output_type === 'stream').map(o => o.text).join('') || '(nothing)';
}"""

# each code cell: its source, its outputs as saved, and what its output area shows
CELLS = """() => window.jupyterapp.shell.currentWidget.content.widgets
    .filter(w => w.model.type === 'code')
    .map(w => {
        const out = w.outputArea.node;
        const pids = rows => [...rows.querySelectorAll('tr.mpnb-worker')].map(r => parseInt(r.dataset.pid, 10));
        return {
            source: w.model.sharedModel.getSource(),
            outputs: w.model.outputs.toJSON(),
            summaries: [...out.querySelectorAll('.mpnb-summary')].map(s => ({
                done: parseInt(s.dataset.done, 10), total: parseInt(s.dataset.total, 10),
                failed: parseInt(s.dataset.failed, 10), pids: pids(s),
                errors: [...s.querySelectorAll('.mpnb-errors')].map(e => e.textContent).join('\\n'),
            })),
            tasks: [...out.querySelectorAll('svg.mpnb-timeline rect.mpnb-task')].map(r => ({
                worker: r.dataset.worker, index: parseInt(r.dataset.index, 10),
                failed: r.classList.contains('mpnb-failed'),
            })),
        };
    })"""


def _require_browser() -> None:
    reason = None
    if importlib.util.find_spec("playwright") is None:
        # the test extra brings it; it does not install everywhere (free-threaded Python)
        reason = "playwright is not installed: the test extra (pip install -e '.[test]') brings it"
    elif chromium_path() is None:
        reason = (
            "chromium is not on PATH and could not be installed: scripts/test installs Debian's "
            "`chromium` package with apt-get, which needs root or sudo"
        )
    if reason is None:
        return
    if os.environ.get("MPNB_REQUIRE_BROWSER"):
        pytest.fail(reason)
    print(reason)
    pytest.skip(reason)


class Page:
    """The notebook page, with waits and checks that explain themselves when they fail."""

    def __init__(self, page: Any, lab: LabServer, log: PageLog, kernel: psutil.Process | None = None):
        self.page, self.lab, self.log, self.kernel = page, lab, log, kernel

    def dump(self, what: str) -> str:
        """``what`` failed, then the page, the console and the server's log, then ``what`` again."""
        try:
            text = self.page.inner_text("body")[-6000:]
        except Exception as exc:  # the page itself may be gone
            text = f"(page text unavailable: {exc})"
        return (
            f"\n--- page text ---\n{text}"
            "\n--- browser console errors ---\n" + "\n".join(self.log.errors)
            + f"\n--- server log ---\n{self.lab.log()}"
            + f"\n--- failed: {what}"
        )

    def until(self, script: str, what: str, arg: Any = None) -> Any:
        """Wait for ``script`` to return something truthy; return it."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            handle = self.page.wait_for_function(script, arg=arg, timeout=WAIT_MS, polling=50)
        except PlaywrightTimeout:
            what = f"{what}: not seen within {WAIT_MS // 1000} s"
            raise AssertionError(what + self.dump(what)) from None
        return handle.json_value()

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            raise AssertionError(what + self.dump(what))

    def run(self, command: str) -> None:
        """Start a JupyterLab command (``notebook:run-all-cells``) without waiting for it."""
        self.page.evaluate("(command) => { window.jupyterapp.commands.execute(command); }", command)

    def live(self, workers: int) -> dict[str, Any]:
        """What the live widget shows once each worker has a row with a pid, one busy;
        checked against the kernel's children at that moment."""
        what = f"the live widget (.mpnb-live) with {workers} worker rows with pids, one busy"
        live = self.until(LIVE_ROWS, what, workers)
        self.check("finished" not in live, f"{what}: the notebook finished without it")
        assert self.kernel is not None
        children = {p.pid for p in self.kernel.children()}
        self.check(set(live["pids"]) <= children,
                   f"the widget's pids {live['pids']} are not all children of the kernel {self.kernel.pid}: {children}")
        self.check(set(live["states"]) <= STATES, f"unknown worker states: {live['states']}")
        self.check(live["cancel"] == 1 and live["errors"] == 1,
                   f"the live widget lacks its Cancel button (.mpnb-cancel) or errors panel (.mpnb-errors): {live}")
        return live

    def check_console(self) -> None:
        self.check(not self.log.errors, "errors in the browser console")
        self.check(not self.log.outside_requests,
                   f"the page fetched from outside 127.0.0.1: {self.log.outside_requests}")


@contextlib.contextmanager
def opened(tag: str, root: Path, notebook: nbformat.NotebookNode) -> Iterator[Page]:
    """JupyterLab on ``root`` with ``notebook`` (its kernel set to the test
    interpreter's), open in chromium with an idle kernel; afterwards the
    browser and the server are stopped and no process carrying ``tag`` may remain."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    notebook.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": KERNEL_NAME, "language": "python"}
    nbformat.write(notebook, root / NOTEBOOK)
    ARTIFACTS.mkdir(exist_ok=True)
    log = PageLog()
    with lab_server(root, tag) as lab, sync_playwright() as playwright, open_chromium(playwright, tag) as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        log.attach(page, lab.base_url)
        nb = Page(page, lab, log)
        page.goto(lab.lab_url(NOTEBOOK))
        nb.until(KERNEL_IDLE, "the notebook open with an idle mpnb-test kernel")
        kernels = [p for p in leftovers(tag) if "ipykernel_launcher" in " ".join(p.cmdline())]
        nb.check(len(kernels) == 1, f"expected one kernel carrying the test's tag, found {kernels}")
        nb.kernel = kernels[0]
        yield nb
    assert_no_leftovers(tag)


def _cell(cells: list[dict[str, Any]], source_start: str) -> dict[str, Any]:
    found = [c for c in cells if c["source"].startswith(source_start)]
    assert len(found) == 1, f"no single code cell starting with {source_start!r}"
    return found[0]


def _result_text(cell: dict[str, Any]) -> str:
    return "".join(o["data"]["text/plain"] for o in cell["outputs"] if o["output_type"] == "execute_result")


def _saved_html(path: Path) -> str:
    """All HTML outputs of the notebook file as JupyterLab saved it."""
    nb = nbformat.read(path, as_version=4)
    return "".join(
        "".join(out.get("data", {}).get("text/html", "")) for cell in nb.cells for out in cell.get("outputs", [])
    )


def test_live_widget_in_jupyterlab(tag, tmp_path):
    with opened(tag, tmp_path, nbformat.read(NOTEBOOKS / NOTEBOOK, as_version=4)) as nb:
        nb.run("notebook:run-all-cells")

        # while the long map runs: one row per worker, real pids, children of the kernel
        live = nb.live(WORKERS)
        nb.page.locator(".mpnb-live").first.screenshot(path=ARTIFACTS / "browser-live.png")
        nb.check(live["progress"] is not None and live["progress"]["total"] == str(LONG_TASKS),
                 f"the live progress (.mpnb-progress) does not count {LONG_TASKS} tasks: {live}")

        # a task's own progress (mpnb.progress) in its worker's row, with its bar
        report = nb.until(TASK_PROGRESS, "a worker row with the task's own progress (.mpnb-task-progress)", "fitting")
        nb.page.locator(".mpnb-live").first.screenshot(path=ARTIFACTS / "browser-progress.png")
        nb.check(report["total"] == "20" and " · fitting · " in report["text"] and "/20 (" in report["text"]
                 and report["bars"] == 2, f"the task's progress does not read 'task … · fitting · n/20 (p%)' with a bar: {report}")

        nb.until(ALL_RAN, "every cell ran and the kernel is idle")
        cells = nb.page.evaluate(CELLS)
        nb.page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        nb.page.screenshot(path=ARTIFACTS / "browser-notebook.png")
        failing_output = nb.page.locator(".jp-CodeCell").filter(has_text="def inverse").locator(".jp-OutputArea")
        failing_output.screenshot(path=ARTIFACTS / "browser-errors.png")
        nb.page.locator("svg.mpnb-timeline").screenshot(path=ARTIFACTS / "browser-timeline.png")
        print(f"screenshots: {ARTIFACTS}/browser-{{live,progress,notebook,errors,timeline}}.png")

        errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
        nb.check(not errors, f"cells raised: {json.dumps(errors)[:3000]}")
        printed = json.loads(_result_text(_cell(cells, "sorted(pool.pids)")))
        nb.check(sorted(live["pids"]) == printed,
                 f"the widget showed pids {live['pids']}, the notebook printed {printed}")

        # after each map: the static summary, with the workers and the counts
        long_map = _cell(cells, "def slow_square")["summaries"]
        nb.check(len(long_map) == 1 and long_map[0]["done"] == long_map[0]["total"] == LONG_TASKS
                 and long_map[0]["failed"] == 0 and sorted(long_map[0]["pids"]) == printed,
                 f"the long map's summary (.mpnb-summary) is not {LONG_TASKS}/{LONG_TASKS} on {printed}: {long_map}")
        failing = _cell(cells, "def inverse")["summaries"]
        nb.check(len(failing) == 1 and (failing[0]["done"], failing[0]["total"], failing[0]["failed"])
                 == (FAILING_TASKS - 1, FAILING_TASKS, 1),
                 f"the failing map's summary is not 7 returned of 8, 1 failed: {failing}")
        nb.check(f"task {FAILING_INDEX}" in failing[0]["errors"] and "ZeroDivisionError" in failing[0]["errors"],
                 f"the errors panel (.mpnb-errors) does not show task {FAILING_INDEX}'s ZeroDivisionError: {failing}")

        # the timeline of the last map: one bar per task, the failed one marked
        tasks = _cell(cells, "pool.timeline()")["tasks"]
        nb.check(sorted(t["index"] for t in tasks) == list(range(FAILING_TASKS))
                 and [t["index"] for t in tasks if t["failed"]] == [FAILING_INDEX]
                 and len({t["worker"] for t in tasks}) <= WORKERS,
                 f"the timeline (svg.mpnb-timeline) is not one rect per task with task {FAILING_INDEX} failed: {tasks}")
        nb.check(_result_text(_cell(cells, "def fit")) == "[0.2, 0.4, 0.6, 0.8]",
                 f"the map with progress returned {_result_text(_cell(cells, 'def fit'))!r}")
        nb.check_console()

    # saved without a kernel: the summaries and the timeline are plain HTML in the file
    saved = _saved_html(tmp_path / NOTEBOOK)
    assert saved.count('class="mpnb-summary"') == 3 and 'class="mpnb-timeline"' in saved, saved[:3000]


CANCEL_CELLS = [
    "import time\nimport mpnb\n\npool = mpnb.Pool(2)",
    # far longer than the test's deadline: only the Cancel click can end it in time
    "def slow(x):\n    time.sleep(0.5)\n    return x\n\npool.map(slow, range(400), chunksize=1)",
    "done = {i: r for i, r in enumerate(pool.last_results) if not isinstance(r, BaseException)}\n"
    "print(2 <= len(done) < 400, all(i == r for i, r in done.items()), pool.map(abs, [-1, -2]))",
]
DONE_BEFORE_CANCEL = 2


def test_cancel_button_click_stops_the_map(tag, tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in CANCEL_CELLS]
    with opened(tag, tmp_path, notebook) as nb:
        nb.run("notebook:run-all-cells")
        nb.live(WORKERS)
        nb.until(PROGRESS_AT_LEAST, f"the live progress at {DONE_BEFORE_CANCEL} tasks done", DONE_BEFORE_CANCEL)
        nb.page.locator(".mpnb-live .mpnb-cancel").click()
        nb.until(ALL_RAN, "the map stopped after the Cancel click")
        cells = nb.page.evaluate(CELLS)
        nb.page.locator(".jp-CodeCell").nth(1).locator(".jp-OutputArea").screenshot(
            path=ARTIFACTS / "browser-cancelled.png")
        raised = [o["ename"] for o in cells[1]["outputs"] if o["output_type"] == "error"]
        nb.check(raised == ["KeyboardInterrupt"],
                 f"the cancelled map did not raise KeyboardInterrupt: {cells[1]['outputs']}")
        summary = cells[1]["summaries"]
        nb.check(len(summary) == 1 and DONE_BEFORE_CANCEL <= summary[0]["done"] < summary[0]["total"] == 400,
                 f"the cancelled map's summary is not a part of 400 tasks: {summary}")
        nb.check("cancelled" in nb.page.locator(".mpnb-summary").inner_text(),
                 "the summary does not say the work was cancelled")

        # the pool serves the next cell, which still has the results finished before the click
        nb.page.evaluate("() => { window.jupyterapp.shell.currentWidget.content.activeCellIndex = 2; }")
        nb.run("notebook:run-cell")
        stdout = nb.until(STDOUT_OF_LAST, "the cell after the cancel printed")
        nb.check(stdout == "True True [1, 2]\n", f"after the cancel: {stdout!r}")
        nb.check_console()
