"""Odd exceptions from user code, slow consumers and large chunks never cost a result or a worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from helpers import pid_alive, wait_until

from dspex_nb import Pool
from dspex_nb.batch import BatchRun
from dspex_nb.errors import ArgumentError, Cancelled, ChunksDropped, DspexError, ToolError, WorkerStartError
from dspex_nb.pool.calls import Chunk, Run
from dspex_nb.pool.process import LOG_LIMIT
from dspex_nb.typed import NotPortable
from dspex_nb.wire import started_by

ODD = ["SystemExit", "KeyboardInterrupt", "GeneratorExit"]


@pytest.mark.parametrize("kind", ODD)
def test_base_exceptions_from_user_code_are_errors_and_the_worker_lives(pool: Pool, kind: str) -> None:
    with pytest.raises(ToolError, match=f"{kind}: from user code"):
        pool.execute("fail", {"message": "from user code", "type": kind}, timeout=30)
    run = pool.execute_stream("fail", {"message": "from user code", "type": kind}, timeout=30)
    with pytest.raises(ToolError, match=f"{kind}: from user code"):
        run.result(30)
    assert run.status == "failed"
    assert pool.execute("echo", {"alive": True}) == {"alive": True}


@pytest.mark.parametrize("kind", ODD)
def test_a_batch_item_raising_a_base_exception_fails_alone(pool: Pool, kind: str) -> None:
    pool.define(f"odd_{kind}", f"def odd_{kind}(text):\n    if text == 'bad':\n        raise {kind}('odd')\n"
                               "    return dspy.Prediction(text=text)\n")
    batch = pool.batch(["a", "bad", "b"], module=f"odd_{kind}", journal=False)
    batch.wait(60)
    assert [r["ok"] for r in batch.records] == [True, False, True]
    assert batch.records[1]["error"]["type"] == kind and batch.records[1]["tries"] == 1


def test_input_in_a_program_fails_at_once_and_the_worker_lives(pool: Pool) -> None:
    # a human-in-the-loop tool calls input(): nobody can answer it on a worker, and its stdin is the pipe it
    # watches for its parent's end
    pool.define("ask", "def ask(question):\n    return dspy.Prediction(answer=input(question))\n")
    with pytest.raises(ToolError, match="EOFError: input\\(\\) has no one to answer it"):
        pool.call("ask", {"question": "Name? "}, timeout=30)  # without the fix: CallTimeout after 30 s
    batch = pool.map("ask", ["Name? "], journal=False, item_timeout=30, max_retries=0)
    batch.wait(60)
    assert batch.records[0]["error"]["type"] == "EOFError"
    assert pool.execute("echo", {"alive": True}) == {"alive": True}


def test_fail_takes_only_exception_names(pool: Pool) -> None:
    with pytest.raises(ArgumentError, match="must name a built-in exception, got 'eval'"):
        pool.execute("fail", {"message": "print('pwned')", "type": "eval"})


CALLBACK_EXITS = [SystemExit(3), asyncio.CancelledError()]  # BaseExceptions a callback may raise


@pytest.mark.parametrize("exit_", CALLBACK_EXITS, ids=lambda exc: type(exc).__name__)
def test_an_on_chunk_callback_raising_a_base_exception_fails_the_run(pool: Pool, exit_: BaseException) -> None:
    def on_chunk(chunk: Chunk) -> None:
        if chunk.seq > 10:
            raise exit_

    run = pool.execute_stream("count", {"n": 1_000_000}, on_chunk=on_chunk, timeout=60)
    with pytest.raises(type(exit_)):  # without the fix: result() returned None, the status "done"
        run.result(60)
    assert run.status == "failed" and run.error is exit_
    assert pool.execute("echo", {"alive": True}) == {"alive": True}


def test_an_on_chunk_callback_whose_pool_call_fails_stops_the_remote_work(pool: Pool) -> None:
    # Was: a dspex error out of the callback (a call to the pool in it that failed: ArgumentError, CallTimeout,
    # WorkerBusy) was taken for the transport's: the run failed and its worker's place was freed, but the stream was
    # never cancelled, so the worker ran the call on (its LM calls too) with nobody reading it
    def on_chunk(chunk: Chunk) -> None:
        if chunk.seq > 10:
            pool.execute("echo", ["not", "a", "dict"], worker="w1")

    run = pool.execute_stream("count", {"n": 10**9}, worker="w0", on_chunk=on_chunk, timeout=120)
    with pytest.raises(ArgumentError, match="arguments must be a dict"):
        run.result(60)
    assert run.status == "failed"
    wait_until(lambda: pool.describe("w0")["counters"]["active_requests"] == 0, timeout=30,
               what="w0 to stop the call whose callback failed")


@pytest.mark.parametrize("waits", [lambda run: run.result(), lambda run: run.wait(5), lambda run: list(run)],
                         ids=["result", "wait", "iterate"])
def test_an_on_chunk_callback_that_waits_for_its_own_run_is_told_so(pool: Pool, waits: Callable[[Run], Any]) -> None:
    # Was: it waited for the chunks it held up: for ever (the run and its worker's place taken until the kernel
    # restarts), or until its timeout, with "'count' is still running after 5 s"
    runs: list[Run] = []
    run = pool.execute_stream("count", {"n": 10**9}, on_chunk=lambda chunk: runs and waits(runs[0]), timeout=120)
    runs.append(run)
    with pytest.raises(RuntimeError, match="in its own on_chunk callback would wait for what the callback holds up"):
        run.result(60)
    assert run.status == "failed"
    assert all(row["in_flight"] == 0 for row in pool.status())


def test_an_on_item_callback_that_waits_for_its_own_batch_is_told_so(pool: Pool) -> None:
    # Was: it waited for the items it held up: for ever, or until its timeout ("still running after 5 s")
    batches: list[BatchRun] = []
    batch = pool.batch(["a", "b", "c"], "question -> answer", on_item=lambda record: batches and batches[0].result(),
                       journal=False)
    batches.append(batch)
    with pytest.raises(RuntimeError, match="in its own on_item callback would wait for what the callback holds up"):
        batch.result(60)
    assert batch.status == "failed"


@pytest.mark.parametrize("exit_", CALLBACK_EXITS, ids=lambda exc: type(exc).__name__)
def test_an_on_item_callback_raising_a_base_exception_fails_the_batch(pool: Pool, exit_: BaseException) -> None:
    def on_item(record: dict) -> None:
        if record["index"] == 1:
            raise exit_

    batch = pool.batch(["a", "b", "c", "d"], "question -> answer", on_item=on_item, shard_size=1, journal=False)
    with pytest.raises(type(exit_)):  # without the fix: items the pool computed failed ("the shard ended
        batch.result(60)  # without this item") and the batch was "done"
    assert batch.status == "failed" and batch.records[1]["ok"]


def test_a_slow_consumer_makes_the_producer_wait(pool: Pool) -> None:
    gate = threading.Event()
    before = pool.describe("w0")
    run = pool.execute_stream("count", {"n": 5_000_000}, worker="w0", on_chunk=lambda chunk: gate.wait(60))
    try:
        wait_until(lambda: pool.describe("w0")["counters"].get("stream_producer_waits", 0) >
                   before["counters"].get("stream_producer_waits", 0), timeout=60, what="the producer to wait")
        grown = pool.describe("w0")["rss_bytes"] - before["rss_bytes"]
        assert grown < 200 * 2**20, f"the worker grew {grown / 2**20:.0f} MB for a reader that does not read"
    finally:
        run.cancel()
        gate.set()
    assert run.wait(30) and run.status == "cancelled"


def test_a_callback_that_never_returns_does_not_hold_a_cancelled_run(pool: Pool) -> None:
    # was: cancel() gave up after 5 s and the run stayed "running" for as long as the callback hung: wait() and
    # result() never returned, and its worker's place stayed taken (a few such runs and the pool refused every call
    # with QueueTimeout, its workers idle)
    hang = threading.Event()
    try:
        run = pool.execute_stream("count", {"n": 1_000_000}, worker="w0", on_chunk=lambda chunk: hang.wait(120))
        wait_until(lambda: run.received > 0, what="the first chunk")
        assert run.cancel()
        assert run.wait(30) and run.status == "cancelled"
        with pytest.raises(Cancelled):
            run.result(30)
        assert next(row["in_flight"] for row in pool.status() if row["worker"] == "w0") == 0
        assert pool.execute("echo", {"alive": True}, worker="w0") == {"alive": True}

        batch = pool.batch(["a", "b", "c", "d"], "question -> answer", on_item=lambda record: hang.wait(120),
                           shard_size=1, journal=False)
        wait_until(lambda: batch.ok > 0, what="the first item")
        assert batch.cancel()
        assert batch.wait(30) and batch.status == "cancelled" and batch.ok >= 1  # what arrived is kept
        assert all(row["in_flight"] == 0 for row in pool.status())
    finally:
        hang.set()


def test_a_recursion_limit_a_program_lowered_does_not_fail_the_programs_after_it(pool: Pool) -> None:
    pool.define("shallow", "import sys\ndef shallow(text):\n    sys.setrecursionlimit(60)\n"
                           "    return dspy.Prediction(text=text)\n")
    assert pool.execute("run_module", {"name": "shallow", "inputs": {"text": "a"}}, worker="w0")["text"] == "a"
    # was: RecursionError, in every call on that worker from then on
    answer = pool.execute("chain_of_thought", {"signature": "question -> answer", "inputs": {"question": "Why?"}},
                          worker="w0")
    assert answer["answer"].startswith("Demo LM answer to 'Why?'")


def test_chunks_that_each_fit_are_never_joined_into_a_message_that_does_not() -> None:
    with Pool(workers=1, max_message_mb=2, journal=False) as small:
        small.define("big", "def big(text):\n    return dspy.Prediction(text=text * (700 * 1024))\n")
        batch = small.batch(["a", "b", "c", "d", "e", "f"], module="big", concurrency=6, shard_size=6, journal=False)
        results = batch.result(60)
    assert [len(r["text"]) for r in results] == [700 * 1024] * 6


def test_a_define_that_fails_on_one_worker_is_undone_on_the_others(pool: Pool) -> None:
    pids = {row["worker"]: row["pid"] for row in pool.status()}
    broken_on_w1 = (f"import os\nif os.getpid() == {pids['w1']}:\n    raise RuntimeError('broken here')\n"
                    "def Flaky(x):\n    return 'v2'\n")
    with pytest.raises(ToolError, match="broken here"):
        pool.define("Flaky", broken_on_w1)
    assert "Flaky" not in pool.definitions
    with pytest.raises(ArgumentError, match="no module named 'Flaky'"):
        pool.execute("run_module", {"name": "Flaky", "inputs": "x"}, worker="w0")

    pool.define("Flaky", "def Flaky(x):\n    return 'v1'\n")
    with pytest.raises(ToolError, match="broken here"):
        pool.define("Flaky", broken_on_w1)
    assert [pool.execute("run_module", {"name": "Flaky", "inputs": "x"}, worker=w)["value"] for w in pids] == \
        ["v1", "v1"]  # every worker has the definition the pool replays


def test_a_busy_worker_is_never_taken_for_a_hung_one() -> None:
    with Pool(workers=1, max_in_flight=48, health_interval=0.1, ping_timeout=0.5, journal=False) as busy:
        runs = [busy.execute_stream("sleep", {"seconds": 1.5}) for _ in range(40)]  # more than its 32 RPC threads
        assert all(run.result(60) == {"slept": 1.5, "cancelled": False} for run in runs)
        row = busy.status()[0]
        assert row["restarts"] == 0 and row["state"] == "ready", row


def test_a_long_stream_keeps_memory_flat_in_the_kernel(pool: Pool) -> None:
    run = pool.execute_stream("count", {"n": 50_000}, keep_chunks=1000)
    seen = sum(1 for _ in run)  # a reader as fast as the stream sees every chunk
    assert run.result(60) == {"count": 50_000}
    assert run.received == 50_001 and len(run.chunks) <= 2000 and run.chunks[-1].kind == "final"
    assert seen >= 1000
    everything = pool.execute_stream("count", {"n": 5000}, keep_chunks=None)
    assert everything.result(60) == {"count": 5000} and len(everything.chunks) == 5001


def test_a_reader_that_falls_behind_the_kept_chunks_is_told_what_it_missed(pool: Pool) -> None:
    run = pool.execute_stream("count", {"n": 5000}, keep_chunks=1000)
    assert run.result(60) == {"count": 5000}  # the reader starts only now: the first chunks are gone
    with pytest.warns(ChunksDropped, match=f"fell {run.dropped} chunks behind; they were dropped") as caught:
        seen = list(run)
    assert len(caught) == 1 and run.dropped > 0 and len(seen) == 5001 - run.dropped and seen[-1].kind == "final"


def restarts(pool: Pool) -> int:
    return sum(row["restarts"] for row in pool.status())


def test_an_error_quoting_a_long_blob_is_reported_and_the_worker_lives(pool: Pool) -> None:
    # a provider's error quoting an input image as base64: masking secrets in it must not take the worker's GIL
    # for long enough that it misses its pings (the pattern was quadratic in a word's length: 10 KB took 5 s)
    before = restarts(pool)
    pool.define("blob", "def blob(text):\n"
                        "    raise ValueError('bad image: data:image/png;base64,' + 'QUJD' * 50_000)\n")
    with pytest.raises(ToolError, match="ValueError: bad image: data:image/png;base64,QUJD") as caught:
        pool.call("blob", {"text": "a"}, timeout=60)
    assert len(caught.value.message) < 5000  # shortened, with how much was left out
    batch = pool.map("blob", ["a"], journal=False, max_retries=0)
    batch.wait(60)
    assert batch.records[0]["error"]["type"] == "ValueError"
    assert restarts(pool) == before


def test_a_log_record_of_many_validation_error_parts_reaches_the_kernel_and_the_worker_lives(pool: Pool) -> None:
    # the pattern that masks a pydantic ValidationError's input_value took each "[type=x, input_value=" of a line to
    # the line's end (quadratic): a log record quoting 900 KB of them held its worker's GIL for many minutes as the
    # worker masked it, so the worker missed its pings and was killed, and the call failed with WorkerDied
    before = restarts(pool)
    pool.define("parts", "import logging\n"
                         "def parts(n):\n"
                         "    logging.getLogger('notebook.parts').warning('x\\n  ' + '[type=a, input_value=' * n)\n"
                         "    return n\n")
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("notebook.parts").addHandler(handler)
    try:
        assert pool.call("parts", {"n": 45_000}, timeout=600) == 45_000
    finally:
        logging.getLogger("notebook.parts").removeHandler(handler)
    assert [record.getMessage().count("[type=a, input_value=") for record in seen] == [45_000]
    assert restarts(pool) == before


BROKEN_STR = '''
class BrokenStr(Exception):
    def __str__(self):
        raise RuntimeError("str() is broken too")

def broken(text):
    if text == "bad":
        raise BrokenStr("x")
    return dspy.Prediction(text=text)
'''


def test_an_exception_whose_str_fails_is_still_reported_with_its_type(pool: Pool) -> None:
    pool.define("broken", BROKEN_STR)
    run = pool.run_stream("broken", text="bad")
    for call in (lambda: pool.run("broken", text="bad"), lambda: run.result(60)):
        # was: a bare gRPC UNKNOWN error, and a stream that ended "done" without a result
        with pytest.raises(ToolError, match="BrokenStr: <the exception's str\\(\\) failed: RuntimeError>") as caught:
            call()
        assert "BrokenStr" in caught.value.remote_traceback
    batch = pool.map("broken", ["a", "bad", "b"], journal=False, max_retries=0)
    batch.wait(60)
    assert [r["ok"] for r in batch.records] == [True, False, True]
    assert batch.records[1]["error"]["type"] == "BrokenStr"  # was: the shard's error, for this item and the rest


EXITING_EXCEPTIONS = '''
class ExitingStr(Exception):
    def __str__(self):
        raise SystemExit("str() exits")

class InterruptingNotes(Exception):
    @property
    def __notes__(self):
        raise KeyboardInterrupt

def exiting(text):
    if text == "str":
        raise ExitingStr("x")
    if text == "notes":
        raise InterruptingNotes("the notes interrupt")
    return dspy.Prediction(text=text)
'''


@pytest.mark.parametrize(("text", "said"), [("str", "ExitingStr: <the exception's str\\(\\) failed: SystemExit>"),
                                            ("notes", "InterruptingNotes: the notes interrupt")])
def test_an_exception_whose_own_code_raises_a_base_exception_is_still_reported(pool: Pool, text: str,
                                                                               said: str) -> None:
    # was: no answer at all (the worker's thread ended on the SystemExit its report of the error raised), so a call
    # without a timeout waited forever, and a batch's shard with it
    pool.define("exiting", EXITING_EXCEPTIONS)
    with pytest.raises(ToolError, match=said):
        pool.call("exiting", {"text": text}, timeout=30)
    with pytest.raises(ToolError, match=said):
        pool.call("exiting", {"text": text}, stream=True, timeout=30).result(30)
    batch = pool.map("exiting", ["a", text, "b"], journal=False, max_retries=0, timeout=60)
    batch.wait(60)
    assert [r["ok"] for r in batch.records] == [True, False, True]
    assert batch.records[1]["error"]["type"] in said


class BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr of user code")


def broken_repr(text: str) -> BrokenRepr:
    return BrokenRepr()


def echo_value(value: object) -> object:
    return value


def test_a_value_whose_repr_fails_is_named_as_one_without_a_json_form(pool: Pool) -> None:
    # was: the RuntimeError of its __repr__, as though the program had raised it (on the worker, for every item)
    said = r"is a .*BrokenRepr, which has no JSON form.*<BrokenRepr object; its repr\(\) failed: RuntimeError>"
    with pytest.raises(NotPortable, match=f"output {said}"):
        pool.run(broken_repr, text="a")
    batch = pool.map(broken_repr, ["a", "b"], journal=False, max_errors=10)
    assert batch.result(60) == [None, None]  # as a value with no JSON form is (NotPortable), not a program's error
    assert [r["result"]["value"]["repr"] for r in batch.records] == ["<BrokenRepr object; its repr() failed: "
                                                                      "RuntimeError>"] * 2
    with pytest.raises(ArgumentError, match=rf"inputs\['value'\] {said}"):
        pool.run(echo_value, value=BrokenRepr())


def powers(base: int) -> list[int]:
    return [base**50_000, -(base**3_000), base]


def test_an_int_too_long_for_python_to_write_in_decimal_travels_both_ways(pool: Pool) -> None:
    # was: "not JSON-serialisable: Exceeds the limit (4300 digits) for integer string conversion; use
    # sys.set_int_max_str_digits()", which the kernel's own setting could not change on the workers; in a batch, a
    # ValueError naming no item; the same program in the kernel returns it
    assert pool.run(powers, base=10) == powers(10)
    assert pool.map(echo_value, [10**5_000, 3], journal=True).result(60) == [10**5_000, 3]


class CutStream:
    """A transport whose stream ends after a token, without the final chunk (a worker-side fault)."""

    def __iter__(self) -> Iterator[list[Chunk]]:
        yield [Chunk("token", 0, {"field": "answer", "text": "par", "last": False})]

    def cancel(self) -> None:
        pass


def test_a_stream_that_ends_without_its_result_fails_instead_of_returning_none() -> None:
    run = Run("predict", "w0", CutStream(), on_chunk=None, on_done=lambda run: None)
    with pytest.raises(DspexError, match="ended without its result or error"):
        run.result(30)
    assert run.status == "failed" and len(run.chunks) == 1  # what arrived is kept


def test_an_error_with_a_message_over_the_message_limit_is_still_that_error() -> None:
    with Pool(workers=1, max_message_mb=2, journal=False) as small:
        small.define("huge", "def huge(text):\n    raise ValueError('too much: ' + 'x' * (3 * 2**20))\n")
        run = small.run_stream("huge", text="a")
        for call in (lambda: small.run("huge", text="a"), lambda: run.result(60)):
            # was: MessageTooLarge / ResultTooLarge ("raise max_message_mb"), the program's error lost
            with pytest.raises(ValueError) as caught:
                call()
            assert caught.value.type == "ValueError" and len(caught.value.remote_traceback) < 2**20
            # cut once, on the worker, saying how much was cut
            assert str(caught.value) == "too much: " + "x" * 3990 + f"… ({3 * 2**20 + 10 - 4000} more characters)"


FLOOD = """import sys

