"""The Python API on a real pool: unary calls, streams, DSPy tools, routing, sessions, status."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from dspex_nb import Chunk, Pool


def test_execute_round_trips_json(pool: Pool) -> None:
    args = {"x": 1, "f": 2.5, "s": "é", "l": [1, None, True], "d": {"k": [1, 2]}}
    assert pool.execute("echo", args) == args


def test_stream_order_and_completeness(pool: Pool) -> None:
    run = pool.execute_stream("count", {"n": 20000})
    assert run.result() == {"count": 20000}
    items = [c for c in run.chunks if c.kind == "item"]
    assert [c["index"] for c in items] == list(range(20000))
    assert [c.seq for c in run.chunks] == list(range(20001))
    assert run.chunks[-1].kind == "final" and run.chunks[-1].is_final
    assert run.status == "done"


def test_a_stream_carries_any_json_value_unchanged(pool: Pool) -> None:
    # chunks travel packed in one JSON array per message: brackets, quotes and escapes inside a value must not
    # leak into the framing
    args = {"s": 'a "quoted" ], [0,"final",{}] \\ \u2028 é 😀', "big": 2**70, "f": -0.0, "inf": float("inf"),
            "nested": [[[]], {"": None}], "": [1.5e-300, True]}
    run = pool.execute_stream("echo", args)
    assert run.result() == args
    assert [(c.kind, c.seq, c.is_final) for c in run.chunks] == [("final", 0, True)]


def test_on_chunk_sees_every_chunk_in_order(pool: Pool) -> None:
    seen: list[Chunk] = []
    run = pool.execute_stream("count", {"n": 300}, on_chunk=seen.append)
    run.result()
    assert seen == run.chunks
    assert [c.seq for c in seen] == list(range(301))


def test_iterator_form_yields_as_chunks_arrive(pool: Pool) -> None:
    run = pool.execute_stream("count", {"n": 5, "delay": 0.01})
    kinds = [chunk.kind for chunk in run]
    assert kinds == ["item"] * 5 + ["final"]
    assert [c.kind for c in run] == kinds  # a finished run can be iterated again


def test_batch_inference_streams_one_item_per_input(pool: Pool) -> None:
    questions = [f"question {i}?" for i in range(30)]
    items: list[Chunk] = []
    before = sum(row["items"] for row in pool.status())
    run = pool.execute_stream(
        "batch_inference",
        {"signature": "question -> answer", "batch_items": [{"question": q} for q in questions], "concurrency": 4},
        on_chunk=lambda c: items.append(c) if c.kind == "item" else None)
    result = run.result()
    wait_until(lambda: sum(row["items"] for row in pool.status()) == before + 30, what="the items in the status")
    assert sorted(c["index"] for c in items) == list(range(30))
    assert result["ok"] == 30 and result["failed"] == 0
    assert [r["index"] for r in result["results"]] == list(range(30))
    for q, r in zip(questions, result["results"], strict=True):
        assert r["ok"] and r["result"]["answer"].startswith(f"Demo LM answer to '{q}'")


def test_batch_inference_accepts_strings_for_a_single_input_field(pool: Pool) -> None:
    result = pool.execute("batch_inference", {"signature": "question -> answer", "batch_items": ["a?", "b?"]})
    answers = [r["result"]["answer"] for r in result["results"]]
    assert answers[0].startswith("Demo LM answer to 'a?':") and answers[1].startswith("Demo LM answer to 'b?':")


def test_chain_of_thought_streams_tokens_per_field(pool: Pool) -> None:
    run = pool.execute_stream("chain_of_thought", {"signature": "question -> answer",
                                                   "inputs": {"question": "Why is the sky blue?"}})
    final = run.result()
    text: dict[str, str] = {}
    for chunk in run.chunks:
        if chunk.kind == "token":
            text[chunk["field"]] = text.get(chunk["field"], "") + chunk["text"]
    assert list(text) == ["reasoning", "answer"]
    assert text == {"reasoning": final["reasoning"], "answer": final["answer"]}
    assert sum(c.kind == "token" for c in run.chunks) > 10


def test_predict_unary_gives_typed_fields(pool: Pool) -> None:
    out = pool.execute("predict", {"signature": "text -> positive: bool, keywords: list[str], score: float",
                                   "inputs": {"text": "I love it"}})
    assert isinstance(out["positive"], bool)
    assert isinstance(out["keywords"], list) and all(isinstance(k, str) for k in out["keywords"])
    assert isinstance(out["score"], float)


def test_the_keys_a_raw_predict_result_carries_beside_its_fields_are_documented(pool: Pool) -> None:
    """Was: a raw result had __dspex_signature__ beside its fields, which the README's API section did not name."""
    out = pool.execute("predict", {"signature": "question -> answer", "inputs": {"question": "keys?"}})
    ours = {key for key in out if key.startswith("__dspex")}
    assert {"__dspex_signature__", "__dspex_usage__"} <= ours
    api = (Path(__file__).parents[1] / "README.md").read_text().split("## API", 1)[1].split("\n## ", 1)[0]
    assert [key for key in sorted(ours) if f"`{key}`" not in api] == []


