"""The magics in a real Jupyter kernel (jupyter_client): live widgets, the comm-message budget,
background handles, and Ctrl-C (a kernel interrupt) during a streaming cell."""

from __future__ import annotations

import contextlib
import html
import json
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from jupyter_client.manager import KernelManager

from dspex_nb.ui.widgets import CELL, UNFINISHED


@dataclass
class Cell:
    counts: dict[str, int] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""
    plain: list[str] = field(default_factory=list)
    error: str = ""
    traceback: str = ""  # as the notebook shows an error: a dspex command's is its `dspex: ...` lines


class Kernel:
    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "DSPEX_NONINTERACTIVE"}
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def submit(self, code: str, cell_id: str | None = None) -> str:
        """Send ``code`` to run; with ``cell_id``, as JupyterLab sends a notebook's cell (its id in the metadata)."""
        if cell_id is None:
            return self.kc.execute(code)
        msg = self.kc.session.msg("execute_request", {"code": code, "silent": False, "store_history": True,
                                                      "user_expressions": {}, "allow_stdin": False,
                                                      "stop_on_error": True}, metadata={"cellId": cell_id})
        self.kc.shell_channel.send(msg)
        return msg["header"]["msg_id"]

    def collect(self, msg_id: str, timeout: float = 120, on_message=None) -> Cell:
        """Read iopub until the cell ``msg_id`` goes idle; count messages by type."""
        cell = Cell()
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            cell.counts[kind] = cell.counts.get(kind, 0) + 1
            if on_message is not None:
                on_message(kind, content)
            if kind == "stream":
                setattr(cell, content["name"], getattr(cell, content["name"]) + content["text"])
            elif kind in ("display_data", "execute_result"):
                cell.plain.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                cell.error = f"{content['ename']}: {content['evalue']}"
                cell.traceback = "\n".join(content["traceback"])
            elif kind == "status" and content["execution_state"] == "idle":
                return cell

    def run(self, code: str, timeout: float = 120) -> Cell:
        cell = self.collect(self.submit(code), timeout)
        assert not cell.error, cell.error
        return cell

    def value(self, expression: str) -> str:
        return self.run(expression).plain[-1]

    @contextlib.contextmanager
    def demo_lm(self, settings: str) -> Iterator[None]:
        """The demo LM with ``settings`` (e.g. "--set ttft=0.2") on every worker, the plain one after."""
        self.run(f"%dspex lm demo {settings}")
        try:
            yield
        finally:
            self.run("%dspex lm demo")

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    k = Kernel()
    try:
        k.run("%load_ext dspex_nb\n%dspex start -n 2")
        yield k
    finally:
        k.close()


def test_a_5000_token_stream_sends_few_widget_messages(kernel: Kernel) -> None:
    kernel.run("%dspex lm demo --set answer_tokens=5000 --set per_token=0.0002")
    cell = kernel.run('%%dspex predict "question -> answer" -o p\nA long answer, please.')
    assert cell.plain == [f"<dspex stream: predict 'question -> answer'> ({UNFINISHED})"]
    assert cell.counts["display_data"] == 1
    assert 3 <= cell.counts["comm_msg"] <= 200, cell.counts  # not one message per token
    assert kernel.value("len(p.answer.split())") == "5000"
    kernel.run("%dspex lm demo")


def test_a_long_stream_sends_its_text_once_not_every_tick(kernel: Kernel) -> None:
    """Widget bytes grow linearly with the answer: each tick carries the new text (plus rare checkpoints),
    where resending the whole field each tick would send ~40 times the answer here."""
    sent: list[int] = []

    def on_message(kind: str, content: dict) -> None:
        if kind == "comm_msg":
            sent.append(len(json.dumps(content)))

    with kernel.demo_lm("--set answer_tokens=10000 --set per_token=0.0002"):
        cell = kernel.collect(kernel.submit('%%dspex predict "question -> answer" -o p\nA very long answer.'),
                              on_message=on_message)
        assert not cell.error, cell.error
        answer = int(kernel.value("len(p.answer)"))
    assert answer > 50_000 and len(sent) >= 10, (answer, len(sent))  # a long stream, over many ticks
    assert sum(sent) < 4 * answer + 400 * len(sent), (sum(sent), answer, len(sent))


