"""A real browser: JupyterLab on 127.0.0.1, headless Debian Chromium driven by Playwright.

Opens 02-batch-dashboard.ipynb, runs it down to the batch cell, and reads the live dashboard from
the page: the progress bar must rise over several reads, and the static rendering that replaces the
dashboard when the batch ends must show 100 % and the right count.
A screenshot goes to test-artifacts/. Needs Debian's chromium (`apt-get install chromium`, as
.ci/run does): without it the test skips and says why, unless DSPEX_REQUIRE_BROWSER=1 (set by
.ci/run), where a missing or broken browser fails the test.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from helpers import ROOT, TWO_STEP
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
CELLS_UP_TO_BATCH = 6  # Shift+Enter presses from the first cell through the `%dspex batch` cell
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Lab:
    base: str
    token: str
    root: Path  # the notebooks it serves

    def url(self, notebook: str, workspace: str = "") -> str:
        """The notebook's page; with ``workspace``, in a workspace of its own that opens only it."""
        where = f"workspaces/{workspace}/tree/{notebook}?reset&" if workspace else f"tree/{notebook}?"
        return f"{self.base}/lab/{where}token={self.token}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A JupyterLab server on a copy of notebooks/ (so autosave never touches the repository)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", root / "notebooks")
    settings = root / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')  # no news toast
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
        yield Lab(base, token, root / "notebooks")
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


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except Exception as exc:
            pytest.fail(f"headless Chromium could not start: {exc}")
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def new_page(browser: Browser, name: str, width: int = 1400) -> Iterator[Page]:
    """A page; on failure its screenshot goes to test-artifacts/<name>-failure.png."""
    page = browser.new_page(viewport={"width": width, "height": 1000})
    try:
        yield page
    except BaseException:
        page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"), full_page=True)
        raise
    finally:
        page.close()


def test_batch_dashboard_progress_rises_to_100_percent_in_chromium(lab: Lab, browser: Browser) -> None:
    with new_page(browser, "batch-dashboard") as page:
        reads, text = run_batch_cell(page, lab.url("02-batch-dashboard.ipynb"))
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
    return reads, finished.locator(".dspex-summary").inner_text()


VIEWS_NOTEBOOK = [
    "%load_ext dspex_nb\n%dspex start -n 2 --lm demo",
    "%dspex lm demo --set answer_tokens=20000 --set per_token=0.0002",
    '%%dspex predict "question -> answer" -o long\nA very long answer, please.',
    "%dspex lm demo --set answer_tokens=4000 --set per_token=0.01",  # 40 s unless stopped
    '%%dspex predict "question -> answer"\nStop me.',
    "%dspex lm demo --set ttft=1",  # 300 items on 16 places: about 20 s unless stopped
    'qs = [f"question {i}?" for i in range(300)]\n%dspex batch "question -> answer" --items qs --no-journal',
    "%dspex lm demo",
    "%%dspex define TwoStep" + TWO_STEP,
    "%%dspex run TwoStep -o two\nWhy do leaves fall?",
    "%dspex lm demo --set answer_tokens=4000 --set per_token=0.01",
    '%%dspex predict "question -> answer" -a -o bg\nIn the background.',
    "import time\nwhile not bg.done and bg.elapsed < 60: time.sleep(0.05)\nbg.status",  # blocks while bg runs
    "%dspex lm demo --set ttft=1",
    "import dspy\npool = get_ipython().find_line_magic('dspex').__self__.pool\n"
    "pool.map(dspy.Predict('question -> answer'), qs, journal=False).result()",
    "%dspex lm demo\nwhile any(w['in_flight'] for w in pool.status()) and time.sleep(0.05) is None: pass\n"
    "[w['in_flight'] for w in pool.status()]",  # the workers go idle
    "%dspex status",
    "%dspex stop",
]