def test_predict_is_deterministic_on_the_demo_lm(pool: Pool) -> None:
    args = {"signature": "question -> answer", "inputs": {"question": "same?"}}
    assert pool.execute("predict", args, worker="w0") == pool.execute("predict", args, worker="w1")


def test_configure_lm_switches_every_worker(pool: Pool) -> None:
    pool.configure_lm("demo", answer_tokens=7)
    try:
        for worker in ("w0", "w1"):
            out = pool.execute("predict", {"signature": "q -> a", "inputs": {"q": "x"}}, worker=worker)
            assert len(out["a"].split()) == 7
            assert pool.describe(worker)["lm"] == {"model": "demo", "kwargs": {"answer_tokens": 7}}
    finally:
        pool.configure_lm("demo")


def test_least_busy_routing(pool: Pool) -> None:
    busy = pool.execute_stream("sleep", {"seconds": 30})
    try:
        wait_until(lambda: any(row["in_flight"] for row in pool.status()), what="the sleep to be in flight")
        for _ in range(4):
            assert pool.execute("whoami")["worker"] != busy.worker
    finally:
        before = {row["worker"]: row for row in pool.status()}[busy.worker]
        failed_sleeps = pool.stats()["tools"].get("sleep", {}).get("errors", 0)
        busy.cancel()
    assert busy.wait(10) and busy.status == "cancelled"
    after = wait_until(lambda: [r for r in pool.status() if r["worker"] == busy.worker and not r["in_flight"]],
                       what="the cancelled call to be released")[0]
    assert (after["cancelled"], after["errors"]) == (before["cancelled"] + 1, before["errors"])  # not an error
    assert pool.stats()["tools"]["sleep"]["errors"] == failed_sleeps


def test_session_pins_calls_to_one_worker(pool: Pool) -> None:
    session = pool.session()
    seen = {session.execute("whoami")["worker"] for _ in range(6)}
    assert seen == {session.worker}
    assert session.execute("whoami")["session"] == session.id
    assert session.execute_stream("count", {"n": 2}).worker == session.worker


def test_concurrent_callers(pool: Pool) -> None:
    results: list[dict] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        out = pool.execute("echo", {"i": i})
        with lock:
            results.append(out)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["i"] for r in results) == list(range(40))


def test_status_reports_every_worker(pool: Pool) -> None:
    rows = pool.status()
    assert [r["worker"] for r in rows] == ["w0", "w1"]
    for row in rows:
        assert set(row) >= {"pid", "state", "in_flight", "done", "errors", "cancelled", "items", "restarts", "uptime"}
        assert row["state"] == "ready" and row["pid"] > 0
    assert sum(r["done"] for r in rows) > 0


def test_describe_lists_tools_with_schemas_and_versions(pool: Pool) -> None:
    info = pool.describe()
    tools = {t["name"]: t for t in info["tools"]}
    assert {"echo", "sleep", "configure_lm", "predict", "chain_of_thought", "batch_inference"} <= set(tools)
    assert tools["sleep"]["args"]["seconds"] == {"type": "float", "required": True}
    assert tools["batch_inference"]["streaming"] is True
    assert set(info["versions"]) == {"python", "dspy", "grpcio", "protobuf"}
    assert info["lm"]["model"] == "demo"


def test_worker_env_is_private_and_offline(pool: Pool) -> None:
    import os
    import stat

    socket_dir = pool.backend.dir
    assert socket_dir is not None
    assert stat.S_IMODE(os.stat(socket_dir).st_mode) == 0o700
    assert pool.workers[0].process.address.startswith(f"unix:{socket_dir}/")