def test_batch_dashboard_and_headline_batch(kernel: Kernel) -> None:
    cell = kernel.run('qs = [f"question {i}?" for i in range(50)]\n'
                      '%dspex batch "question -> answer" --items qs -o OUT')
    assert cell.plain == [f"<dspex batch: batch 'question -> answer', 50 items> ({UNFINISHED})"]
    assert kernel.value("len(OUT), all(p.answer.startswith(f\"Demo LM answer to 'question {i}?'\") "
                        "for i, p in enumerate(OUT))") == "(50, True)"


def test_pool_dashboard_is_saved_with_the_status_it_shows(kernel: Kernel) -> None:
    """The pool dashboard lives as long as the pool: what a notebook saved meanwhile keeps is its status
    as last shown (HTML and text), never a widget that a reopened notebook cannot show."""
    shown: list[dict] = []

    def on_message(kind: str, content: dict) -> None:
        if kind == "display_data":
            shown.append(content["data"])

    cell = kernel.collect(kernel.submit("%dspex status"), on_message=on_message)
    assert not cell.error and len(shown) == 1, (cell.error, shown)
    data = shown[0]
    assert "application/vnd.jupyter.widget-view+json" not in data
    plain = data["text/plain"].splitlines()
    assert plain[0] == "pool · 2 workers · lm=demo · running" and plain[1].startswith("worker  pid")
    assert [line.split()[0] for line in plain[2:4]] == ["w0", "w1"]
    assert ">workers</caption>" in data["text/html"] and f"<td style='{CELL}'>w1</td>" in data["text/html"]


def test_background_handle_keeps_updating_after_the_cell_returns(kernel: Kernel) -> None:
    kernel.run("%dspex lm demo --set answer_tokens=300 --set per_token=0.005")
    cell = kernel.run('%%dspex predict "question -> answer" -a -o h\nin the background')
    assert "running in the background; h.result() waits for it" in cell.stdout
    assert kernel.value("h.done") == "False"
    later = kernel.run("h.wait(); import time; time.sleep(0.3)")  # the pump's last refresh lands here
    assert later.counts.get("comm_msg", 0) >= 1  # widget updates kept coming after -a returned
    assert kernel.value("h.status") == "'done'"
    kernel.run("%dspex lm demo")


def test_interrupt_while_idle_stops_the_views_no_cell_waits_for(kernel: Kernel) -> None:
    """The toolbar's interrupt with the kernel idle (ipykernel ignores SIGINT then) stops a displayed run_stream, a
    displayed pool.map and an -a cell, as it stops a cell that waits; the workers go idle and the kernel goes on."""
    with kernel.demo_lm("--set answer_tokens=20000 --set per_token=0.005 --set ttft=0.5"):  # minutes if not stopped
        kernel.run("import dspy, time\npool = get_ipython().find_line_magic('dspex').__self__.pool\n"
                   "shown = pool.run_stream(dspy.Predict('question -> answer'), question='shown')\nshown")
        kernel.run('%%dspex predict "question -> answer" -a -o bg\nin the background')
        kernel.run("mapped = pool.map(dspy.Predict('question -> answer'), [f'{i}?' for i in range(50)], "
                   "journal=False)\nmapped")
        assert kernel.value("shown.done, bg.done, mapped.done") == "(False, False, False)"
        kernel.km.interrupt_kernel()
        ended = kernel.value("deadline = time.monotonic() + 20\n"
                             "while not (shown.done and bg.done and mapped.done) and time.monotonic() < deadline:\n"
                             "    time.sleep(0.05)\n"
                             "while any(w['in_flight'] for w in pool.status()) and time.monotonic() < deadline:\n"
                             "    time.sleep(0.05)\n"
                             "shown.status, bg.status, mapped.status, [w['in_flight'] for w in pool.status()]")
    assert ended == "('cancelled', 'cancelled', 'cancelled', [0, 0])", ended
    assert kernel.value("pool.run(dspy.Predict('question -> answer'), question='next').answer[:14]") == \
        "'Demo LM answer'"


