"""Terminal IPython: tokens appear as they come and a batch shows one live status line, updated in place;
outside a terminal (a pipe, CI, nbval) the output stays the plain final lines."""

from __future__ import annotations

import enum
import io
import re

import dspy
import pytest

from dspex_nb import Pool
from dspex_nb.ui.progress import StreamText, batch_line, terminal_batch_line
from dspex_nb.ui.render import _terminal, show_batch, show_run


class Terminal(io.StringIO):
    """A TTY that counts writes (tokens as they come are many small writes)."""

    writes = 0

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture(autouse=True)
def interactive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSPEX_NONINTERACTIVE", raising=False)  # nbval's conftest sets it for the whole run


def test_tokens_are_printed_as_they_come_in_a_terminal(pool: Pool) -> None:
    screen = Terminal()
    run = pool.execute_stream("chain_of_thought", {"signature": "question -> answer", "inputs": "Why?"})
    show_run(run, "cot", mode="text", out=screen)
    text = screen.getvalue()
    answer = run.result()["answer"]
    assert text.startswith("reasoning: Demo LM reasoning about 'Why?'")
    assert f"\nanswer: {answer}\n" in text and text.rstrip().splitlines()[-1].startswith("done · ")
    assert text.count("answer: ") == 1  # streamed once, not printed again at the end
    assert screen.writes > 20  # token by token, not line by line


def test_a_batch_shows_one_live_line_in_a_terminal(pool: Pool) -> None:
    pool.configure_lm("demo", ttft=0.03)
    try:
        screen = Terminal()
        batch = pool.batch([f"live {i}?" for i in range(80)], "question -> answer", concurrency=1, journal=False)
        show_batch(batch, "b", mode="text", out=screen)
    finally:
        pool.configure_lm("demo")
    text = screen.getvalue()
    assert text.count("\r") >= 2 and re.search(r"items \(\d+%\) · ok", text), repr(text)  # rewritten in place
    assert text.splitlines()[-1].startswith("batch done: 80 items, 80 ok, 0 failed"), repr(text)


def test_outside_a_terminal_the_output_is_the_final_lines(pool: Pool) -> None:
    pipe = io.StringIO()
    run = pool.execute_stream("predict", {"signature": "question -> answer", "inputs": "Why?"})
    show_run(run, "p", mode="text", out=pipe)
    assert "\r" not in pipe.getvalue() and pipe.getvalue().startswith("answer: Demo LM answer to 'Why?'")


@pytest.mark.parametrize(("value", "live"), [("0", True), ("false", True), ("No", True), ("off", True),
                                             ("1", False), ("true", False), ("yes", False)])
def test_dspex_noninteractive_reads_as_a_flag(monkeypatch: pytest.MonkeyPatch, value: str, live: bool) -> None:
    monkeypatch.setenv("DSPEX_NONINTERACTIVE", value)
    assert _terminal(Terminal()) is live


HOSTILE = "\x1b[1A\x1b[2K\rdone · all fine\x1b]0;owned\x07\x9b2J"  # up a line, erase it, retitle the terminal


@pytest.mark.parametrize("screen", [Terminal(), io.StringIO()], ids=["terminal", "pipe"])
def test_an_answers_control_characters_are_printed_as_escapes(pool: Pool, screen: io.StringIO) -> None:
    # the demo LM echoes the question: an answer holding an ANSI sequence or a carriage return could rewrite the
    # lines above it, the summary, or the terminal's title; it is shown as its escapes instead
    run = pool.execute_stream("predict", {"signature": "question -> answer", "inputs": HOSTILE})
    show_run(run, "p", mode="text", out=screen)
    text = screen.getvalue()
    assert not any(c in text for c in "\x1b\r\x07\x9b"), repr(text)
    assert "\\x1b[1A\\x1b[2K" in text and "fine\\x1b]0;owned\\x07\\x9b2J" in text
    assert "\x1b[1A\x1b[2K" in run.result()["answer"]  # the value itself is as the LM gave it


def test_a_failed_items_control_characters_are_printed_as_escapes(pool: Pool) -> None:
    def fails(question: str) -> str:
        raise ValueError(question)

    pipe = io.StringIO()
    show_batch(pool.map(fails, [HOSTILE]), "b", mode="text", out=pipe)
    assert "\x1b" not in pipe.getvalue() and "ValueError: \\x1b[1A" in pipe.getvalue(), repr(pipe.getvalue())


def test_items_that_failed_alike_are_one_line_not_one_line_each(pool: Pool) -> None:
    # a batch of 2,000 where every odd item failed with the same error printed 1,000 identical lines
    def odd_fails(question: str) -> str:
        if int(question) % 2:
            raise ValueError("odd item")
        if question == "8":
            raise KeyError(question)
        return question

    pipe = io.StringIO()
    show_batch(pool.map(odd_fails, [str(i) for i in range(2000)], max_errors=2000, journal=False), "b", mode="text",
               out=pipe)
    assert pipe.getvalue().splitlines()[1:] == ["  1,000 items (1, 3, 5, 7, 9, …): ValueError: odd item",
                                                "  item 8: KeyError: '8'"], pipe.getvalue()


