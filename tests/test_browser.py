"""The live status widget in a real browser.

JupyterLab runs on 127.0.0.1 with a temporary root holding
``notebooks/live_status.ipynb``; Debian's chromium, driven by Playwright,
opens it, runs all cells and the test reads the page's DOM (the contract the
widget keeps: ``.mpnb-live``, ``tr.mpnb-worker[data-pid][data-state]``,
``.mpnb-progress``, ``.mpnb-cancel``, ``.mpnb-errors``, ``.mpnb-summary``,
``svg.mpnb-timeline rect.mpnb-task``).  Every wait is on a condition of the
page with a generous deadline; a failure shows the page's text, the console
and the server's log.  Screenshots go to ``tests/artifacts/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest

from browser import PageLog, chromium_path, lab_server, open_chromium
from kernel import KERNEL_NAME, NOTEBOOKS, ROOT, assert_no_leftovers, leftovers

pytestmark = pytest.mark.browser

NOTEBOOK = "live_status.ipynb"
ARTIFACTS = ROOT / "tests" / "artifacts"
WORKERS = 2
LONG_TASKS = 16
FAILING_TASKS, FAILING_INDEX = 8, 3
# a deadline for each condition of the page; the whole test takes far less
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

# the live widget shows one row with a pid per worker: what it shows;
# or {finished: true} when the run ended without it
LIVE_ROWS = """(workers) => {
    const finished = """ + FINISHED + """;
    const live = document.querySelector('.mpnb-live');
    if (!live) return finished(window.jupyterapp.shell.currentWidget) && {finished: true};
    const rows = [...live.querySelectorAll('tr.mpnb-worker')];
    const pids = rows.map(r => parseInt(r.dataset.pid, 10));
    if (rows.length !== workers || !pids.every(p => p > 0)) return false;
    const progress = live.querySelector('.mpnb-progress');
    return {
        pids: pids,
        states: rows.map(r => r.dataset.state),
        progress: progress && {done: progress.dataset.done, total: progress.dataset.total,
                               text: progress.textContent},
        cancel: live.querySelectorAll('.mpnb-cancel').length,
        text: live.innerText,
    };
}"""

ALL_RAN = "() => (" + FINISHED + ")(window.jupyterapp.shell.currentWidget)"

# each code cell of the notebook model: source, outputs (as saved), and the DOM of its output area
CELLS = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    return panel.content.widgets.filter(w => w.model.type === 'code').map(w => ({
        source: w.model.sharedModel.getSource(),
        outputs: w.model.outputs.toJSON(),
        html: w.outputArea.node.innerHTML,
    }));
}"""


def _require_chromium() -> None:
    if chromium_path() is not None:
        return
    reason = (
        "chromium is not on PATH and could not be installed: scripts/test installs Debian's "
        "`chromium` package with apt-get, which needs root or sudo"
    )
    if os.environ.get("MPNB_REQUIRE_BROWSER"):
        pytest.fail(reason)
    print(reason)
    pytest.skip(reason)


def _copy_notebook(root: Path) -> None:
    """The notebook, with its kernel set to the test interpreter's."""
    nb = nbformat.read(NOTEBOOKS / NOTEBOOK, as_version=4)
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": KERNEL_NAME, "language": "python"}
    nbformat.write(nb, root / NOTEBOOK)


