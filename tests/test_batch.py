"""Pool-level batches (fanned out over every worker) and modules defined from source."""

from __future__ import annotations

import os
import signal
import threading

import dspy
import pandas as pd
import pytest
from helpers import TWO_STEP, wait_until

from dspex_nb import Pool
from dspex_nb.errors import ArgumentError, ToolError
from dspex_nb.programs import to_output
from dspex_nb.typed import Resolver


def test_batch_fans_out_over_every_worker_in_input_order(pool: Pool) -> None:
    seen: list[dict] = []
    batch = pool.batch([f"question {i}?" for i in range(50)], "question -> answer", on_item=seen.append,
                       journal=False)  # computed here, not taken from an earlier test's journal
    out = batch.result()
    assert len(out) == 50 and len(seen) == 50
    for i, row in enumerate(out):
        assert list(row) == ["answer"]  # the output fields; the LM usage stays in the record, counted below
        assert row["answer"].startswith(f"Demo LM answer to 'question {i}?'")
    assert batch.tokens_in > 0 and batch.tokens_out > 0
    snap = batch.snapshot()
    assert (snap["ok"], snap["failed"], snap["running"], snap["queued"], snap["status"]) == (50, 0, 0, 0, "done")
    assert set(snap["by_worker"]) == {"w0", "w1"} and sum(snap["by_worker"].values()) == 50


def test_batch_of_nothing_is_done_at_once(pool: Pool) -> None:
    assert pool.batch([], "question -> answer").result() == []


def test_batch_with_bad_items_names_the_item(pool: Pool) -> None:
    """By its index in the batch's items, not by its place in the shard its worker got (there 0)."""
    batch = pool.batch([{"question": "a"}, {"text": "b"}], "question -> answer", shard_size=1)
    with pytest.raises(ArgumentError, match=r"\bitems\[1\] must have the input fields \['question'\]"):
        batch.result()
    assert batch.status == "failed"
    batch = pool.batch([f"q{i}" for i in range(7)] + [{"text": "b"}], "question -> answer", shard_size=3)
    with pytest.raises(ArgumentError, match=r"\bitems\[7\] must be a dict|\bitems\[7\] must have the input"):
        batch.result(60)
    with pytest.raises(ArgumentError, match="items must be a list"):
        pool.batch("not a list", "question -> answer")


@pytest.mark.parametrize("bad", [1j, object(), pd.Timestamp("2020-01-01")], ids=["complex", "object", "Timestamp"])
def test_an_item_with_no_json_form_is_named_before_anything_runs(pool: Pool, bad: object) -> None:
    """Refused in the kernel, by its index in the items, as an input: not by a worker, as the first item of its
    shard, with advice about what a program returns."""
    items: list[object] = [{"question": f"fine {i}"} for i in range(5)] + [{"question": bad}]
    # as its own refusal, not "tool 'batch' failed: ArgumentError: ...", as if a worker tool had failed
    with pytest.raises(ArgumentError, match=r"^items\[5\]\['question'\] is a .*cannot be sent to the workers"):
        pool.batch(items, "question -> answer", journal=False)
    frame = pd.DataFrame({"question": ["a", "b"], "when": [pd.Timestamp("2020-01-01"), bad]})
    with pytest.raises(ArgumentError, match=r"^items\[0\]\['when'\] is a pandas.*Timestamp.*\.astype\(str\)"):
        pool.map(dspy.Predict("question, when -> answer"), frame, journal=False)
    with pytest.raises(ArgumentError, match=r"^inputs\['question'\] is a .*cannot be sent to the workers"):
        pool.run(dspy.Predict("question -> answer"), question=bad)