def flood(n):
    line = "y" * 999 + "\\n"
    for _ in range(n):
        sys.stdout.write(line)
    print("the last line", flush=True)
    return dspy.Prediction(n=n)
"""


@pytest.mark.parametrize("start", ["spawn", "template"])
def test_a_program_printing_without_end_fills_no_disk(start: str) -> None:
    """A worker's log (in the runtime directory, often a tmpfs: memory) is cut to its end once it passes
    LOG_LIMIT, keeping the last lines, and what the worker prints later goes on at its end (no hole)."""
    with Pool(workers=1, start=start, journal=False) as pool:
        pool.define("flood", FLOOD)
        log = pool.workers[0].process.log_path
        assert pool.run("flood", n=3 * LOG_LIMIT // 1000).n == 3 * LOG_LIMIT // 1000
        wait_until(lambda: log.stat().st_size <= LOG_LIMIT, what="the worker's log to be cut")
        text = log.read_bytes()
        assert b"bytes of output cut here" in text and text.endswith(b"the last line\n")
        pool.run("flood", n=10)
        text = log.read_bytes()
        assert b"\0" not in text and text.endswith(b"y\nthe last line\n") and len(text) <= LOG_LIMIT + 20_000
        assert pool.workers[0].restarts == 0


def test_a_worker_python_that_prints_without_end_while_starting_fills_no_disk(tmp_path: Path) -> None:
    """Before the health thread runs (a pool's start), the start's own wait keeps the log bounded: a worker Python
    that floods its output wrote gigabytes there until start_timeout."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\nexec yes "a worker Python that prints without end"\n')
    python.chmod(0o755)
    failed: list[BaseException] = []

    def start() -> None:
        try:
            Pool(workers=1, python=str(python), start="spawn", start_timeout=3, journal=False).start()
        except BaseException as exc:
            failed.append(exc)

    starting = threading.Thread(target=start)
    starting.start()
    peak = 0
    while starting.is_alive():
        for log in Path(os.environ["DSPEX_RUNTIME_DIR"]).glob("dspex-*/w0-0.log"):
            with contextlib.suppress(OSError):
                peak = max(peak, log.stat().st_size)
        time.sleep(0.005)
    assert isinstance(failed[0], WorkerStartError) and "prints without end" in str(failed[0])
    assert peak < 64 * LOG_LIMIT, f"the log reached {peak / 2**20:.0f} MB"


def prints_on_a_full_disk(question: str) -> str:
    """Prints while its log cannot be written (its output sent to /dev/full, where every write fails as on a full
    disk), then once it can again."""
    kept = os.dup(1), os.dup(2)
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, 1)
        os.dup2(full, 2)
        print("lost", question)
        print("lost too", question, file=sys.stderr, flush=True)
    finally:
        os.dup2(kept[0], 1)
        os.dup2(kept[1], 2)
        for fd in (full, *kept):
            os.close(fd)
    print("kept", question, flush=True)
    return f"answered {question}"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to make a write fail as on a full "
                                                            "disk")