def test_every_file_the_pool_and_its_journal_make_is_private(pool: Pool, tmp_path: Path) -> None:
    # was: template.log was 0644, the workers' sockets 0755, and a journal's directory made for it 0755
    import os
    import stat

    from dspex_nb.journal import Journal

    journal = Journal(tmp_path / "made" / "journal.sqlite3")  # a directory the journal makes
    journal.record("batch", "item", {"answer": "secret"})
    pool.run("question -> answer", question="Private?")
    made = [journal.path.parent, *journal.path.parent.iterdir(), *pool.backend.dir.iterdir()]
    modes = {path.name: oct(stat.S_IMODE(os.lstat(path).st_mode)) for path in made}
    assert {"template.log", "w0-0.sock", "w0-0.health.sock", "w0-0.log", "journal.sqlite3-wal"} <= set(modes)
    assert modes == {path.name: "0o700" if path.is_dir() else "0o600" for path in made}
    journal.close()


def test_pool_of_four_starts_all_workers() -> None:
    with Pool(workers=4) as four:
        rows = four.status()
        assert [r["state"] for r in rows] == ["ready"] * 4
        assert len({r["pid"] for r in rows}) == 4
        assert {four.execute("whoami", worker=f"w{i}")["worker"] for i in range(4)} == {"w0", "w1", "w2", "w3"}


WHERE = """
def where(name):
    import sys
    import {module}
    return dspy.Prediction(files={{m: sys.modules[m].__file__ for m in ("dspex_nb", "dspy", "grpc")}},
                           value={module}.VALUE)
"""


@pytest.mark.parametrize("start", ["spawn", "template"])
def test_packages_in_the_notebooks_folder_do_not_shadow_the_workers_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start: str) -> None:
    # Was: a worker is started with ``-m`` in the kernel's directory, which Python puts first on its sys.path, so a
    # folder there named dspex_nb, dspy or grpc was imported in place of the kernel's packages (the worker failed
    # to start), while the kernel had imported the installed ones
    for package in ("dspex_nb", "dspy", "grpc"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"raise ImportError('the notebook folder\\'s {package}')\n")
    module = f"notebook_module_{start}"
    (tmp_path / f"{module}.py").write_text("VALUE = 42\n")
    monkeypatch.chdir(tmp_path)
    with Pool(workers=1, lm="demo", start=start, journal=False) as here:
        here.define("where", WHERE.format(module=module))
        found = here.run("where", name="a")
    assert found.files == {name: sys.modules[name].__file__ for name in ("dspex_nb", "dspy", "grpc")}
    assert found.value == 42  # the notebook's own modules are still importable there


def test_calls_after_shutdown_raise_pool_closed() -> None:
    from dspex_nb.errors import PoolClosed

    p = Pool(workers=1)
    with pytest.raises(PoolClosed, match="not running"):
        p.execute("echo")


def test_stats_keep_per_call_timings(pool: Pool) -> None:
    before = pool.stats()["tools"].get("count", {"calls": 0, "chunks": 0})
    pool.execute_stream("count", {"n": 10}).result()
    pool.execute("count", {"n": 3})
    stats = pool.stats()["tools"]["count"]
    assert stats["calls"] == before["calls"] + 2
    assert stats["chunks"] == before["chunks"] + 11  # the unary call has no chunks
    for timing in ("queue_wait", "execution", "first_chunk"):
        assert set(stats[timing]) == {"p50_ms", "p95_ms", "max_ms"}
        assert 0 <= stats[timing]["p50_ms"] <= stats[timing]["p95_ms"] <= stats[timing]["max_ms"]
    assert pool.stats()["calls"] >= 2


def test_stop_stream_from_the_callback(pool: Pool) -> None:
    from dspex_nb.errors import StopStream

    def stop_at_five(chunk: Chunk) -> None:
        if chunk.kind == "item" and chunk["index"] == 5:
            raise StopStream

    run = pool.execute_stream("count", {"n": 100_000, "delay": 0.001}, on_chunk=stop_at_five)
    assert run.wait(20) and run.status == "cancelled" and run.error is None
    assert len(run.chunks) < 100_000