class Page:
    """The notebook page, with waits that explain themselves when they fail."""

    def __init__(self, page: Any, lab: Any, log: PageLog):
        self.page, self.lab, self.log = page, lab, log

    def dump(self) -> str:
        try:
            text = self.page.inner_text("body")[-6000:]
        except Exception as exc:  # the page itself may be gone
            text = f"(page text unavailable: {exc})"
        return (
            f"\n--- page text ---\n{text}"
            f"\n--- browser console errors ---\n" + "\n".join(self.log.errors)
            + f"\n--- server log ---\n{self.lab.log()}"
        )

    def until(self, script: str, what: str, arg: Any = None) -> Any:
        """Wait for ``script`` to return something truthy; return it."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            handle = self.page.wait_for_function(script, arg=arg, timeout=WAIT_MS, polling=50)
        except PlaywrightTimeout:
            raise AssertionError(f"{what}: not seen within {WAIT_MS // 1000} s" + self.dump()) from None
        return handle.json_value()

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            raise AssertionError(what + self.dump())


def _kernel_process(tag: str) -> psutil.Process:
    kernels = [p for p in leftovers(tag) if "ipykernel_launcher" in " ".join(p.cmdline())]
    assert len(kernels) == 1, f"expected one tagged kernel, found {kernels}"
    return kernels[0]


def _output_text(cell: dict[str, Any]) -> str:
    parts = []
    for out in cell["outputs"]:
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _cell(cells: list[dict[str, Any]], source_start: str) -> dict[str, Any]:
    found = [c for c in cells if c["source"].startswith(source_start)]
    assert len(found) == 1, f"no single code cell starting with {source_start!r}"
    return found[0]


def test_live_widget_in_jupyterlab(tag, tmp_path):
    _require_chromium()
    from playwright.sync_api import sync_playwright

    root = tmp_path / "root"
    root.mkdir()
    _copy_notebook(root)
    ARTIFACTS.mkdir(exist_ok=True)
    log = PageLog()

    with lab_server(root, tag) as lab, sync_playwright() as playwright, open_chromium(playwright, tag) as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        log.attach(page, lab.base_url)
        nb = Page(page, lab, log)
        page.goto(lab.lab_url(NOTEBOOK))
        nb.until(KERNEL_IDLE, "the notebook open with an idle mpnb-test kernel")
        kernel = _kernel_process(tag)
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")

        # while the long map runs
        what = f"the live widget (.mpnb-live) with {WORKERS} worker rows with pids"
        live = nb.until(LIVE_ROWS, what, WORKERS)
        nb.check("finished" not in live, f"{what}: the notebook finished without it")
        children = {p.pid for p in kernel.children()}
        nb.check(set(live["pids"]) <= children,
                 f"live pids {live['pids']} are not all children of the kernel {kernel.pid} ({children})")
        page.locator(".mpnb-live").first.screenshot(path=ARTIFACTS / "browser-live.png")
        nb.check(live["cancel"] == 1, f"the live widget has no Cancel button (.mpnb-cancel): {live}")
        nb.check(live["progress"] is not None and live["progress"]["total"] == str(LONG_TASKS),
                 f"the live progress (.mpnb-progress) does not count {LONG_TASKS} tasks: {live}")

        nb.until(ALL_RAN, "every cell ran and the kernel is idle")
        page.screenshot(path=ARTIFACTS / "browser-final.png", full_page=True)
        print(f"screenshots: {ARTIFACTS / 'browser-live.png'}, {ARTIFACTS / 'browser-final.png'}")
        cells = page.evaluate(CELLS)

        errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
        nb.check(not errors, f"cells raised: {json.dumps(errors)[:3000]}")
        printed = json.loads(_output_text(_cell(cells, "sorted(pool.pids)")))
        nb.check(sorted(live["pids"]) == printed,
                 f"the widget showed pids {live['pids']}, the notebook printed {printed}")

        summary = page.locator(".mpnb-summary")
        nb.check(summary.count() >= 2, "no static summary (.mpnb-summary) after each map")
        long_map = _cell(cells, "def slow_square")
        nb.check(f'data-done="{LONG_TASKS}" data-total="{LONG_TASKS}" data-failed="0"' in long_map["html"]
                 or _summary_counts(page, 0) == (LONG_TASKS, LONG_TASKS, 0),
                 "the long map's summary does not show 16/16 done")
        nb.check(set(printed) <= set(_row_pids(page, 0)),
                 f"the summary rows do not list the workers {printed}")
        nb.check(_summary_counts(page, 1) == (FAILING_TASKS - 1, FAILING_TASKS, 1),
                 "the failing map's summary does not show 7 done of 8 and 1 failed")
        failing = _cell(cells, "def inverse")
        nb.check("ZeroDivisionError" in page.locator(".mpnb-summary").nth(1).inner_text()
                 or "ZeroDivisionError" in _output_text(failing),
                 "the failing task's error is not shown")

        rects = page.locator("svg.mpnb-timeline rect.mpnb-task")
        failed_rects = page.locator("svg.mpnb-timeline rect.mpnb-task.mpnb-failed")
        nb.check(rects.count() == FAILING_TASKS,
                 f"the timeline has {rects.count()} task rects, expected {FAILING_TASKS}")
        nb.check(failed_rects.count() == 1
                 and failed_rects.first.get_attribute("data-index") == str(FAILING_INDEX),
                 "the timeline does not mark task 3 as failed")
        nb.check(not log.errors, "errors in the browser console")
        nb.check(not log.outside_requests, f"the page fetched from outside: {log.outside_requests}")

    assert_no_leftovers(tag)


def _summary_counts(page: Any, nth: int) -> tuple[int, int, int]:
    node = page.locator(".mpnb-summary").nth(nth)
    return tuple(int(node.get_attribute(f"data-{k}")) for k in ("done", "total", "failed"))  # type: ignore[return-value]


def _row_pids(page: Any, nth: int) -> list[int]:
    rows = page.locator(".mpnb-summary").nth(nth).locator("tr.mpnb-worker")
    return [int(rows.nth(i).get_attribute("data-pid")) for i in range(rows.count())]