def test_an_item_over_the_message_limit_fails_alone_and_named() -> None:
    """A shard over the limit is sent as halves; an item over it alone fails by its index, the others are answered
    (the whole batch failed, with the items of every other shard not computed, and no item named)."""
    items = [f"small {i}?" for i in range(12)]
    items[7] = "x" * (2 * 2**20)
    with Pool(workers=1, max_message_mb=1, journal=False) as small:
        batch = small.batch(items, "question -> answer", shard_size=6, journal=False)
        results = batch.result(60)
    assert [r["ok"] for r in batch.records] == [i != 7 for i in range(12)]
    assert results[7] == {"error": "MessageTooLarge: items[7]: the arguments of 'batch_inference' are 2.0 MiB, over "
                                   "the 1 MiB message limit; raise it with Pool(max_message_mb=...)"}
    assert all(results[i]["answer"].startswith(f"Demo LM answer to 'small {i}?'") for i in range(12) if i != 7)


def test_items_nested_too_deeply_are_named(pool: Pool) -> None:
    deep: list = ["x"]
    for _ in range(5_000):
        deep = [deep]
    with pytest.raises(ArgumentError, match=r"items\[1\] is nested too deeply to be sent to the workers"):
        pool.map(dspy.Predict("question -> answer"), ["fine", {"question": deep}], journal=False)
    with pytest.raises(ArgumentError, match="the inputs are nested too deeply to be sent to the workers"):
        pool.run(dspy.Predict("question -> answer"), question=deep)


def test_an_on_item_callback_that_raises_stops_the_batch_and_keeps_what_arrived(pool: Pool) -> None:
    seen: list[dict] = []

    def on_item(record: dict) -> None:
        seen.append(record)
        if len(seen) == 3:
            raise KeyError("my callback broke")

    batch = pool.batch([f"cb {i}?" for i in range(40)], "question -> answer", shard_size=5, on_item=on_item,
                       journal=False)
    with pytest.raises(KeyError, match="my callback broke"):
        batch.result(60)
    assert batch.status == "failed"
    kept = [r for r in batch.records if r is not None]
    assert len(kept) >= 3 and all(r["ok"] for r in kept)  # nothing received was turned into a failure


PROBE = """
import threading, time
_lock = threading.Lock()
_running = [0]
def Probe(question):
    with _lock:
        _running[0] += 1
        now = _running[0]
    time.sleep(0.05)
    with _lock:
        _running[0] -= 1
    return {"running": now}
"""


def test_a_worker_holds_the_next_shard_and_the_two_share_its_concurrency(pool: Pool) -> None:
    pool.define("Probe", PROBE)
    batch = pool.batch([f"p{i}" for i in range(48)], module="Probe", shard_size=3, concurrency=2, journal=False)
    seen = wait_until(lambda: "two shards" if any(r["in_flight"] == 2 for r in pool.status()) else batch.done,
                      what="a worker holding two shards, or the batch's end")
    out = batch.result()
    assert seen == "two shards"  # the next shard was on its worker before the current one ended
    assert max(to_output(o, Resolver())["running"] for o in out) == 2  # and the two never ran over concurrency=2


SLOW = """
import time
def Slow(question):
    time.sleep(30 if question == "HANG" else 0.05)
    return {"answer": question.upper()}
"""


def test_a_hung_item_times_out_and_gives_its_slot_back_to_the_items_after_it() -> None:
    """concurrency=1: the hung item holds the worker's one slot; once it times out, the items after it on that
    same (live) worker run in that slot, and spend no try: they never started."""
    with Pool(workers=1, journal=False) as pool:
        pool.define("Slow", SLOW)
        items = ["HANG", "a", "b", "c", "d", "e"]
        batch = pool.batch(items, module="Slow", shard_size=2, concurrency=1, item_timeout=1.5, max_retries=1)
        batch.wait(60)
        first, rest = batch.records[0], batch.records[1:]
        assert not first["ok"] and first["error"]["type"] == "ItemTimeout" and first["tries"] == 2
        assert all(r["ok"] and r["tries"] == 1 for r in rest), [r for r in rest if not r["ok"] or r["tries"] != 1]