def test_runs_and_batches_are_futures(pool: Pool) -> None:
    """concurrent.futures.wait / as_completed, done callbacks, and Future.cancel stopping the remote work."""
    runs = [pool.execute_stream("count", {"n": 3}) for _ in range(4)]
    called: list = []
    runs[0].add_done_callback(called.append)
    done, not_done = concurrent.futures.wait(runs, timeout=60)
    assert set(done) == set(runs) and not not_done
    assert called == [runs[0]] and all(r.done() and r.done and not r.cancelled() for r in runs)
    assert {r.result()["count"] for r in concurrent.futures.as_completed(runs, timeout=60)} == {3}
    batch = pool.batch(["a?", "b?"], "question -> answer")
    assert next(concurrent.futures.as_completed([batch], timeout=60)) is batch and len(batch.result()) == 2
    sleeping = pool.execute_stream("sleep", {"seconds": 60})
    assert sleeping.cancel() is True
    assert sleeping.done() and sleeping.cancelled() and sleeping.status == "cancelled"  # at once, as a Future
    assert sleeping.cancel() is False
    slow = pool.batch([f"{i}?" for i in range(400)], "question -> answer", concurrency=1, journal=False)
    assert slow.cancel() is True and slow.done() and slow.cancelled() and slow.status == "cancelled"


def test_runs_and_batches_can_be_awaited(pool: Pool) -> None:
    async def main() -> tuple[list, list[str], list]:
        answers = await asyncio.gather(*(pool.run_async("question -> answer", question=f"q{i}?") for i in range(3)))
        kinds = [chunk.kind async for chunk in pool.execute_stream("count", {"n": 2})]
        outputs = await pool.batch(["x?", "y?"], "question -> answer")
        return answers, kinds, outputs

    answers, kinds, outputs = asyncio.run(main())
    assert [a.answer.startswith(f"Demo LM answer to 'q{i}?'") for i, a in enumerate(answers)] == [True] * 3
    assert kinds == ["item", "item", "final"]
    assert [o["answer"][:22] for o in outputs] == ["Demo LM answer to 'x?'", "Demo LM answer to 'y?'"]


def test_awaiting_a_run_whose_value_cannot_be_made_raises_instead_of_hanging(pool: Pool) -> None:
    run = pool.execute_stream("count", {"n": 1})
    run.decode = lambda final: 1 / 0  # e.g. a result the kernel cannot rebuild

    async def main() -> object:
        return await asyncio.wait_for(run, 30)

    with pytest.raises(ZeroDivisionError):
        asyncio.run(main())


