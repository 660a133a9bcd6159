"""What a program writes on the pool (its prints, its threads' prints, DSPy's log records) reaches the kernel's
stdout / stderr as it would in the kernel: with ``run``, ``run_stream`` and ``map``, with a call's error, each call
its own text, a flood capped with a line naming the worker's log."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator

import dspy
import pytest
from helpers import pid_alive, wait_until, worker_pids

from dspex_nb import Pool
from dspex_nb.worker.demo_lm import make_demo_lm
from dspex_nb.worker.output import OUTPUT_LIMIT


class Chatty(dspy.Module):
    """Prints as DSPy's docs' tools and agents do; its thread prints to stderr; its predictor is given a field its
    signature lacks, for which DSPy logs a warning."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        print(f"looking up {question}")
        print("step", 1, "done")
        thread = threading.Thread(target=lambda: print(f"thread saw {question}", file=sys.stderr))
        thread.start()
        thread.join()
        return self.answer(question=question, hint="unused")


class Fails(dspy.Module):
    def forward(self, question: str) -> dspy.Prediction:
        print(f"about to fail on {question}")
        raise ValueError("no answer")


class Repeats(dspy.Module):
    def forward(self, question: str) -> dspy.Prediction:
        for i in range(200):
            print(f"{question} {i}")
            time.sleep(0.002)  # the two calls' prints interleave on the worker
        return dspy.Prediction(answer=question)


class Floods(dspy.Module):
    def forward(self, question: str) -> dspy.Prediction:
        print("x" * 100_000_000)
        return dspy.Prediction(answer="flooded")


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    """One worker: concurrent calls share it."""
    with Pool(workers=1, lm="demo") as p:
        yield p
        started = worker_pids(p)
    wait_until(lambda: not any(pid_alive(pid) for pid in started), what="the pool's workers to exit")


def _untimed(text: str) -> str:
    """Log records without their time (DSPy's format starts with it)."""
    return re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", text, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def in_kernel() -> tuple[str, str]:
    """What Chatty writes to stdout and stderr run in the kernel."""
    out, err = _captured(lambda: Chatty()(question="Q"))
    assert "looking up Q" in out and "Input contains fields not in signature" in err
    return out, _untimed(err)


def _captured(call: object) -> tuple[str, str]:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), dspy.context(lm=make_demo_lm()[0]):
        call()  # type: ignore[operator]
    return out.getvalue(), err.getvalue()