def test_interrupt_during_a_stream_cancels_it_and_the_kernel_goes_on(kernel: Kernel) -> None:
    kernel.run("%dspex lm demo --set answer_tokens=20000 --set per_token=0.005")  # about 100 s if not stopped
    started = []
    msg_id = kernel.submit('%%dspex predict "question -> answer"\nnever finished')

    def interrupt_once_streaming(kind: str, content: dict) -> None:
        # a token's delta to the stream view (not a late refresh of an earlier cell's view)
        delta = content.get("data", {}).get("content", {}) if kind == "comm_msg" else {}
        if isinstance(delta, dict) and "text" in delta and "seq" in delta and not started:
            started.append(True)
            kernel.km.interrupt_kernel()

    cell = kernel.collect(msg_id, timeout=60, on_message=interrupt_once_streaming)
    assert started and cell.traceback == ("dspex: interrupted; the remote work was cancelled; what arrived before "
                                          "the interrupt is in _.chunks")
    assert cell.error.startswith("CellInterrupted: ")  # a failed cell, as an interrupted one is: Run All stops
    assert kernel.value("type(_).__name__, _.status") == "('Run', 'cancelled')"
    # the worker stops generating: poll (with a deadline) until no request is active there
    remote = kernel.value(
        "import time\n"
        "pool = get_ipython().find_line_magic('dspex').__self__.pool\n"
        "def active(): return [pool.describe(w)['counters'] for w in ('w0', 'w1')]\n"
        "deadline = time.monotonic() + 20\n"
        "while any(c['active_requests'] for c in active()) and time.monotonic() < deadline: time.sleep(0.05)\n"
        "[(c['active_requests'], c['tokens_streamed'] < 20000) for c in active()]")
    assert remote == "[(0, True), (0, True)]"
    kernel.run("%dspex lm demo")
    kernel.run('%%dspex predict "question -> answer" -o n\nnext')
    assert kernel.value("n.answer.startswith(\"Demo LM answer to 'next'\")") == "True"


def click_stop_while_blocked(kernel: Kernel, code: str) -> Cell:
    """Run ``code`` (a blocking cell with a live view) and, once its Stop button exists and the view has
    updated, send the button's click as the frontend does: a comm message on the shell channel."""
    buttons: dict[str, str] = {}
    clicked: list[str] = []

    def on_message(kind: str, content: dict) -> None:
        state = content.get("data", {}).get("state", {}) if kind == "comm_open" else {}
        if state.get("_model_name") == "ButtonModel" and state.get("description") == "Stop":
            buttons[content["comm_id"]] = "stop"
        elif kind == "comm_msg" and buttons and not clicked:
            comm_id = next(iter(buttons))
            clicked.append(comm_id)
            msg = kernel.kc.session.msg("comm_msg", {"comm_id": comm_id,
                                                     "data": {"method": "custom", "content": {"event": "click"}}})
            kernel.kc.shell_channel.send(msg)

    cell = kernel.collect(kernel.submit(code), timeout=120, on_message=on_message)
    assert clicked, "the Stop button was never shown"
    return cell


def test_stop_stops_a_blocking_stream(kernel: Kernel) -> None:
    with kernel.demo_lm("--set answer_tokens=20000 --set per_token=0.005"):  # about 100 s if not stopped
        cell = click_stop_while_blocked(kernel, '%%dspex predict "question -> answer"\nstop me')
        assert "cancelled" in cell.stderr, cell.stderr
        assert kernel.value("_.status, sum(c.kind == 'token' for c in _.chunks) < 20000") == "('cancelled', True)"


def test_stop_stops_a_blocking_batch_and_keeps_what_arrived_in_its_output_variable(kernel: Kernel) -> None:
    with kernel.demo_lm("--set ttft=0.2"):
        kernel.run("PART = 'an earlier value'")
        cell = click_stop_while_blocked(
            kernel, 'many = [f"slow {i}?" for i in range(300)]\n'
                    '%dspex batch "question -> answer" --items many --concurrency 1 --no-journal -o PART')
        # -o PART kept its earlier value after Stop (an interrupt stored the batch there), and the note said where
        # the items were twice over
        assert cell.stderr.count("PART.records") == 1 and "_.records" not in cell.stderr, cell.stderr
        assert kernel.value("PART is _, PART.status, PART.ok + PART.failed < 300") == "(True, 'cancelled', True)"


def test_an_interrupted_blocking_batch_keeps_its_finished_items(kernel: Kernel) -> None:
    with kernel.demo_lm("--set ttft=0.05"):
        msg_id = kernel.submit('many = [f"interrupted {i}?" for i in range(400)]\n'
                               '%dspex batch "question -> answer" --items many --no-journal -o PART')
        updates: list[str] = []

        def interrupt_after_progress(kind: str, content: dict) -> None:
            updates.append(kind)
            if updates.count("comm_msg") == 20:  # the dashboard has moved on a few times
                kernel.km.interrupt_kernel()

        cell = kernel.collect(msg_id, timeout=120, on_message=interrupt_after_progress)
        assert cell.traceback.endswith("what arrived before the interrupt is in PART.records"), cell.traceback
        done = kernel.value("sum(r is not None and r['ok'] for r in PART.records), PART.status")
        finished, status = done.strip("()").split(", ")
        assert 0 < int(finished) < 400 and status == "'cancelled'"