def test_a_hung_item_times_out_while_its_workers_other_shard_moves() -> None:
    with Pool(workers=1, journal=False) as pool:
        pool.define("Slow", SLOW)
        items = ["HANG"] + [f"q{i}" for i in range(60)]  # 3 s of work at least, in the one slot left
        batch = pool.batch(items, module="Slow", shard_size=3, concurrency=2, item_timeout=1.5, max_retries=0)
        batch.wait(60)
        assert batch.records[0]["error"]["type"] == "ItemTimeout"
        assert batch.arrived.index(0) < len(items) - 10  # it failed while the others went on, not at the end
        assert all(r["ok"] and r["tries"] == 1 for r in batch.records[1:])


def test_stop_says_where_the_finished_items_are(pool: Pool) -> None:
    """``pool.batch(...).result()`` (or ``pool.map``'s) keeps no handle: Stop's KeyboardInterrupt says that
    running it again takes the finished items from the journal, which it then does."""
    pool.define("Slow", SLOW)
    items = ["stop-a", "stop-b", "HANG", "HANG"]
    # concurrency 2: a worker holding a quick shard and a HANG one runs both (with 1, the HANG could take the slot)
    batch = pool.batch(items, module="Slow", shard_size=1, concurrency=2)

    def stop() -> None:
        wait_until(lambda: batch.ok == 2, what="the two quick items")
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=stop, daemon=True).start()
    with pytest.raises(KeyboardInterrupt) as stopped:
        batch.result(60)
    assert stopped.value.__notes__ == ["the batch was stopped after 2 of 4 items; run the same pool.batch(...) again: "
                                       "they come from the journal, only the rest is computed"]
    again = pool.batch(items, module="Slow", shard_size=1, concurrency=2)
    try:
        assert again.from_journal == 2
        assert [to_output(r["result"], Resolver())["answer"] for r in again.records[:2]] == ["STOP-A", "STOP-B"]
    finally:
        again.cancel()


def test_define_then_run_streams_every_predictor(pool: Pool) -> None:
    info = pool.define("TwoStep", TWO_STEP)
    assert info == {"name": "TwoStep", "kind": "module class", "inputs": ["question"], "required": ["question"],
                    "optional": [], "open_ended": False}
    run = pool.execute_stream("run_module", {"name": "TwoStep", "inputs": {"question": "Why?"}})
    final = run.result()
    assert final["answer"].startswith("Demo LM answer to 'Why?'")
    streamed = {(c["predictor"], c["field"]) for c in run.chunks if c.kind == "token"}
    assert streamed == {("topic.predict", "reasoning"), ("topic.predict", "topic"), ("answer", "answer")}


def test_defined_module_in_a_batch(pool: Pool) -> None:
    pool.define("TwoStep", TWO_STEP)
    out = pool.batch([{"question": f"q{i}"} for i in range(12)], module="TwoStep").result()
    assert [o["answer"].split(":")[0] for o in out] == [f"Demo LM answer to 'q{i}'" for i in range(12)]


def test_a_batch_of_a_module_with_several_completions_gives_its_fields_alone(pool: Pool) -> None:
    pool.define("TwoAnswers", dspy.Predict("question -> answer", n=2))
    out = pool.batch(["q0", "q1"], module="TwoAnswers").result()
    assert [sorted(o) for o in out] == [["answer"], ["answer"]]
    assert out[1]["answer"].startswith("Demo LM answer to 'q1'")


def test_define_errors_are_clear(pool: Pool) -> None:
    with pytest.raises(SyntaxError):
        pool.define("Broken", "class Broken(:\n")
    with pytest.raises(ArgumentError, match=r"the source defines no 'Missing' \(it defines \['Other'\]\)"):
        pool.define("Missing", "class Other: pass\n")
    with pytest.raises(ToolError, match="ZeroDivisionError"):
        pool.define("Boom", "x = 1 / 0\n")
    with pytest.raises(ArgumentError, match="no module named 'Nope' on this worker"):
        pool.execute("run_module", {"name": "Nope", "inputs": {}})
    assert "Broken" not in pool.definitions and "Missing" not in pool.definitions