def test_a_program_printing_to_a_log_on_a_full_disk_still_gives_its_result(pool: Pool) -> None:
    # Was: the program failed with "OSError: [Errno 28] No space left on device" (its print's), where the same print
    # in the kernel goes to the notebook: a full runtime directory (a tmpfs) cost every printing call its result
    assert pool.run(prints_on_a_full_disk, question="q1") == "answered q1"
    logs = "".join(worker.process.log_path.read_text() for worker in pool.workers)
    assert "kept q1" in logs
    assert "characters of output lost here: the log could not be written (No space left on device)" in logs


STARTS_A_PROCESS = """import subprocess

def starts_a_process(text):
    return dspy.Prediction(pid=subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL).pid)
"""


@pytest.mark.parametrize("start", ["spawn", "template"])
def test_processes_a_program_started_end_with_its_worker(start: str) -> None:
    """A program's subprocess (DSPy's PythonInterpreter starts Deno) lived on, reparented to init, after its worker
    was killed and replaced, and after the pool stopped."""
    started: list[int] = []
    try:
        with Pool(workers=1, start=start, journal=False) as pool:
            pool.define("starts_a_process", STARTS_A_PROCESS)
            started.append(pool.run("starts_a_process", text="a").pid)
            pool.kill_worker("w0", signal.SIGKILL)
            wait_until(lambda: not pid_alive(started[0]), what="the killed worker's subprocess to end")
            wait_until(lambda: pool.workers[0].state == "ready", what="the worker's replacement")
            started.append(pool.run("starts_a_process", text="b").pid)
            assert pid_alive(started[1])
        wait_until(lambda: not pid_alive(started[1]), what="the subprocess to end with the pool")
    finally:
        _end(started)