@pytest.mark.parametrize("code", [
    '%%dspex predict "question -> answer"\nrun me twice',
    'many = [f"twice {i}?" for i in range(300)]\n%dspex batch "question -> answer" --items many --concurrency 1 '
    '--no-journal'])
def test_a_blocking_cell_run_again_while_it_runs_stops_its_first_run_and_runs_now(kernel: Kernel, code: str) -> None:
    """Shift+Enter on a cell that still runs: JupyterLab clears its output (the first run's view and Stop) and sends
    it again. The first run stops, as by its Stop (a note, not an error: the second is not aborted), and the second
    runs at once rather than after minutes of work nobody sees."""
    with kernel.demo_lm("--set answer_tokens=20000 --set per_token=0.005 --set ttft=0.2"):  # minutes unless stopped
        first = kernel.submit(code, cell_id="cell-twice")
        again: list[str] = []

        def run_again_once_shown(kind: str, content: dict) -> None:
            if kind == "comm_msg" and not again:  # its view is up and moving
                again.append(kernel.submit("_.status, bool(_.done)", cell_id="cell-twice"))

        cell = kernel.collect(first, timeout=60, on_message=run_again_once_shown)
        assert again and not cell.error and "cancelled" in cell.stderr, (cell.error, cell.stderr)
        second = kernel.collect(again[0], timeout=30)
        assert second.plain == ["('cancelled', True)"], (second.plain, second.error)


def test_a_background_cell_run_again_stops_its_earlier_work_and_not_another_cells(kernel: Kernel) -> None:
    """An -a cell's view is cleared by the cell's next run: its work stops then, rather than going on unseen; the
    background work of another cell goes on."""
    with kernel.demo_lm("--set answer_tokens=20000 --set per_token=0.005"):  # minutes unless stopped
        kernel.collect(kernel.submit('%%dspex predict "question -> answer" -a -o bg\nonce', cell_id="cell-bg"))
        kernel.collect(kernel.submit('%%dspex predict "question -> answer" -a -o other\nother', cell_id="cell-other"))
        cell = kernel.collect(kernel.submit(
            "import time\nold = bg\ndeadline = time.monotonic() + 20\n"
            "while not old.done and time.monotonic() < deadline: time.sleep(0.05)\nold.status, other.status",
            cell_id="cell-bg"))
        kernel.run("other.cancel()")
    assert cell.plain == ["('cancelled', 'running')"], (cell.plain, cell.error)


def final_rendering(kernel: Kernel, code: str) -> dict:
    """Run ``code`` and return the last update of its display: what a saved notebook keeps."""
    shown: list[str] = []
    updates: list[tuple[str, dict]] = []

    def on_message(kind: str, content: dict) -> None:
        display_id = content.get("transient", {}).get("display_id")
        if kind == "display_data" and display_id:
            shown.append(display_id)
        elif kind == "update_display_data":
            updates.append((display_id, content["data"]))

    kernel.collect(kernel.submit(code), on_message=on_message)
    mine = [data for display_id, data in updates if display_id in shown]  # not an earlier cell's late view
    assert mine, "the view was not replaced by a static rendering"
    return mine[-1]


def test_a_finished_stream_leaves_its_answer_in_the_saved_output(kernel: Kernel) -> None:
    data = final_rendering(kernel, '%%dspex predict "question -> answer" --cot -o p\nWill it be saved?')
    answer = kernel.value("p.answer").strip("'\"")
    assert "application/vnd.jupyter.widget-view+json" not in data  # live widgets only while live
    assert f"answer: {answer}" in data["text/plain"] and "reasoning: " in data["text/plain"]
    assert answer in html.unescape(data["text/html"]) and "done · " in data["text/html"]


def test_a_finished_batch_leaves_its_summary_in_the_saved_output(kernel: Kernel) -> None:
    data = final_rendering(kernel, 'few = ["one?", "two?", "three?"]\n'
                                   '%dspex batch "question -> answer" --items few --no-journal')
    assert "application/vnd.jupyter.widget-view+json" not in data
    assert data["text/plain"].startswith("batch done: 3 items, 3 ok, 0 failed")
    assert "dspex-bar-ok" in data["text/html"] and "batch done: 3 items" in data["text/html"]
    assert "<b>batch &#x27;question -&gt; answer&#x27;</b>" in data["text/html"]  # which batch, as the live view said