def test_views_in_a_browser_stop_steps_saving_reopening_html_and_dark_theme(lab: Lab, browser: Browser) -> None:
    """Stop on a blocking stream and a blocking batch, a two-step module's groups, a 20,000-token stream's
    bytes, then save, export to HTML, reload, reopen with a new kernel and switch to the dark theme: the
    answers stay, no "model not found"; a view running when the kernel restarts says it is over. Screenshots of each
    view go to test-artifacts/."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code in VIEWS_NOTEBOOK])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, lab.root / "views.ipynb")
    frames: list[int] = []
    with new_page(browser, "views") as page:
        page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(len(payload))))
        open_notebook(page, lab.url("views.ipynb", "views"))
        run(page, 0)
        output(page, 0).locator("text=pool of 2 workers ready").wait_for(timeout=60_000)

        # a 20,000-token stream: the text grows in the page, and the bytes it costs stay linear in its length
        run(page, 1)
        page.evaluate("""() => { window.lag = 0; let last = performance.now();
            setInterval(() => { const now = performance.now(); lag = Math.max(lag, now - last - 50); last = now; }, 50);
        }""")
        before = len(frames)
        run(page, 2)
        live = output(page, 2).locator(".dspex-field-text").first
        lengths = [wait_for(lambda: live.count() and len(live.inner_text()), "the first tokens")]
        lengths.append(wait_for(lambda: n if (n := len(live.inner_text())) > lengths[0] else 0, "the text to grow"))
        output(page, 2).screenshot(path=str(ARTIFACTS / "view-stream-live.png"))
        final = output(page, 2).locator(".dspex-run")
        final.wait_for(timeout=120_000)
        answer = len(final.inner_text())
        output(page, 2).screenshot(path=str(ARTIFACTS / "view-stream-finished.png"))
        wire = sum(frames[before:])
        lag = page.evaluate("() => lag")
        (ARTIFACTS / "stream-20k.txt").write_text(f"answer {answer} chars, {wire} bytes in {len(frames) - before} "
                                                  f"messages, max timer lag {lag:.0f} ms\n")
        assert 0 < lengths[0] < lengths[1] and answer > 100_000, (lengths, answer)
        received = len(frames) - before  # each message has a header of its own (~1 KB): a slow machine sends more
        assert wire < 4 * answer + 2_000 * received, f"{wire} bytes in {received} messages, a {answer}-character answer"

        # Stop on a blocking stream
        run(page, 3)
        run(page, 4)
        tokens = output(page, 4).locator(".dspex-field-text").first
        wait_for(lambda: tokens.count() and tokens.inner_text(), "the first tokens")
        output(page, 4).locator("button", has_text="Stop").click()
        stopped = output(page, 4).locator(".dspex-run")
        stopped.wait_for(timeout=30_000)
        assert "cancelled" in stopped.inner_text(), stopped.inner_text()

        # Stop on a blocking batch
        run(page, 5)
        run(page, 6)
        bar = output(page, 6).locator(".progress .progress-bar")
        wait_for(lambda: bar.evaluate("el => parseFloat(el.style.width) || 0") > 0, "the batch to make progress")
        output(page, 6).screenshot(path=str(ARTIFACTS / "view-batch-live.png"))
        live = output(page, 6).inner_text()
        assert "items running" in live and "shards" not in live, live  # per worker: its items, not its shards
        assert re.search(r"^\d+%$", live, re.MULTILINE) and " items/s · " in live, live  # tqdm's percentage and rate
        opened = latest_row_opened_across_a_redraw(output(page, 6))
        assert opened == {"present": True, "open": True}, opened
        output(page, 6).locator("button", has_text="Stop").click()
        batch = output(page, 6).locator(".dspex-batch")
        batch.wait_for(timeout=30_000)
        summary = batch.locator(".dspex-summary").inner_text()
        assert summary.startswith("batch cancelled: 300 items") and ", 300 ok" not in summary, summary
        assert re.search(r"failed, \d+ not run on 2 workers in .* items/s", summary), summary  # what a Stop left
        output(page, 6).screenshot(path=str(ARTIFACTS / "view-batch-finished.png"))

        # a two-step module: one group per step, each titled by its predictor
        for cell in (7, 8, 9):
            run(page, cell)
        steps = output(page, 9).locator(".dspex-run")
        steps.wait_for(timeout=60_000)
        bold = steps.locator("b").all_inner_texts()
        assert bold.count("topic") == 2 and bold.count("answer") == 2 and "reasoning" in bold, bold
        output(page, 9).screenshot(path=str(ARTIFACTS / "view-two-steps.png"))

        # Stop on a background run's view while another cell blocks the kernel
        run(page, 10)
        run(page, 11)
        background = output(page, 11).locator(".dspex-field-text").first
        wait_for(lambda: background.count() and background.inner_text(), "the background run's first tokens")
        run(page, 12)
        output(page, 11).locator("button", has_text="Stop").click()
        output(page, 12).locator("pre", has_text="'cancelled'").wait_for(timeout=30_000)
        output(page, 11).locator(".dspex-run", has_text="cancelled").wait_for(timeout=30_000)

        # pool.map(...).result() blocks the cell: it shows the batch's view, whose Stop cancels the batch
        run(page, 13)
        run(page, 14)
        bar = output(page, 14).locator(".progress .progress-bar")
        wait_for(lambda: bar.evaluate("el => parseFloat(el.style.width) || 0") > 0, "the mapped batch to make progress")
        output(page, 14).locator("button", has_text="Stop").click()
        mapped = output(page, 14).locator(".dspex-batch")
        mapped.wait_for(timeout=30_000)
        assert mapped.inner_text().startswith("map Predict('question -> answer')\nbatch cancelled: 300 items"), \
            mapped.inner_text()
        output(page, 14).locator("text=Cancelled: the batch was cancelled after").wait_for(timeout=30_000)
        output(page, 14).screenshot(path=str(ARTIFACTS / "view-map-stopped.png"))
        run(page, 15)
        output(page, 15).locator("pre", has_text="[0, 0]").wait_for(timeout=30_000)

        run(page, 16)
        dashboard = output(page, 16)
        dashboard.locator("caption", has_text="workers").wait_for(timeout=30_000)
        assert {"calls done", "batch items", "memory"} <= set(dashboard.locator("th").all_inner_texts())
        dashboard.screenshot(path=str(ARTIFACTS / "view-pool.png"))
        run(page, 17)
        dashboard.locator("caption", has_text="as last seen before the pool stopped").wait_for(timeout=30_000)
        page.keyboard.press("Control+s")
        wait_for(lambda: "dspex-run" in (lab.root / "views.ipynb").read_text(), "the notebook to be saved")
        wanted = [steps.inner_text().splitlines()[-2], summary.splitlines()[0],  # the two-step answer, the batch
                  mapped.locator(".dspex-summary").inner_text()]
        saved_views_show_without_widgets(lab.root / "views.ipynb")
        exports_the_answers_to_html(lab.root / "views.ipynb", wanted)

        # reload the page, then reopen the notebook on a new kernel: the answers are there, no widget errors
        page.reload()
        open_notebook(page, lab.url("views.ipynb", "views"))
        shows_answers(page, wanted)
        page.goto("about:blank")
        restart_kernel(lab)
        open_notebook(page, lab.url("views.ipynb", "views"))
        shows_answers(page, wanted)

        # the dark theme: the answers take the theme's text colour
        page.locator(".lm-MenuBar-itemLabel", has_text="Settings").click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Theme$")).hover()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile("^JupyterLab Dark$")).click()
        page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
        page.locator("#jupyterlab-splash").wait_for(state="detached", timeout=30_000)
        colour = page.locator(".dspex-run").last.evaluate("el => getComputedStyle(el).color")
        assert luminance(colour) > 0.5, f"dark theme, dark text: {colour}"
        page.screenshot(path=str(ARTIFACTS / "view-dark-theme.png"), full_page=True)

        # Kernel > Restart under a running view: JupyterLab drops what the old kernel sends as it stops (its final
        # rendering), so the view says itself that it is over, and its Stop is disabled
        run(page, 0)  # the kernel runs the cells in turn: 10 and 11 once the pool is up
        run(page, 10)
        run(page, 11)
        background = output(page, 11).locator(".dspex-field-text").first
        wait_for(lambda: background.count() and background.inner_text(), "the background run's first tokens")
        page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Restart Kernel")).first.click()
        page.locator(".jp-Dialog button", has_text="Restart").click()
        output(page, 11).locator("text=Over: the kernel that ran this view restarted").wait_for(timeout=60_000)
        assert output(page, 11).locator("button", has_text="Stop").is_disabled()
        output(page, 11).screenshot(path=str(ARTIFACTS / "view-kernel-restarted.png"))
        page.locator(".jp-StatusBar-Widget", has_text="Python 3 (ipykernel) | Idle").wait_for(timeout=90_000)


def exports_the_answers_to_html(notebook: Path, wanted: list[str]) -> None:
    html_out = notebook.with_suffix(".html")
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", str(notebook)], check=True,
                   capture_output=True, timeout=120)
    exported = html.unescape(html_out.read_text())
    assert all(text in exported for text in wanted) and "<dspex stream" not in exported


def latest_row_opened_across_a_redraw(view) -> dict[str, bool]:
    """Open the first long row of a running batch's latest results by a click and read it after the table's next
    redraw; where that row has left the latest results by then (a busy machine finishes many items in a tick),
    try again with another, a few times (a fast machine finishes its batch's items quickly too)."""
    for _ in range(20):
        opened = _open_a_latest_row(view)
        if opened["present"]:
            break
    return opened


def _open_a_latest_row(view) -> dict[str, bool]:
    table = view.locator("caption", has_text="latest results").locator("xpath=ancestor::table")
    return table.evaluate("""(table) => new Promise((resolve) => {
        const view = table.parentElement.parentElement;
        const row = view.querySelector("details[data-key]");
        row.querySelector("summary").click();
        new MutationObserver((_, observer) => {
            observer.disconnect();
            const now = view.querySelector(`details[data-key="${row.dataset.key}"]`);
            resolve({present: !!now, open: !!now && now.open});
        }).observe(view, {childList: true});
    })""", timeout=10_000)


CELLS = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell"  # the open tab's (others may be restored)


def open_notebook(page: Page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector(CELLS, timeout=90_000)
    page.locator(".jp-StatusBar-Widget", has_text="Python 3 (ipykernel) | Idle").wait_for(timeout=90_000)


def run(page: Page, cell: int) -> None:
    """Select cell ``cell`` by its prompt (command mode) and run it."""
    page.locator(CELLS).nth(cell).locator(".jp-InputPrompt").click()
    page.keyboard.press("Control+Enter")


def output(page: Page, cell: int):
    return page.locator(CELLS).nth(cell).locator(".jp-OutputArea")


def wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return value


def shows_answers(page: Page, wanted: list[str]) -> None:
    outputs = page.locator(CELLS).locator(".jp-OutputArea")
    for text in wanted:
        outputs.filter(has_text=text).first.wait_for(timeout=30_000)
    assert not outputs.filter(has_text="Error displaying widget").count()
    assert not outputs.filter(has_text="<dspex stream:").count()


def saved_views_show_without_widgets(path: Path) -> None:
    """Every view's final state is in the saved notebook as HTML with a text twin, which shows without the
    kernel and the widgets' JavaScript; the stopped runs say so."""
    outputs = {i: cell.outputs for i, cell in enumerate(nbformat.read(path, as_version=4).cells)}
    views = {i: [o for o in shown if "text/html" in o.get("data", {})] for i, shown in outputs.items()}
    assert not [i for i, shown in outputs.items() for o in shown
                if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    for cell in (2, 4, 6, 9, 11, 14, 16):
        assert len(views[cell]) == 1 and views[cell][0]["data"]["text/plain"], (cell, outputs[cell])
    assert views[4][0]["data"]["text/plain"].splitlines()[-1].startswith("cancelled · predict on w")
    assert views[11][0]["data"]["text/plain"].startswith("answer: Demo LM answer to 'In the background.'")
    assert views[11][0]["data"]["text/plain"].splitlines()[-1].startswith("cancelled · predict on w")
    assert views[14][0]["data"]["text/plain"].startswith("batch cancelled: 300 items")


def restart_kernel(lab: Lab) -> None:
    """End the notebook's kernel (its widgets' models go with it); opening the notebook starts a new one."""
    sessions = json.loads(urllib.request.urlopen(f"{lab.base}/api/sessions?token={lab.token}", timeout=10).read())
    for session in sessions:
        if session["path"].endswith("views.ipynb"):
            request = urllib.request.Request(f"{lab.base}/api/sessions/{session['id']}?token={lab.token}",
                                             method="DELETE")
            urllib.request.urlopen(request, timeout=30).read()


def luminance(css: str) -> float:
    """0 (black) to 1 (white), from a computed "rgb(r, g, b)" colour."""
    r, g, b = (int(v) for v in css[css.index("(") + 1: css.index(")")].split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255