def test_the_live_line_fits_the_terminal_so_rewriting_it_leaves_no_rows_behind(pool: Pool,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # a line wider than the terminal wraps, and "\r" goes back to the start of its last row only: each refresh of
    # the ~110-character line left a row behind in an 80-column terminal, a flood where tqdm keeps one line
    monkeypatch.setenv("COLUMNS", "60")
    pool.configure_lm("demo", ttft=0.03)
    try:
        screen = Terminal()
        show_batch(pool.batch([f"narrow {i}?" for i in range(40)], "question -> answer", concurrency=1,
                              journal=False), "b", mode="text", out=screen)
    finally:
        pool.configure_lm("demo")
    *live, summary = screen.getvalue().split("\r")
    assert len(live) >= 3 and all(len(line) < 60 for line in live), live
    shown = [line for line in live if line.strip()]  # the last clears the line
    assert all(re.match(r"\d+/40 items \(\d+%\) · ", line) and not line.endswith("…") for line in shown), live
    assert summary.startswith("batch done: 40 items")


SNAPSHOT = {"status": "running", "ok": 1200, "failed": 34, "total": 10_000, "running": 8, "queued": 8758, "rate": 9.87,
            "elapsed": 125.0, "eta": 7384.0, "retries": 2, "replaced": 0, "from_journal": 0, "tokens_in": 5000,
            "tokens_out": 800}


@pytest.mark.parametrize("columns, line", [
    (200, "1,234/10,000 items (12%) · ok 1,200 · failed 34 · running 8 · queued 8,758 · 9.9 items/s · 2 min 05 s · "
          "ETA 2 h 03 min · 5,000 tokens in / 800 out · 2 retried"),
    (100, "1,234/10,000 items (12%) · ok 1,200 · failed 34 · 9.9 items/s · 2 min 05 s · ETA 2 h 03 min"),
    (80, "1,234/10,000 items (12%) · failed 34 · 9.9 items/s · ETA 2 h 03 min"),
    (60, "1,234/10,000 items (12%) · failed 34 · ETA 2 h 03 min"),
    (20, "1,234/10,000 items…"),
])
def test_a_narrow_terminal_leaves_out_the_least_useful_parts_of_the_batch_line_first(columns: int, line: str) -> None:
    # was: the line was cut at the terminal's width, so the ETA, near its end, went first; as tqdm, it keeps
    # n/total (with the percentage), the rate and the ETA, and here the failures
    assert terminal_batch_line(SNAPSHOT, columns) == line
    assert batch_line(SNAPSHOT).startswith("1,234/10,000 items · ok 1,200 · ")  # the dashboard's line is whole


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Rate(dspy.Signature):
    """Rate it."""

    text: str = dspy.InputField()
    answer: str = dspy.OutputField()
    level: Level = dspy.OutputField()  # ChatAdapter cannot parse the demo LM's "1": DSPy asks again with JSONAdapter


def test_a_call_asked_again_after_its_reply_streamed_shows_the_answer_not_the_first_reply(pool: Pool) -> None:
    # Was: DSPy's ChatAdapter, which run_stream lets fall back to JSONAdapter as the call does unstreamed (where
    # dspy.streamify raises AdapterParseError), asked again once the first reply had streamed: a terminal showed that
    # reply's answer as the answer, and the views ran the next attempt's tokens on after it
    run = pool.run_stream(dspy.Predict(Rate), text="fine")
    screen = Terminal()
    show_run(run, "rate", mode="text", out=screen)
    answer = run.result(30).answer
    retry = [chunk.data for chunk in run if chunk.kind == "status" and "retry" in chunk.data]
    assert retry == [{"message": "asking again with JSONAdapter: ChatAdapter could not parse the reply streamed so far",
                      "retry": "self"}]
    first = "".join(chunk["text"] for chunk in run if chunk.kind == "token")
    assert first != answer  # the reply that did not parse streamed; the JSON one is the answer
    lines = screen.getvalue().splitlines()
    assert lines[:2] == [f"answer: {first}", f"({retry[0]['message']})"]
    assert lines[2:4] == [f"answer: {answer}", "level: <Level.HIGH: 2>"] and lines[4].startswith("done · ")
    text = StreamText(run)
    text.update()
    assert text.groups == {"self": {"answer": answer, "level": "<Level.HIGH: 2>"}}


class AskedTwice(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        self.qa(question=f"{question} first")
        return self.qa(question=f"{question} again")


def test_a_predictor_called_again_streams_its_field_anew_not_run_on(pool: Pool) -> None:
    # Was: a module calling one predictor twice (its own loop, ReAct's steps) showed both calls' tokens as one text
    run = pool.run_stream(AskedTwice(), question="Why?")
    screen = Terminal()
    show_run(run, "twice", mode="text", out=screen)
    answer = run.result(30).answer
    assert "Why? again" in answer
    lines = screen.getvalue().splitlines()
    assert lines[0].startswith("answer: Demo LM answer to 'Why? first'") and lines[1] == f"answer: {answer}"
    text = StreamText(run)
    text.update()
    assert text.groups == {"qa": {"answer": answer}}