def test_a_two_step_module_shows_one_group_per_step(kernel: Kernel) -> None:
    from helpers import TWO_STEP

    kernel.run("%%dspex define TwoStep" + TWO_STEP)
    data = final_rendering(kernel, "%%dspex run TwoStep -o two\nWhy do leaves fall?")
    plain = data["text/plain"].splitlines()
    assert plain[0] == "[topic]" and plain[1].startswith("  reasoning: ") and plain[2].startswith("  topic: ")
    assert plain[3] == "[answer]" and plain[4] == "  answer: " + kernel.value("two.answer").strip("'\"")
    titles = re.findall(r"<div class='dspex-step'[^>]*>step <b>(\w+)</b></div>", data["text/html"])
    assert titles == ["topic", "answer"]


MANY_CALLS = '''
import threading, time
import dspy
class TenCalls(dspy.Module):
    """Ten LM calls in a row: a program that a cancel can stop half-way."""

    def __init__(self):
        super().__init__()
        self.step = dspy.Predict("question -> answer")

    def forward(self, question):
        for i in range(10):
            answer = self.step(question=f"{question} {i}")
        return answer

ten_calls = TenCalls()
magics = get_ipython().find_line_magic('dspex').__self__
def counters(): return [magics.pool.describe(w.id)['counters'] for w in magics.pool.workers]
def lm_calls(): return sum(c['lm_calls'] for c in counters())
def say_when_the_lm_is_called(text):
    """Print ``text`` (to this cell) once the workers have started one more LM call."""
    start = lm_calls()
    def watch():
        while lm_calls() == start:
            time.sleep(0.02)
        print(text, flush=True)
    threading.Thread(target=watch, daemon=True).start()
def lm_calls_once_idle(since):
    deadline = time.monotonic() + 30
    while any(c['active_requests'] for c in counters()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return lm_calls() - since
'''


def interrupt_on_output(kernel: Kernel, code: str, text: str) -> Cell:
    """Run ``code`` and interrupt the kernel (the Stop button) once the cell prints ``text``."""
    interrupted: list[bool] = []

    def on_message(kind: str, content: dict) -> None:
        if kind == "stream" and text in content["text"] and not interrupted:
            interrupted.append(True)
            kernel.km.interrupt_kernel()

    cell = kernel.collect(kernel.submit(code), timeout=120, on_message=on_message)
    assert interrupted, f"{text!r} never came"
    return cell


def test_stop_during_a_call_that_does_not_stream_stops_its_program_on_the_worker(kernel: Kernel) -> None:
    """Stop on ``--no-stream`` (and pool.run, pool.execute: the same unary call) ends the program at its next
    LM call, as it does for a stream, instead of letting the worker make every call unseen."""
    kernel.run(MANY_CALLS)
    with kernel.demo_lm("--set ttft=0.5"):  # 5 s of LM calls unless stopped
        before = kernel.value("lm_calls()")
        cell = interrupt_on_output(kernel, 'say_when_the_lm_is_called("called")\n'
                                           'get_ipython().run_cell_magic("dspex", "run ten_calls --no-stream", "why?")',
                                   "called")
        assert cell.traceback.startswith("dspex: interrupted; the remote work was cancelled"), cell.traceback
        made = int(kernel.value(f"lm_calls_once_idle({before})"))
    assert 1 <= made < 10, made


def test_a_no_stream_cell_has_a_view_whose_stop_stops_its_program(kernel: Kernel) -> None:
    """``--no-stream`` in a notebook: its view (blocking, or with -a) has a Stop button (it had no view: only the
    kernel's interrupt stopped it), which ends the program at its next LM call; the program runs without DSPy's
    streaming (no token chunk), and a finished cell's view ends as its answer."""
    kernel.run(MANY_CALLS)
    with kernel.demo_lm("--set ttft=0.5"):  # 5 s of LM calls unless stopped
        before = kernel.value("lm_calls()")
        cell = click_stop_while_blocked(kernel, '%%dspex run ten_calls --no-stream\nwhy?')
        assert "cancelled" in cell.stderr, cell.stderr
        made = int(kernel.value(f"lm_calls_once_idle({before})"))
        assert 1 <= made < 10, made
    kernel.run('%%dspex predict "question -> answer" --no-stream -o r\nwhole?')
    assert kernel.value("type(r).__name__, r.answer.startswith(\"Demo LM answer to 'whole?'\")") \
        == "('Prediction', True)"
    kernel.run("whole = magics.pool.call(dspy.Predict('question -> answer'), {'question': 'whole?'}, stream=True, "
               "tokens=False)")
    assert kernel.value("whole.result().answer == r.answer, [c.kind for c in whole.chunks]") \
        == "(True, ['status', 'final'])"
    kernel.run('%%dspex predict "question -> answer" --no-stream -a -o h\nlater?')  # a view: -a works too
    assert kernel.value("h.result().answer.startswith(\"Demo LM answer to 'later?'\")") == "True"