def test_run_writes_the_programs_output_to_the_kernels_stdout_and_stderr(
        pool: Pool, in_kernel: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    pool.run(Chatty(), question="Q")
    out, err = capsys.readouterr()
    assert (out, _untimed(err)) == in_kernel


def test_run_stream_brings_it_as_output_chunks_before_the_tokens(
        pool: Pool, in_kernel: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[str] = []
    run = pool.call(Chatty(), {"question": "Q"}, stream=True, on_chunk=lambda chunk: seen.append(chunk.kind))
    run.result()
    out, err = capsys.readouterr()
    assert (out, _untimed(err)) == in_kernel
    outputs = [chunk for chunk in run.chunks if chunk.kind == "output"]
    assert {chunk["stream"] for chunk in outputs} == {"stdout", "stderr", "log"}  # DSPy's record, as a record
    assert len(outputs) < 5  # coalesced: not a chunk per write (a print is two)
    assert seen.index("output") < seen.index("token") and "output" not in seen[seen.index("token"):]


def test_map_writes_every_items_output(pool: Pool, capsys: pytest.CaptureFixture[str]) -> None:
    pool.map(Chatty(), [{"question": f"q{i}"} for i in range(3)], journal=False).result()
    out, err = capsys.readouterr()
    assert all(out.count(f"looking up q{i}") == 1 for i in range(3))  # (the items' threads print at once, as
    # they do in the kernel: a print's text and its newline are two writes, so lines may interleave)
    assert err.count("Input contains fields not in signature") == 3


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_calls_output_comes_back_with_its_error(stream: bool, pool: Pool,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="no answer"):
        run = pool.call(Fails(), {"question": "Q"}, stream=stream)
        run.result() if stream else None
    assert capsys.readouterr().out == "about to fail on Q\n"


def test_two_calls_on_one_worker_each_get_their_own_output(pool: Pool, capsys: pytest.CaptureFixture[str]) -> None:
    runs = {tag: pool.run_stream(Repeats(), question=tag) for tag in ("A", "B")}
    for run in runs.values():
        run.result()
    assert runs["A"].first_chunk_at < runs["B"].finished and runs["B"].first_chunk_at < runs["A"].finished
    assert runs["A"].worker == runs["B"].worker
    for tag, run in runs.items():
        text = "".join(chunk["text"] for chunk in run.chunks if chunk.kind == "output")
        assert text == "".join(f"{tag} {i}\n" for i in range(200))
    capsys.readouterr()


def test_a_flood_is_capped_with_a_line_naming_the_workers_log(pool: Pool, capsys: pytest.CaptureFixture[str]) -> None:
    assert pool.run(Floods(), question="Q").answer == "flooded"
    out, err = capsys.readouterr()
    assert out == "x" * OUTPUT_LIMIT
    log = str(pool.workers[0].process.log_path)
    assert err == (f"\n[dspex: this call printed more than 1 MB; the rest is in the worker's log only: {log}]\n")


class PrintsKey(dspy.Module):
    def forward(self, question: str) -> dspy.Prediction:
        print("Authorization: Bearer abcdefgh0123456789")
        return dspy.Prediction(answer=question)


@pytest.mark.parametrize("stream", [False, True])
def test_a_secret_printed_is_masked(stream: bool, pool: Pool, capsys: pytest.CaptureFixture[str]) -> None:
    run = pool.call(PrintsKey(), {"question": "Q"}, stream=stream)
    run.result() if stream else None
    out = capsys.readouterr().out
    assert out.startswith("Authorization: Bearer ") and "abcdefgh0123456789" not in out


class PrintsKeyNamedFields(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.summarize = dspy.Predict("text -> key_points, token_summary")

    def forward(self, text: str) -> dspy.Prediction:
        prediction = self.summarize(text=text)
        print(prediction)  # its fields' quoted values were taken for secrets: key_points="*** LM answer ..."
        return prediction


def test_a_printed_prediction_whose_fields_are_named_like_keys_is_shown_as_in_the_kernel(
        pool: Pool, capsys: pytest.CaptureFixture[str]) -> None:
    expected, _ = _captured(lambda: PrintsKeyNamedFields()(text="bees"))
    assert 'key_points="Demo LM answer' in expected
    pool.run(PrintsKeyNamedFields(), text="bees")
    assert capsys.readouterr().out == expected


def test_a_call_that_prints_nothing_brings_no_output_chunk(pool: Pool) -> None:
    run = pool.run_stream(dspy.Predict("question -> answer"), question="Q")
    run.result()
    assert [chunk for chunk in run.chunks if chunk.kind == "output"] == []


KEY = "sk-" + "a" * 10 + "b" * 30


class PrintsKeyInPieces(dspy.Module):
    """Prints a secret (``os.environ``'s) as a program may: in two writes with a pause between (a stream's first
    chunk goes before the second), after 64 KiB of text (a chunk's end), just before the 1 MB a call brings back."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, question: str) -> dspy.Prediction:
        import os
        key = os.environ["ADV_API_KEY"]
        if self.how == "pieces":
            print(key[:13], end="")
            time.sleep(0.3)
            print(key[13:])
        else:
            print("x" * ((64 * 1024 if self.how == "chunk" else OUTPUT_LIMIT) - 10) + key)
        return dspy.Prediction(answer=question)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("how", ["pieces", "chunk", "limit"])
def test_a_secret_is_masked_whole_wherever_its_pieces_go(how: str, stream: bool, pool: Pool,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ADV_API_KEY", KEY)  # set after the pool started, as a notebook's cell sets a key
    run = pool.call(PrintsKeyInPieces(how), {"question": "Q"}, stream=stream)
    run.result() if stream else None
    out = capsys.readouterr().out
    assert "***" in out and "sk-aaaaaaa" not in out and "bbbbbbb" not in out
