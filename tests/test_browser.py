"""A real browser: JupyterLab on 127.0.0.1, headless Debian Chromium driven by Playwright.

Opens 02-batch-dashboard.ipynb, runs it down to the batch cell, and reads the live dashboard from
the page: the progress bar must rise over several reads, and the static rendering that replaces the
dashboard when the batch ends must show 100 % and the right count.
A screenshot goes to test-artifacts/. Needs Debian's chromium (`apt-get install chromium`, as
.ci/run does): without it the test skips and says why, unless DSPEX_REQUIRE_BROWSER=1 (set by
.ci/run), where a missing or broken browser fails the test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT
from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
CELLS_UP_TO_BATCH = 6  # Shift+Enter presses from the first cell through the `%dspex batch` cell
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A JupyterLab server on a copy of notebooks/ (so autosave never touches the repository)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", root / "notebooks")
    port, token = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "DSPEX_NONINTERACTIVE"}  # live widgets, please
    env.update(JUPYTER_CONFIG_DIR=str(root / "config"), JUPYTER_RUNTIME_DIR=str(root / "runtime"),
               JUPYTER_DATA_DIR=str(root / "data"), IPYTHONDIR=str(root / "ipython"),
               DSPEX_JOURNAL=str(root / "journal.sqlite3"))
    log = open(root / "lab.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root / 'notebooks'}",
         "--allow-root", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).read()
                break
            except OSError as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    log_text = (root / "lab.log").read_text()[-3000:]
                    raise AssertionError(f"JupyterLab did not start: {log_text}") from exc
                time.sleep(0.2)
        yield f"{base}/lab/tree/02-batch-dashboard.ipynb?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


REQUIRED = os.environ.get("DSPEX_REQUIRE_BROWSER") == "1"
pytestmark = pytest.mark.skipif(
    not REQUIRED and not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to run the browser test")


def test_batch_dashboard_progress_rises_to_100_percent_in_chromium(lab: str) -> None:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except Exception as exc:
            pytest.fail(f"headless Chromium could not start: {exc}")
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                reads, text = run_batch_cell(page, lab)
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), full_page=True)
                raise
        finally:
            browser.close()
    assert reads == sorted(reads), f"the progress bar went back: {reads}"
    assert len([r for r in reads if 0 < r < 100]) >= 2, f"too few intermediate reads: {reads}"
    assert reads[-1] == 100, reads
    assert text.startswith("batch done: 100 items, 100 ok, 0 failed"), text


def run_batch_cell(page: Page, url: str) -> tuple[list[float], str]:
    """Run the notebook down to the batch cell; return the bar's distinct widths and the counts line."""
    page.goto(url)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    # the kernel is connected once the status bar names it as idle (the toolbar may say idle earlier)
    page.locator(".jp-StatusBar-Widget", has_text="Python 3 (ipykernel) | Idle").wait_for(timeout=90_000)
    page.locator(".jp-Notebook .jp-Cell").first.click()
    page.keyboard.press("Escape")
    for _ in range(CELLS_UP_TO_BATCH):
        page.keyboard.press("Shift+Enter")
    page.locator(".jp-OutputArea", has_text="pool of 2 workers ready").wait_for(timeout=60_000)
    bar = page.locator(".jp-OutputArea .progress .progress-bar").first
    bar.wait_for(timeout=30_000)
    finished = page.locator(".jp-OutputArea .dspex-batch")  # the static rendering that replaces the widget
    reads: list[float] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not finished.count():
        try:
            width = bar.evaluate("el => parseFloat(el.style.width) || 0", timeout=1000)
        except Exception:  # replaced by the static rendering meanwhile
            continue
        if not reads or width != reads[-1]:
            reads.append(width)
        time.sleep(0.05)
    finished.wait_for(timeout=30_000)
    reads.append(finished.locator(".dspex-bar-ok").evaluate("el => parseFloat(el.style.width)"))
    page.screenshot(path=str(ARTIFACTS / "browser-batch-dashboard.png"), full_page=True)
    return reads, finished.inner_text()