def test_stop_during_an_awaited_run_cancels_it_at_once(kernel: Kernel) -> None:
    """``await pool.run_async(...)``: ipykernel cancels an async cell on Stop only once it has ended by itself
    (ipython/ipykernel#881); the awaited run is cancelled at once instead of running to its end."""
    kernel.run(MANY_CALLS)
    with kernel.demo_lm("--set ttft=0.5"):  # 5 s of LM calls unless stopped
        before = kernel.value("lm_calls()")
        cell = interrupt_on_output(kernel, 'say_when_the_lm_is_called("called")\n'
                                           'await magics.pool.run_async(ten_calls, question="why?")', "called")
        assert cell.error.startswith("Cancelled: "), cell.error
        made = int(kernel.value(f"lm_calls_once_idle({before})"))
    assert 1 <= made < 10, made


def test_stop_pressed_twice_while_a_cell_waits_still_cancels_and_reads_as_an_interrupt() -> None:
    """A second Ctrl-C that lands while ``Event.wait`` takes its lock back after the first makes the wait fail
    with "release unlocked lock" (seen on a blocking batch, Stop pressed twice): the work is cancelled all
    the same, and the cell reads it as an interrupt, not a RuntimeError (the timing is forced here)."""
    from dspex_nb.pool.calls import wait_interruptibly

    class StoppedTwice(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise RuntimeError("release unlocked lock") from None

    cancelled: list[bool] = []
    with pytest.raises(KeyboardInterrupt):
        wait_interruptibly(StoppedTwice(), None, lambda: cancelled.append(True))
    assert cancelled == [True]


def test_stop_landing_while_the_view_draws_itself_still_leaves_the_answer_in_the_saved_output(
        kernel: Kernel) -> None:
    """Ctrl-C that lands in the view's first refresh (here forced: the refresh raises it) stops the run, and
    the pump still replaces the live view by its static rendering, so the saved notebook shows the cancelled
    run, not a widget that cannot be shown once reopened."""
    kernel.run("from dspex_nb.ui import widgets\n"
               "drawn = widgets.StreamView.refresh\n"
               "def interrupted_once(view):\n"
               "    widgets.StreamView.refresh = drawn\n"
               "    raise KeyboardInterrupt\n"
               "widgets.StreamView.refresh = interrupted_once")
    with kernel.demo_lm("--set answer_tokens=20000 --set per_token=0.005"):  # about 100 s if not stopped
        shown: list[str] = []
        final: list[dict] = []

        def on_message(kind: str, content: dict) -> None:
            display_id = content.get("transient", {}).get("display_id")
            if kind == "display_data" and display_id:
                shown.append(display_id)
            elif kind == "update_display_data" and display_id in shown:
                final.append(content["data"])

        cell = kernel.collect(kernel.submit('%%dspex predict "question -> answer"\nstopped at once'),
                              on_message=on_message)
        assert cell.traceback.startswith("dspex: interrupted; the remote work was cancelled"), cell.traceback
        deadline = time.monotonic() + 30
        while not final and time.monotonic() < deadline:  # the pump's update comes after the cell ended
            with contextlib.suppress(queue.Empty):
                msg = kernel.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
                on_message(msg["msg_type"], msg["content"])
    assert final, "the live view was never replaced by its static rendering"
    assert "application/vnd.jupyter.widget-view+json" not in final[-1]
    assert final[-1]["text/plain"].splitlines()[-1].startswith("cancelled · predict on w")


API = ("import dspy\n"
       "qa = dspy.Predict('question -> answer')\n"
       "pool = get_ipython().find_line_magic('dspex').__self__.pool\n")


def test_stop_during_evaluate_raises_cancelled_rather_than_scoring_what_never_ran(kernel: Kernel) -> None:
    """Stop on ``pool.evaluate``'s view stops its batch; the examples that never ran are not scored as failures
    (which gave a low score, or DSPy's 'Execution cancelled due to errors' after ten error lines)."""
    kernel.run(API)
    with kernel.demo_lm("--set ttft=0.2"):
        cell = click_stop_while_blocked(
            kernel, "devset = [dspy.Example(question=f'q{i}?', answer='a').with_inputs('question')\n"
                    "          for i in range(300)]\n"
                    "pool.evaluate(qa, devset, lambda example, pred, trace=None: 1.0, journal=False,\n"
                    "              display_progress=True)")
    assert cell.error.startswith("Cancelled: the batch was cancelled after "), cell.error
    assert "Average Metric" not in cell.stderr and "Error for Example" not in cell.stderr, cell.stderr


def final_update(kernel: Kernel, display_id: str, updates: list[tuple[str, dict]]) -> dict:
    """The static rendering that replaces the view ``display_id`` once its run ends, which may come after its
    cell has ended, from the pump thread (whose messages name the cell that started it)."""
    deadline = time.monotonic() + 30
    while not (mine := [data for shown, data in updates if shown == display_id and "text/html" in data]):
        assert time.monotonic() < deadline, "the view was not replaced by a static rendering"
        with contextlib.suppress(queue.Empty):
            msg = kernel.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["msg_type"] == "update_display_data":
                updates.append((msg["content"]["transient"]["display_id"], msg["content"]["data"]))
    return mine[-1]


def test_a_run_as_a_cells_value_is_a_live_view_whose_answer_is_saved(kernel: Kernel) -> None:
    """``pool.run_stream(...)`` as a cell's value shows its answer as it streams (not '<Run ...: running, 0
    chunks>'), and what the saved notebook keeps is the answer."""
    kernel.run(API)
    shown: list[dict] = []
    updates: list[tuple[str, dict]] = []

    def on_message(kind: str, content: dict) -> None:
        if kind == "display_data":
            shown.append(content)
        elif kind == "update_display_data":
            updates.append((content["transient"]["display_id"], content["data"]))

    kernel.collect(kernel.submit("pool.run_stream(qa, question='Shown?')"), on_message=on_message)
    assert [content["data"]["text/plain"] for content in shown] == [
        f"<dspex stream: run Predict('question -> answer')> ({UNFINISHED})"]
    assert "application/vnd.jupyter.widget-view+json" in shown[0]["data"]
    data = final_update(kernel, shown[0]["transient"]["display_id"], updates)
    assert "application/vnd.jupyter.widget-view+json" not in data
    assert "answer: Demo LM answer to 'Shown?'" in data["text/plain"], data["text/plain"]
    assert "run Predict(&#x27;question -&gt; answer&#x27;)" in data["text/html"]
    assert kernel.value("type(_).__name__, _.status") == "('Run', 'done')"
    kernel.run("%config Dspex.display = 'text'")  # the API's views follow the magics' setting
    try:
        text = kernel.run("pool.map(qa, ['Plain?'], journal=False).result()[0].answer")
        assert "display_data" not in text.counts and "Demo LM answer to 'Plain?'" in text.plain[-1], text.plain
    finally:
        kernel.run("%config Dspex.display = 'auto'")


def test_a_loop_over_a_map_shows_its_view_and_its_summary_once_the_loop_ends(kernel: Kernel) -> None:
    """``for p in pool.map(...)`` shows the batch's view beside the loop, and its summary replaces the view as the loop
    ends (it came at the pump's next tick, after the cell's next lines: a notebook run by nbconvert kept the widget)."""
    kernel.run(API)
    shown: list[dict] = []

    def on_message(kind: str, content: dict) -> None:
        if kind in ("display_data", "update_display_data"):  # sent at once, as stdout is not
            shown.append(content)

    kernel.run("from dspex_nb.ui.pump import PUMP\nPUMP.interval = 3")  # its ticks cannot end the view in time
    try:
        with kernel.demo_lm("--set ttft=0.3"):  # the batch outlasts its view's first drawing
            cell = kernel.collect(kernel.submit("answers = [p.answer for p in pool.map(qa, [f'loop {i}?' for i in "
                                                "range(40)], journal=False)]\ndisplay('after the loop')"),
                                  on_message=on_message)
    finally:
        kernel.run("PUMP.interval = 0.1")
    assert not cell.error, cell.error
    view = next(m for m in shown if "application/vnd.jupyter.widget-view+json" in m["data"])
    ours = [m for m in shown if m.get("transient", {}).get("display_id") == view["transient"]["display_id"]]
    after = shown[-1]  # the pool's dashboard of an earlier cell may be updated meanwhile, at a tick: not the batch's
    *ticks, final = ours[1:]  # ticks: the view's text twin where the loop outlasted a tick (a loaded machine)
    assert ours[0] is view and not any(t["data"]["text/plain"].startswith("batch done") for t in ticks), ticks
    assert shown.index(final) < shown.index(after)
    assert final["data"]["text/plain"].startswith("batch done: 40 items, 40 ok"), final
    assert after["data"]["text/plain"] == "'after the loop'"
    assert kernel.value("len(answers), answers[39].startswith(\"Demo LM answer to 'loop 39?'\")") == "(40, True)"


def test_a_batch_looped_over_is_let_go_once_the_loop_ends(kernel: Kernel) -> None:
    """The view a loop over a map shows beside it no longer keeps its batch once the batch ended: each batch looped
    over was kept for the kernel's life, with every item's result."""
    kernel.run(API + "import gc, weakref\n")
    kernel.run("batch = pool.map(qa, ['let go 1?', 'let go 2?'], journal=False)\n"
               "answers = [p.answer for p in batch]\nlooped = weakref.ref(batch)\ndel batch")
    assert kernel.value("gc.collect(); looped() is None") == "True"


def test_stop_on_a_blocking_map_result_cancels_it_and_the_workers_go_idle(kernel: Kernel) -> None:
    """``pool.map(...).result()`` blocks the cell: it shows the batch's dashboard, whose Stop cancels the
    remote work (not only the kernel's interrupt); a handle a view shows already gets no second one."""
    kernel.run(API)
    with kernel.demo_lm("--set ttft=0.2"):
        cell = click_stop_while_blocked(
            kernel, "pool.map(qa, [f'slow {i}?' for i in range(300)], concurrency=1, journal=False).result()")
        assert cell.error.startswith("Cancelled: the batch was cancelled after "), cell.error
        assert cell.plain == [f"<dspex batch: map Predict('question -> answer'), 300 items> ({UNFINISHED})"], cell.plain
        idle = kernel.value(
            "import time\n"
            "deadline = time.monotonic() + 20\n"
            "while any(r['in_flight'] for r in pool.status()) and time.monotonic() < deadline: time.sleep(0.05)\n"
            "[r['in_flight'] for r in pool.status()]")
        assert idle == "[0, 0]"
    kernel.run('%%dspex predict "question -> answer" -a -o h\nin the background')
    later = kernel.run("h.result().answer")
    assert "display_data" not in later.counts and "in the background" in later.plain[-1]
    watched = kernel.run("seen = []\nlen(pool.map(qa, ['a?', 'b?'], on_item=seen.append, journal=False).result()), "
                         "len(seen)")  # a caller's callback takes the items: no view of its own
    assert "display_data" not in watched.counts and watched.plain[-1] == "(2, 2)", watched.plain


def test_a_view_running_when_the_kernel_shuts_down_is_replaced_by_its_final_text() -> None:
    """Jupyter's Shut Down / Restart Kernel while a background view streams and a cell blocks: the view's widgets
    stayed in the notebook saved after ("model not found" on reopening), as ipykernel ends the pump's thread before
    atexit. Its shutdown request now stops the view's work and replaces the view with its final text first."""
    own = Kernel()
    try:
        own.run("%load_ext dspex_nb\n%dspex start -n 2\n%dspex lm demo --set answer_tokens=20000 --set per_token=0.01")
        shown: list[dict] = []
        own.collect(own.submit('%%dspex predict "question -> answer" -a -o bg\nin the background'),
                    on_message=lambda kind, content: shown.append(content) if kind == "display_data" else None)
        view = shown[0]["transient"]["display_id"]
        own.run("import time\ndeadline = time.monotonic() + 30\n"
                "while bg.received < 3 and time.monotonic() < deadline: time.sleep(0.05)")
        own.submit("bg.wait()")  # a cell that blocks the kernel's main thread, as the browser's restart found it
        own.kc.shutdown()
        updates: list[dict] = []
        deadline = time.monotonic() + 30
        while not updates and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                msg = own.kc.get_iopub_msg(timeout=1)
                if msg["msg_type"] == "update_display_data" and msg["content"]["transient"]["display_id"] == view:
                    updates.append(msg["content"]["data"])
        assert updates, "the view was not replaced before the kernel ended"
        assert "application/vnd.jupyter.widget-view+json" not in updates[-1]
        assert updates[-1]["text/plain"].splitlines()[-1].startswith("cancelled · predict on w"), updates[-1]
    finally:
        own.kc.stop_channels()
        own.km.shutdown_kernel(now=True)