def test_definitions_reach_a_restarted_worker(pool: Pool) -> None:
    pool.define("Shout", "def Shout(text):\n    return {'loud': text.upper()}\n")
    old = next(r for r in pool.status() if r["worker"] == "w1")
    pool.kill_worker("w1", signal.SIGKILL)
    wait_until(lambda: any(r["worker"] == "w1" and r["state"] == "ready" and r["restarts"] == old["restarts"] + 1
                           for r in pool.status()), timeout=30, what="w1 to be replaced")
    result = pool.execute("run_module", {"name": "Shout", "inputs": "hey"}, worker="w1")
    assert to_output(result, Resolver()) == {"loud": "HEY"}  # what the function returned: a dict


def test_batch_survives_a_killed_worker(pool: Pool) -> None:
    pool.configure_lm("demo", ttft=0.01)
    try:
        first = []
        batch = pool.batch([f"q{i}" for i in range(120)], "question -> answer", shard_size=10, concurrency=2,
                           on_item=first.append)
        wait_until(lambda: len(first) >= 10, what="the batch to be under way")
        pool.kill_worker("w0", signal.SIGKILL)
        out = batch.result()
        assert len(out) == 120 and not any("error" in o for o in out)
        assert batch.retries >= 1  # the killed worker's unfinished items ran again elsewhere
        assert [o["answer"].split(":")[0] for o in out] == [f"Demo LM answer to 'q{i}'" for i in range(120)]
    finally:
        pool.configure_lm("demo")


class WalkCounted(dict):
    """A value in a module's history: counts the walks through it (DSPy's ``named_sub_modules`` reads ``items()``)."""

    walks = 0

    def items(self):  # noqa: ANN201
        WalkCounted.walks += 1
        return super().items()


class WalkedHistory(list):
    """A module's history that counts the walks through its entries (DSPy itself only appends and pops)."""

    walks = 0

    def __iter__(self):  # noqa: ANN204
        WalkedHistory.walks += 1
        return super().__iter__()


class WalksSeen(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        answer = self.predict(question=question).answer
        if not isinstance(self.history, WalkedHistory):  # the history did not travel: the worker's instance
            self.history = WalkedHistory([*self.history, WalkCounted(model="demo/demo")])  # keeps its own
        return dspy.Prediction(answer=answer, walks=WalkCounted.walks + WalkedHistory.walks)


def test_an_item_does_not_walk_the_lm_history_its_module_instance_keeps(pool: Pool) -> None:
    # DSPy appends every LM call's entry to the history of the module instance that all of a worker's items run,
    # up to 10,000: each item walked all of them (named_sub_modules, then the worker's own look for the LMs a
    # module holds in its attributes) to find the LMs the program holds, and a batch of a ChainOfThought took
    # 15 ms an item instead of 2 ms
    program = WalksSeen()
    batch = pool.map(program, [f"question {i}?" for i in range(8)], concurrency=1, journal=False)
    results = [*batch.result(60), pool.run(program, question="question?"), pool.run(program, question="again?")]
    assert [r.walks for r in results] == [0] * 10


def test_a_cancelled_batch_call_counts_the_tokens_of_the_items_that_came_back(pool: Pool) -> None:
    """Was: the pool took a call's LM tokens from its final result only, which a cancelled call never sends, so
    ``pool.stats()`` and ``%dspex status`` said 0 tokens for a batch stopped after items that used hundreds."""
    from dspex_nb import typed

    def used() -> tuple[int, int]:
        row = pool.stats()["tools"].get("batch_inference", {})
        return row.get("tokens_in", 0), row.get("tokens_out", 0)

    before = used()
    run = pool.execute_stream("batch_inference", {"signature": "question -> answer", "concurrency": 1,
                                                  "batch_items": [{"question": f"tokens {i}?"} for i in range(3000)]})
    wait_until(lambda: run.items >= 3, what="a few items")
    run.cancel()
    assert run.status == "cancelled"
    items = [chunk["result"] for chunk in run.chunks if chunk.kind == "item" and chunk["ok"]]
    spent = (sum(typed.tokens(r)[0] for r in items), sum(typed.tokens(r)[1] for r in items))
    assert spent[0] > 0 and run.tokens == spent
    wait_until(lambda: used() == (before[0] + spent[0], before[1] + spent[1]), what="the call's tokens in the stats")