def _end(pids: list[int]) -> None:
    """End the test's subprocesses that are still there (where the fault under test left them)."""
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


KERNEL = """import sys
from dspex_nb import Pool
pool = Pool(workers=1, start=sys.argv[1], journal=False).start()
pool.define("starts_a_process", sys.argv[2])
print(pool.run("starts_a_process", text="a").pid, flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("start", ["spawn", "template"])
def test_processes_a_program_started_end_with_a_sigkilled_kernel(start: str) -> None:
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL, start, STARTS_A_PROCESS], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        started = int(kernel.stdout.readline())  # type: ignore[union-attr]
    finally:
        kernel.kill()
        kernel.wait()
    try:
        wait_until(lambda: not pid_alive(started), what="the subprocess to end with its worker")
    finally:
        _end([started])


STARTS_DETACHED_PROCESSES = """import subprocess

def starts_detached_processes(text):
    deaf = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 300"], stdin=subprocess.DEVNULL)
    own_session = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL, start_new_session=True)
    return dspy.Prediction(pids=[deaf.pid, own_session.pid])
"""

KERNEL_OF_DETACHED = """import sys
from dspex_nb import Pool
pool = Pool(workers=1, journal=False).start()
pool.define("starts_detached_processes", sys.argv[1])
print(*pool.run("starts_detached_processes", text="a").pids, flush=True)
sys.stdin.read()
"""


def test_processes_deaf_to_sigterm_or_in_a_session_of_their_own_end_with_a_sigkilled_kernel() -> None:
    """Was: a worker whose kernel was SIGKILLed sent SIGTERM to its process group only: a program's process that
    ignores SIGTERM (a shell script's trap), or that it started in a session of its own (``start_new_session=True``),
    lived on for good, reparented to init."""
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL_OF_DETACHED, STARTS_DETACHED_PROCESSES],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        started = [int(pid) for pid in kernel.stdout.readline().split()]  # type: ignore[union-attr]
    finally:
        kernel.kill()
        kernel.wait()
    try:
        assert len(started) == 2
        wait_until(lambda: not any(pid_alive(pid) for pid in started), what="the processes to end with their worker")
    finally:
        _end(started)


def test_processes_in_a_session_of_their_own_end_with_a_hung_worker_and_with_the_pool() -> None:
    """Was: a hung (stopped) worker, killed and replaced, and a pool's shutdown left a program's process in a session
    of its own running for good (outside the worker's process group, which alone was ended)."""
    started: list[int] = []
    try:
        with Pool(workers=1, health_interval=0.1, ping_timeout=0.5, journal=False) as pool:
            pool.define("starts_detached_processes", STARTS_DETACHED_PROCESSES)
            started += pool.run("starts_detached_processes", text="a").pids
            pool.kill_worker("w0", signal.SIGSTOP)
            wait_until(lambda: not any(pid_alive(pid) for pid in started), what="the hung worker's processes to end")
            wait_until(lambda: pool.workers[0].state == "ready", what="the worker's replacement")
            started += pool.run("starts_detached_processes", text="b").pids
            assert all(pid_alive(pid) for pid in started[2:])
        wait_until(lambda: not any(pid_alive(pid) for pid in started), what="the processes to end with the pool")
    finally:
        _end(started)


def test_a_pool_whose_workers_end_on_sigterm_scans_no_process_table_as_it_stops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: pool.shutdown() scanned /proc once per worker for what its programs started (32 workers on a machine of
    a thousand processes: seconds), though a worker that ends on SIGTERM ends those itself; only a worker still
    there after its grace is scanned, before its SIGKILL."""
    from dspex_nb.pool import process

    scanned: list[int] = []

    def counted(pid: int) -> list[int]:
        scanned.append(pid)
        return started_by(pid)

    started: list[int] = []
    try:
        with Pool(workers=2, journal=False) as pool:
            pool.define("starts_detached_processes", STARTS_DETACHED_PROCESSES)
            started += pool.run("starts_detached_processes", text="a").pids
            monkeypatch.setattr(process, "started_by", counted)
        assert scanned == []
        wait_until(lambda: not any(pid_alive(pid) for pid in started), what="the processes to end with the pool")
    finally:
        _end(started)


STARTED_ANY = """import subprocess
from dspex_nb.wire import started_any

def started(start):
    if start:
        subprocess.run(["true"], check=True)  # a process it started, and waited for: gone
    return started_any()
"""


def test_a_worker_scans_for_the_processes_of_its_programs_only_where_one_started_a_process() -> None:
    """Was: every worker scanned /proc once as it exited, also where no program of its had started anything."""
    with Pool(workers=1, journal=False) as pool:
        pool.define("started", STARTED_ANY)
        assert pool.run("started", start=False) is False  # the worker itself starts none: it would skip the scan
        assert pool.run("started", start=True) is True
        assert pool.run("started", start=False) is True


CLOSES_ITS_OUTPUT = """import sys

def closes_its_output(question):
    sys.stdout.close()
    sys.stderr.close()
    return dspy.Prediction(answer='closed')
"""

PRINTS = """import sys

def prints(question):
    print('printed after the close', question, flush=True)
    print('and to stderr', question, file=sys.stderr, flush=True)
    return dspy.Prediction(answer=question)
"""


def test_a_program_that_closes_its_output_fails_no_later_call_on_its_worker(pool: Pool) -> None:
    # Was: sys.stdout.close() closed the worker's log for good: every later program on that worker that printed (a
    # batch item, another cell's call) failed with "ValueError: I/O operation on closed file", its result lost
    pool.define("closes_its_output", CLOSES_ITS_OUTPUT)
    pool.define("prints", PRINTS)
    for worker in pool.workers:
        run = partial(pool.execute, "run_module", worker=worker.id, timeout=30)
        assert run({"name": "closes_its_output", "inputs": {"question": "q"}})["answer"] == "closed"
        assert run({"name": "prints", "inputs": {"question": worker.id}})["answer"] == worker.id
        log = worker.process.log_path.read_text()
        assert f"printed after the close {worker.id}" in log and f"and to stderr {worker.id}" in log


LONE_SURROGATES = """import os

def prints_a_lone_surrogate(question):
    print('a file named', os.fsdecode(b'caf\\xe9.txt'), question)  # a name that is not UTF-8: a lone surrogate
    return dspy.Prediction(answer=question)

def raises_a_lone_surrogate(question):
    raise ValueError('no file ' + os.fsdecode(b'caf\\xe9.txt'))
"""


@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_in_a_print_or_an_error_costs_neither_the_answer_nor_the_error(pool: Pool,
                                                                                       stream: bool) -> None:
    # Was: printing a lone surrogate (os.fsdecode of a file name that is not UTF-8) failed the program's print with
    # UnicodeEncodeError (the worker's log refused it), and a unary call whose output or error message held one came
    # back as "DspexError: gRPC error UNKNOWN: Exception calling application" (a proto string must be UTF-8): the
    # answer, or the program's own ValueError, lost
    for name in ("prints_a_lone_surrogate", "raises_a_lone_surrogate"):
        pool.define(name, LONE_SURROGATES)

    def call(name: str) -> Any:
        result = pool.call(name, {"question": "q"}, stream=stream, timeout=30)
        return result.result(30) if stream else result

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert call("prints_a_lone_surrogate").answer == "q"
    assert out.getvalue() == "a file named caf\\udce9.txt q\n"  # escaped, as Python's stderr writes it
    with pytest.raises(ValueError, match="no file caf") as raised:
        call("raises_a_lone_surrogate")
    assert raised.value.args == ("no file caf\udce9.txt",)  # the exception's own arguments, as they were


def test_an_lm_that_grows_past_the_message_limit_as_it_answers_costs_no_answer() -> None:
    # Was: the attributes an LM changed as it answered came back with the answer, in its message: an LM that kept a
    # 3 MiB value (its own cache of replies) failed a call on a 2 MiB limit with ResultTooLarge, and every item of a
    # batch came back None, their answers lost
    import dspy
    from dspy.utils import DummyLM

    from dspex_nb.errors import LMStateNotKept

    class Hoarding(DummyLM):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.replies = "x" * 3 * 2**20
            return super().forward(*args, **kwargs)

    program = dspy.Predict("question -> answer")

    def refusing(question: str) -> None:  # a program that raises once its LM answered
        program(question=question)
        raise ValueError("not this one")

    with Pool(workers=1, lm="demo", max_message_mb=2) as pool:
        with dspy.context(lm=Hoarding({"q1": {"answer": "a1"}, "q2": {"answer": "a2"}})), \
                pytest.warns(LMStateNotKept, match="in a batch, each worker changes a copy"):
            assert [p.answer for p in pool.map(program, ["q1", "q2"], journal=False).result(60)] == ["a1", "a2"]
        lm = Hoarding({"q3": {"answer": "a3"}})
        too_large = r"\['replies'\] on the pool as it answered, which cannot come back .*over the 2 MiB message limit"
        with dspy.context(lm=lm), pytest.warns(LMStateNotKept, match=too_large):
            assert pool.run(program, question="q3").answer == "a3"
        with dspy.context(lm=lm), pytest.raises(NotPortable, match=r"changed its attribute\(s\) \['replies'\]"):
            pool.run(program, question="q3")
        # the same change before the program raised came back with its error, unmeasured: the program's ValueError
        # was lost to MessageTooLarge (run) or ResultTooLarge (run_stream)
        for call in (pool.run, lambda *args, **inputs: pool.run_stream(*args, **inputs).result(60)):
            lm = Hoarding({"q4": {"answer": "a4"}})
            with dspy.context(lm=lm), pytest.warns(LMStateNotKept, match=too_large) as warned, \
                    pytest.raises(ValueError, match="not this one"):
                call(refusing, question="q4")
            said = [str(w.message) for w in warned if issubclass(w.category, LMStateNotKept)]
            assert "answer is kept" not in said[0]  # there is none: the call failed
        assert pool.execute("echo", {"alive": True}) == {"alive": True}


def test_a_filter_that_makes_warnings_errors_costs_no_answer_of_an_lm_that_changed(pool: Pool) -> None:
    # Was: under warnings.simplefilter("error") (pytest's -W error) the LMStateNotKept warning about an LM that changed
    # as it answered was raised where the answer was read: every item of a map came back None ("its result cannot be
    # read: LMStateNotKept: ..."), and a call's answer was lost with it, its LM marked all the same
    import dspy
    from dspy.utils import DummyLM

    class Counting(DummyLM):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls += 1
            return super().forward(*args, **kwargs)

    program = dspy.Predict("question -> answer")
    odd = Counting({"q": {"answer": "kept"}})
    odd.calls = 1j  # no JSON form: once changed, it cannot come back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dspy.context(lm=DummyLM([{"answer": "a"}, {"answer": "b"}])):
            assert [p.answer for p in pool.map(program, ["q1", "q2"], journal=False).result(60)] in (
                ["a", "a"], ["a", "b"], ["b", "a"])
        with dspy.context(lm=odd):
            assert pool.run(program, question="q").answer == "kept"
            with pytest.raises(NotPortable, match=r"changed its attribute\(s\) \['calls'\]"):
                pool.run(program, question="q")


def test_an_lm_holding_a_value_pickle_cannot_take_still_gives_its_next_answer(pool: Pool) -> None:
    # Was: the worker compared an LM's attributes before and after a call by pickling them all at once: one it could
    # not pickle (a notebook's lambda, which cloudpickle ships; a lock or client the LM makes as it answers) left the
    # whole LM unwatched, so DummyLM's next answer or a count of calls was lost without a word
    import dspy
    from dspy.utils import DummyLM

    class Tidy(DummyLM):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls = getattr(self, "calls", 0) + 1
            self.guard = threading.Lock()  # made as it answers, as a client often is
            return super().forward(*args, **kwargs)

    program, question = dspy.Predict("question -> answer"), "What color is the sky?"
    lm = Tidy([{"answer": "red"}, {"answer": "blue"}, {"answer": "green"}])
    lm.tidy = lambda text: text.strip()  # noqa: PLW0108
    with dspy.context(lm=lm):
        assert [pool.run(program, question=question).answer for _ in range(2)] == ["red", "blue"]
        assert lm.calls == 2 and lm.tidy(" x ") == "x"
        assert program(question=question).answer == "green"


@pytest.mark.parametrize("made", ["whole", "half"])
def test_an_lm_that_keeps_a_notebook_object_as_it_answers_says_it_cannot_come_back(pool: Pool, made: str) -> None:
    # Was: an LM that kept an object of a notebook class (pickled by value only) was left unwatched, its changes lost
    # without a word; watched, an object whose own code fails as it is read (a dataclass without its fields) failed
    # the call with that error, its answer lost
    import dspy
    from dspy.utils import DummyLM

    from dspex_nb.errors import LMStateNotKept

    @dataclasses.dataclass
    class Reply:
        text: str

    class Keeping(DummyLM):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.last = Reply("hi") if made == "whole" else object.__new__(Reply)
            return super().forward(*args, **kwargs)

    program, lm = dspy.Predict("question -> answer"), Keeping({"q": {"answer": made}})
    why = "a class that did not travel" if made == "whole" else "AttributeError: 'Reply' object has no attribute 'text'"
    with dspy.context(lm=lm):
        with pytest.warns(LMStateNotKept, match=rf"\['last'\] on the pool as it answered, which cannot come .*{why}"):
            assert pool.run(program, question="q").answer == made
        with pytest.raises(NotPortable, match=r"changed its attribute\(s\) \['last'\]"):
            pool.run(program, question="q")


def test_a_stop_iteration_a_program_raises_is_reported_as_itself(pool: Pool) -> None:
    # Was: a program's StopIteration (next() on an empty iterator) left the worker's generator that runs a call, and
    # Python made it "RuntimeError: generator raised StopIteration" (PEP 479), which the program never raised; a batch
    # item said StopIteration. One that leaves the program's own generator is that RuntimeError, in the kernel too
    pool.define("stops", "def stops(question):\n    return next(iter([]), None) or next(iter(()))\n")
    pool.define("own_generator", "def own_generator(question):\n    def items():\n        yield next(iter(()))\n"
                                 "    return list(items())\n")
    for run in (partial(pool.run, "stops"), lambda **inputs: pool.run_stream("stops", **inputs).result(30)):
        with pytest.raises(ToolError, match=r"failed on worker w\d: StopIteration: \n") as caught:
            run(question="q")
        assert not isinstance(caught.value, RuntimeError)
    with pytest.raises(RuntimeError, match="generator raised StopIteration"):
        pool.run("own_generator", question="q")


@pytest.mark.parametrize("kind", [StopIteration, StopAsyncIteration])
def test_a_stop_iteration_a_streamed_module_raises_is_reported_as_itself(pool: Pool, kind: type) -> None:
    # Was: a module with a str output field, which run_stream streams through dspy.streamify, raised it in
    # streamify's coroutines, and Python made it "RuntimeError: coroutine raised StopIteration" (pool.run gave
    # StopIteration, as its call in the kernel does)
    import dspy

    from dspex_nb.worker.demo_lm import make_demo_lm

    class Stops(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qa = dspy.Predict("question -> answer")

        def forward(self, question: str) -> dspy.Prediction:
            self.qa(question=question)
            raise kind

    with pytest.raises(kind), dspy.context(lm=make_demo_lm()[0]):
        Stops()(question="q")  # in the kernel, on the demo LM the workers run
    for run in (pool.run, lambda program, **inputs: pool.run_stream(program, **inputs).result(30)):
        with pytest.raises(ToolError, match=rf"failed on worker w\d: {kind.__name__}: \n") as caught:
            run(Stops(), question="q")
        assert not isinstance(caught.value, RuntimeError)


def test_an_lm_set_in_the_place_of_one_a_call_runs_on_gets_none_of_its_state(pool: Pool) -> None:
    # Was: the kernel looked for the program's LM that changed as it answered when the call's result was read, by
    # where the program held it: an LM set there meanwhile (set_lm while a run_stream ran) got the state of the one
    # the call ran on, DSPy's DummyLM its answers still to come, so its next call gave the old LM's answer
    import dspy
    from dspy.utils import DummyLM

    program = dspy.Predict("question -> answer")
    ran_on = DummyLM([{"answer": "red"}, {"answer": "blue"}])
    program.set_lm(ran_on)
    run = pool.run_stream(program, question="q")
    run.wait(30)
    program.set_lm(DummyLM([{"answer": "green"}]))  # the notebook's next cell, while the run's result is unread
    assert run.result(30).answer == "red"
    assert program(question="q").answer == "green"  # its own first answer, in the kernel
    program.set_lm(ran_on)
    assert pool.run(program, question="q").answer == "blue"  # where the first call left it


def test_an_lm_response_whose_repr_fails_costs_no_answer(pool: Pool) -> None:
    # Was: a call's LM history entries come back as JSON, a value JSON has no form for as its repr: an LM of one's own
    # whose response held a value whose repr raised failed every call with that error (a batch item too), its answer
    # lost, where the kernel runs it and keeps the entry
    from types import SimpleNamespace

    import dspy

    class Sealed:
        def __repr__(self) -> str:
            raise RuntimeError("sealed")

    class Own(dspy.BaseLM):
        def __init__(self) -> None:
            super().__init__("own/model")

        def forward(self, prompt=None, messages=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
            reply = SimpleNamespace(content="[[ ## answer ## ]]\nfine\n\n[[ ## completed ## ]]", tool_calls=None)
            return SimpleNamespace(choices=[SimpleNamespace(message=reply, finish_reason="stop", logprobs=None)],
                                   usage={}, model="own/model", sealed=Sealed())

    program, lm = dspy.Predict("question -> answer"), Own()
    with dspy.context(lm=lm):
        assert pool.run(program, question="q").answer == "fine"
        assert pool.run_stream(program, question="q").result(30).answer == "fine"
        assert [p.answer for p in pool.map(program, ["q"], journal=False).result(30)] == ["fine"]
    assert [entry["response"] for entry in lm.history] == ["<a SimpleNamespace whose repr failed: RuntimeError>"] * 3


def test_an_lm_reporting_token_counts_that_are_no_numbers_costs_no_answer(pool: Pool) -> None:
    # Was: the pool counts each call's tokens for its status and views with int(): an LM of one's own that reported
    # "prompt_tokens": "many" (DSPy keeps its usage as it is) failed pool.run with "ValueError: invalid literal for
    # int()" in the kernel, once the answer had come
    from types import SimpleNamespace

    import dspy

    class Vague(dspy.BaseLM):
        def __init__(self) -> None:
            super().__init__("vague/model")

        def forward(self, prompt=None, messages=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
            reply = SimpleNamespace(content="[[ ## answer ## ]]\nfine\n\n[[ ## completed ## ]]", tool_calls=None)
            return SimpleNamespace(choices=[SimpleNamespace(message=reply, finish_reason="stop", logprobs=None)],
                                   usage={"prompt_tokens": "many", "completion_tokens": "12"}, model="vague/model")

    program = dspy.Predict("question -> answer")
    with dspy.context(lm=Vague()):
        assert pool.run(program, question="q").answer == "fine"
        run = pool.run_stream(program, question="q")
        assert run.result(30).answer == "fine" and run.tokens == (0, 12)


def test_the_settings_a_call_brings_with_an_lm_are_not_kept_on_the_worker() -> None:
    # the worker kept the 16 newest settings payloads loaded; an LM that changes as it answers comes in new settings
    # each call, so a 30 MB context LM took a worker to 2-3 GB within 20 calls (each call also loaded it twice)
    from dspy.utils import DummyLM

    from dspex_nb import programs
    from dspex_nb.worker import programs as worker_programs

    lm = DummyLM([{"answer": "red"}])
    with_lm, without = programs.kernel_settings(lm), programs.kernel_settings(env={"DSPEX_TEST_VAR": "1"})
    first, second = worker_programs.call_settings(with_lm), worker_programs.call_settings(with_lm)
    assert isinstance(first["lm"], DummyLM) and first["lm"] is not second["lm"]  # a copy per call, none kept
    assert with_lm not in worker_programs._kept_settings
    assert worker_programs.call_settings(without) is worker_programs.call_settings(without)  # kept: loaded once


def test_a_session_instance_of_a_shipped_program_is_its_own(pool: Pool) -> None:
    # Was: load_module kept the very instance the program's plain calls run, so a plain call started from the state
    # the session's calls left (4, not 1), and the session's handle then from the plain call's (5, not 4)
    import dspy

    class Counter(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, question: str) -> dspy.Prediction:
            self.calls += 1
            return dspy.Prediction(answer=str(self.calls))

    pool.define("Counter", Counter())
    with pool.session("w0", affinity="strict_queue") as session:
        def run(name: str) -> str:
            return session.execute("run_module", {"name": name, "inputs": {"question": "q"}})["answer"]

        handle = session.execute("load_module", {"name": "Counter"})["handle"]
        assert [run(handle) for _ in range(3)] == ["1", "2", "3"]
        assert run("Counter") == "1"  # from the kernel's state, as each plain call
        assert run(handle) == "4"  # where the session's own calls left it


def test_a_call_made_while_a_batch_of_its_program_runs_starts_from_the_kernels_state(pool: Pool,
                                                                                     tmp_path: Path) -> None:
    # Was: a shard's items ran the very instance the program's plain calls run, so a pool.run made while a batch
    # ran in the background (pool.map returns at once) started from the items' changes: 3 calls, not 1
    import dspy

    class Counter(dspy.Module):
        def __init__(self, where: str) -> None:
            super().__init__()
            self.where, self.calls = where, 0

        def forward(self, question: str) -> dspy.Prediction:
            self.calls += 1
            if question.startswith("item"):
                Path(self.where, question).touch()
                deadline = time.monotonic() + 60
                while not Path(self.where, "release").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)  # the item holds its place until the test's call is done
            return dspy.Prediction(answer=str(self.calls))

    program = Counter(str(tmp_path))
    items = [{"question": f"item{i}"} for i in range(4)]
    batch = pool.map(program, items, journal=False)
    try:
        wait_until(lambda: all((tmp_path / item["question"]).exists() for item in items), what="the items to start")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # StateNotKept: the call changed its state, which is the point
            assert [pool.run(program, question="q").answer for _ in pool.workers] == ["1"] * len(pool.workers)
    finally:
        (tmp_path / "release").touch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(prediction is not None for prediction in batch.result(60))