def test_a_pool_takes_the_kernels_dspy_lm_and_says_when_a_call_runs_on_another(pool: Pool) -> None:
    import dspy

    from dspex_nb import demo_lm
    from dspex_nb.errors import PoolLMDiffers

    assert Pool(workers=1).lm == "demo"  # no LM in the kernel: the demo LM
    with dspy.context(lm=demo_lm(ttft=0.01, temperature=0.5)):
        assert (Pool(workers=1).lm, Pool(workers=1).lm_kwargs) == ("demo", {"ttft": 0.01, "temperature": 0.5})
    real = dspy.LM("openai/gpt-4o-mini", temperature=0.2, api_key="sk-kernel-key", cache=False)
    with dspy.context(lm=real):
        chosen = Pool(workers=1, lm_kwargs={"temperature": 0.0})
        assert (chosen.lm, chosen.lm_kwargs) == ("openai/gpt-4o-mini",
                                                 {"cache": False, "temperature": 0.0, "api_key": "sk-kernel-key"})
    before = dspy.settings.lm
    try:  # the kernel's configured LM is another than the pool's: the call runs on the pool's, and says so
        dspy.configure(lm=real)
        with pytest.warns(PoolLMDiffers, match="runs on the pool's LM 'demo', not on the kernel's DSPy LM "
                                               "'openai/gpt-4o-mini'"):
            assert pool.run("question -> answer", question="Which LM?").answer.startswith("Demo LM answer")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once per LM
            pool.run("question -> answer", question="Which LM again?")
        dspy.configure(lm=demo_lm())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same LM: nothing to say
            pool.run("question -> answer", question="Which LM?")
        dspy.configure(lm=demo_lm(temperature=0.5))
        with pytest.warns(  # the same model: the settings tell them apart
                PoolLMDiffers, match=r"the pool's LM 'demo' with \{\}, not on the kernel's DSPy LM 'demo' with "
                                     r"\{'temperature': 0.5\}"):
            pool.run("question -> answer", question="Which LM?")
    finally:
        dspy.configure(lm=before)

    class Custom(dspy.BaseLM):
        def forward(self, prompt=None, messages=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
            raise NotImplementedError

    with dspy.context(lm=Custom("custom")), pytest.raises(ValueError, match="kernel's DSPy LM is a Custom"):
        Pool(workers=1)
    from dspex_nb.worker.demo_lm import DemoEngine

    with dspy.context(lm=dspy.LM("custom/echo", engine=DemoEngine())), pytest.raises(
            ValueError, match="'custom/echo' runs an engine of its own .DemoEngine."):  # not dspy.LM("custom/echo")
        Pool(workers=1)
    with dspy.context(lm=dspy.LM("openai/gpt-4o-mini", engine="litellm")):  # one of DSPy's, by name: kept
        assert Pool(workers=1).lm_kwargs == {"engine": "litellm"}


def test_a_call_runs_on_the_lm_dspy_context_sets_as_in_the_kernel(pool: Pool) -> None:
    import dspy

    from dspex_nb import demo_lm

    qa = dspy.ChainOfThought("question -> answer")
    short = demo_lm(answer_tokens=3)  # the pool's LM is demo_lm(): this one gives other answers
    with dspy.context(lm=short), warnings.catch_warnings():
        warnings.simplefilter("error")  # DSPy's rule, a context's LM wins: nothing to warn about
        expected = qa(question="How many floors?")
        assert len(short.history) == 1
        ran = pool.run(qa, question="How many floors?")
        streamed = pool.run_stream(qa, question="How many floors?").result(60)
        mapped = pool.map(qa, ["How many floors?"], journal=False).result(60)
    assert [ran.answer, streamed.answer, mapped[0].answer] == [expected.answer] * 3
    assert ran.reasoning == expected.reasoning
    # the pool's calls joined it, the map's item too, as Module.batch's threads add theirs
    assert len(short.history) == 4 and short.history[-1]["model"] == "demo/demo"
    assert pool.run(qa, question="How many floors?").answer != expected.answer  # outside it: the pool's LM

    from dspex_nb.worker.demo_lm import DemoEngine

    own = dspy.LM("custom/echo", engine=DemoEngine(answer_tokens=2))  # an engine of the user's travels too
    with dspy.context(lm=own):
        assert pool.run(qa, question="Q?").answer == qa(question="Q?").answer


def test_an_lm_dspy_context_sets_that_cannot_be_sent_is_named(pool: Pool) -> None:
    # was: "the kernel's DSPy settings ['lm'] cannot be sent ... set them to None around the pool's calls"
    import dspy

    from dspex_nb.errors import ArgumentError

    class Streaming(dspy.BaseLM):
        def __init__(self) -> None:
            super().__init__("streaming/lm")
            self.chunks = (chunk for chunk in "ab")  # a generator: pickle cannot send it

    with dspy.context(lm=Streaming()), pytest.raises(
            ArgumentError, match=r"the LM Streaming 'streaming/lm' that dspy.context\(lm=...\) sets around this call "
                                 r"cannot be sent to the workers: TypeError: cannot pickle 'generator' object"):
        pool.run("question -> answer", question="Which LM?")


def test_a_call_of_a_program_the_workers_have_does_not_walk_it_for_its_types(pool: Pool,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # was: each pool.run of a retriever holding 20,000 passages walked them all with DSPy's named_parameters (for
    # the classes its results may hold, needed only where it is installed) and base64-encoded its 3 MB pickle
    import dspy
    from dspy.primitives.base_module import BaseModule

    class Retriever(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.passages = [f"passage {i}" for i in range(20_000)]
            self.qa = dspy.Predict("question -> answer")

        def forward(self, question: str) -> dspy.Prediction:
            return self.qa(question=f"{question} {self.passages[7]}")

    walks: list[str] = []
    walk = BaseModule.named_parameters
    monkeypatch.setattr(BaseModule, "named_parameters", lambda self: walks.append(type(self).__name__) or walk(self))
    program = Retriever()
    answers = [pool.run(program, question="Q?").answer for _ in range(3)]
    assert walks == ["Retriever"] and len(set(answers)) == 1  # installed once, then only its key is checked
    program.passages[7] = "changed"  # a real change is still seen: the program is installed again
    assert pool.run(program, question="Q?").answer != answers[0] and walks == ["Retriever"] * 2


def test_a_program_that_cannot_be_pickled_is_refused_naming_what_cannot_travel(pool: Pool) -> None:
    # was: the hint named "a lock" among what cannot be pickled, though a lock travels (made anew on the worker)
    import socket

    import dspy

    from dspex_nb.errors import ArgumentError, NotSent

    class Holder(dspy.Module):
        def __init__(self, thing: object) -> None:
            super().__init__()
            self.thing = thing
            self.qa = dspy.Predict("question -> answer")

        def forward(self, question: str) -> dspy.Prediction:
            return self.qa(question=question)

    assert pool.run(Holder(threading.Lock()), question="Q?").answer
    with socket.socket() as client:
        # was: "tool 'define' failed: TypeError: Holder cannot be sent ...", a kernel-side refusal told as if a worker
        # tool had failed, and no word of which attribute could not be pickled
        def search(query: str) -> str:
            return f"{client}: {query}"

        for holder, part, kind in ((Holder(client), "Holder.thing", "socket"),
                                   (Holder({"search": search}), "Holder.thing['search']'s variable 'client'", "socket"),
                                   (Holder([open(os.devnull, "w")]), "Holder.thing[0]", "TextIOWrapper")):
            sends = (lambda h=holder: pool.run(h, question="Q?"), lambda h=holder: pool.map(h, ["Q?"]).result(),
                     lambda h=holder: pool.run_stream(h, question="Q?").result(),
                     lambda h=holder: pool.evaluate(h, [dspy.Example(question="Q?").with_inputs("question")],
                                                    lambda example, pred, trace=None: 1.0))
            for send in sends:
                with pytest.raises(ArgumentError, match=rf"^Holder cannot be sent to the workers: {re.escape(part)} "
                                   rf"\(a {kind}\) cannot be pickled: \w+Error: .* \(a program travels pickled; a "
                                   r"client, a socket or a file open for writing cannot be: create that inside the "
                                   r"module's forward instead\)$") as caught:
                    send()
                assert isinstance(caught.value, NotSent)
            if isinstance(holder.thing, list):
                holder.thing[0].close()


def test_a_program_whose_function_has_an_unset_variable_is_refused_naming_what_cannot_travel(pool: Pool) -> None:
    import socket

    import dspy

    from dspex_nb.errors import NotSent

    def make_search(client: socket.socket):  # noqa: ANN202
        def search(query: str) -> str:
            return f"{client} {fallback}: {query}"

        if not search:
            fallback = "none"  # never set: search's cell of it stays empty
        return search

    class Searcher(dspy.Module):
        def __init__(self, search: object) -> None:
            super().__init__()
            self.search = search

        def forward(self, question: str) -> str:
            return self.search(question)

    with socket.socket() as client:
        # was: ValueError: Cell is empty, the search for the part that cannot be pickled failing on the unset variable
        with pytest.raises(NotSent, match=r"^Searcher cannot be sent to the workers: Searcher.search's variable "
                                          r"'client' \(a socket\) cannot be pickled"):
            pool.run(Searcher(make_search(client)), question="Q?")


def test_a_pool_takes_the_kernels_reasoning_model_as_dspy_lm_took_it() -> None:
    import dspy

    # dspy.LM keeps a reasoning model's max_tokens as max_completion_tokens, which it does not take back
    with dspy.context(lm=dspy.LM("openai/gpt-5", temperature=1.0, max_tokens=16000)):
        with Pool(workers=1, journal=False) as reasoning:
            assert reasoning.lm_kwargs == {"temperature": 1.0, "max_tokens": 16000}
            assert reasoning.running


def test_an_awaited_call_leaves_a_sigint_handler_installed_after_it_as_it_is(pool: Pool) -> None:
    # a later cell's handler (ipykernel's, for an async cell) installed while a call is awaited stays
    from dspex_nb.errors import Cancelled
    from dspex_nb.pool import calls

    def later_cells(signum: int, frame: Any) -> None:
        pass

    async def main() -> None:
        run = pool.execute_stream("sleep", {"seconds": 60})
        async def awaited() -> Any:
            return await run

        task = asyncio.ensure_future(awaited())
        deadline = time.monotonic() + 30
        while signal.getsignal(signal.SIGINT) is not calls._cancel_awaited:
            assert time.monotonic() < deadline, "the awaited call did not take SIGINT"
            await asyncio.sleep(0.01)
        signal.signal(signal.SIGINT, later_cells)
        run.cancel()
        with pytest.raises(Cancelled):
            await task

    before = signal.getsignal(signal.SIGINT)
    try:
        asyncio.run(main())
        assert signal.getsignal(signal.SIGINT) is later_cells
    finally:
        signal.signal(signal.SIGINT, before)


def cell(code: str, namespace: dict[str, Any]) -> None:
    """Run ``code`` as a notebook cell runs: a frame of its own."""
    exec(compile(code, "<cell>", "exec"), namespace)  # noqa: S102


def test_ctrl_c_in_a_later_cell_leaves_a_suspended_loop_over_a_stream_alone(pool: Pool) -> None:
    # Was: a loop over a run_stream left suspended (next(it) in one cell) kept its SIGINT handler, so Ctrl-C in any
    # later cell cancelled that stream too, which Python's KeyboardInterrupt does not; in the loop itself, in its
    # body or its wait, it still cancels
    from dspex_nb.errors import Cancelled

    namespace = {"signal": signal, "run": pool.execute_stream("count", {"n": 100, "delay": 0.02})}
    cell("it = iter(run)\nfirst = next(it)\n", namespace)
    with pytest.raises(KeyboardInterrupt):
        cell("signal.raise_signal(signal.SIGINT)\n", namespace)  # a later cell, interrupted
    cell("rest = list(it)\n", namespace)
    assert namespace["run"].result(30) == {"count": 100} and len(namespace["rest"]) == 100  # items 1-99, the final
    namespace["run"] = pool.execute_stream("count", {"n": 100, "delay": 0.02})
    with pytest.raises(KeyboardInterrupt):
        cell("for chunk in run:\n    signal.raise_signal(signal.SIGINT)\n", namespace)
    with pytest.raises(Cancelled):
        namespace["run"].result(30)


@pytest.mark.parametrize("wrapper", ["def wrap(it):\n    for item in it:\n        yield item\n",
                                     "def wrap(it):\n    yield from it\n"])
def test_ctrl_c_in_the_body_of_a_loop_over_a_generator_wrapping_a_stream_cancels_it(pool: Pool, wrapper: str) -> None:
    # Was: `for chunk in tqdm(run)` (or the notebook's own generator over it): Ctrl-C in the loop's body raised
    # KeyboardInterrupt and the stream ran on to its end (its handler took the wrapper's frame, suspended while the
    # body runs, for the loop's)
    from dspex_nb.errors import Cancelled

    namespace = {"signal": signal, "run": pool.execute_stream("count", {"n": 100, "delay": 0.02})}
    cell(wrapper, namespace)
    with pytest.raises(KeyboardInterrupt):
        cell("for chunk in wrap(run):\n    signal.raise_signal(signal.SIGINT)\n", namespace)
    with pytest.raises(Cancelled):
        namespace["run"].result(30)


def test_a_stopped_pool_leaves_no_file_open() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with Pool(workers=1, lm="demo", start="template", journal=False) as own:
            own.execute("echo", {"x": 1})
        del own
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed  # the template's stdout pipe was left to the garbage collector


def read_variable(name: str) -> str | None:
    import os

    return os.environ.get(name)


def test_a_variable_the_kernel_sets_after_the_start_reaches_the_workers(pool: Pool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # DSPy's tutorials set os.environ["OPENAI_API_KEY"] in a cell: one set after %dspex start reached no worker
    monkeypatch.setenv("DSPEX_TEST_SET_LATER", "later")
    assert pool.run(read_variable, name="DSPEX_TEST_SET_LATER") == "later"
    assert pool.run_stream(read_variable, name="DSPEX_TEST_SET_LATER").result(60) == "later"
    assert pool.map(read_variable, [{"name": "DSPEX_TEST_SET_LATER"}] * 4, journal=False).result(60) == ["later"] * 4
    monkeypatch.delenv("DSPEX_TEST_SET_LATER")  # deleted in the kernel: deleted there too
    assert pool.map(read_variable, [{"name": "DSPEX_TEST_SET_LATER"}] * 4, journal=False).result(60) == [None] * 4


def test_the_variables_a_call_brings_leave_out_those_the_pool_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    from dspex_nb.pool.environment import Changes
    from dspex_nb.pool.local import LocalBackend

    monkeypatch.setenv("DSPEX_TEST_CHANGED", "before")
    changes = Changes(LocalBackend.follows, pinned=["DSPEX_TEST_PINNED"])
    assert changes.now() == {}
    monkeypatch.setenv("DSPEX_TEST_PINNED", "kernel")  # Pool(env=...) wins
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")  # a worker's own, to import this dspex_nb
    monkeypatch.setenv("DSPEX_TEST_CHANGED", "after")
    assert changes.now() == {"DSPEX_TEST_CHANGED": "after"}
    monkeypatch.setenv("DSPEX_TEST_CHANGED", "before")  # back as it was: the workers are told so
    assert changes.now() == {"DSPEX_TEST_CHANGED": "before"}


def test_a_result_made_within_the_timeout_is_kept_however_slowly_its_chunks_are_read(pool: Pool) -> None:
    # Was: the kernel's gRPC deadline also counted the time its reader spent in on_chunk, so a stream whose worker had
    # finished well within its timeout raised CallTimeout ("the remote work was cancelled") once the reader fell behind
    timeout = 1.0
    started = time.monotonic()

    def slow_reader(chunk: Chunk) -> None:
        if chunk.kind == "item" and chunk["index"] == 0:  # the reader is held until the work is done and past timeout
            wait_until(lambda: pool.describe("w1")["counters"]["active_requests"] == 0, what="the call to end")
            threading.Event().wait(max(0.0, started + 2 * timeout - time.monotonic()))

    run = pool.execute_stream("count", {"n": 5, "delay": 0.05}, on_chunk=slow_reader, timeout=timeout, worker="w1")
    assert run.result(60) == {"count": 5}  # a message each: the last ones wait in the kernel while the reader is held
    assert [chunk["index"] for chunk in run if chunk.kind == "item"] == list(range(5))


def test_the_worker_keeps_a_timeout_of_a_program_that_does_not_see_its_cancel(pool: Pool) -> None:
    # the call ends with CallTimeout at its timeout on the worker, also where the program sleeps past it
    from dspex_nb.errors import CallTimeout

    with pytest.raises(CallTimeout, match=r"tool 'run_module' did not finish within its timeout of 0.5 s"):
        pool.call(sleeps, {"seconds": 30}, timeout=0.5)
    with pytest.raises(CallTimeout, match=r"within its timeout of 0.5 s; the remote work was cancelled"):
        pool.call(sleeps, {"seconds": 30}, stream=True, timeout=0.5).result(60)
    with pytest.raises(CallTimeout):  # a loop over the stream does not end quietly on a truncated answer
        for _ in pool.call(sleeps, {"seconds": 30}, stream=True, timeout=0.5):
            pass


def sleeps(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def reads(path: str) -> str:
    with open(path) as file:
        return file.read()


def moves_to(directory: str) -> str:
    import os

    os.chdir(directory)
    return os.getcwd()


def test_each_call_runs_in_the_kernels_working_directory(pool: Pool, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Was: workers kept the directory the kernel had when the pool started: a %cd after it never reached them (a
    # relative path was FileNotFoundError there), and a program's os.chdir stayed on the one worker that ran it
    (tmp_path / "notes.txt").write_text("the notebook's notes")
    monkeypatch.chdir(tmp_path)
    assert pool.run(reads, path="notes.txt") == "the notebook's notes"
    assert pool.run_stream(reads, path="notes.txt").result(60) == "the notebook's notes"
    assert pool.map(moves_to, [{"directory": "/"}] * 4, journal=False).result(60) == ["/"] * 4  # on both workers
    assert pool.map(reads, [{"path": "notes.txt"}] * 4, journal=False).result(60) == ["the notebook's notes"] * 4
    assert pool.map(moves_to, [{"directory": "."}] * 4, journal=False).result(60) == [os.getcwd()] * 4


def test_a_kernel_directory_the_worker_cannot_enter_leaves_it_where_it_is_said_once(
        capsys: pytest.CaptureFixture[str]) -> None:
    from dspex_nb.worker.state import WorkerState

    state = WorkerState("w0", "run", 2**20)
    before = os.getcwd()
    for _ in range(2):
        state.enter("/no/such/directory/on/this/node")
    assert os.getcwd() == before
    assert capsys.readouterr().err.count("cannot work in the kernel's directory /no/such/directory/on/this/node") == 1
