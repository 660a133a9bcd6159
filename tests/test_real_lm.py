"""A real LM's path without a paid key: workers reach an OpenAI-compatible server on loopback through an
ordinary ``dspy.LM("openai/...", api_base=...)``. DSPy's own retries, usage tracking and cache are used."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import dspy
import pytest
from openai_server import OpenAIServer

from dspex_nb import Pool
from dspex_nb.errors import ArgumentError
from dspex_nb.ui.progress import STATS_COLUMNS, StreamText, batch_summary, cost_text, stats_rows

MODEL = "openai/test-model"  # not in DSPy's price list: its calls have no cost
PRICED = "openai/gpt-4o-mini"  # in DSPy's price list (the server answers under any model name)


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as s:
        yield s


def settings(server: OpenAIServer, **extra: Any) -> dict[str, Any]:
    return {"api_base": server.url, "api_key": "sk-test", "cache": False, **extra}


@pytest.fixture(scope="module")
def lm_pool(server: OpenAIServer) -> Iterator[Pool]:
    with Pool(workers=2, lm=MODEL, lm_kwargs=settings(server), journal=False) as p:
        yield p


def test_tokens_stream_per_field_and_usage_is_counted(server: OpenAIServer, lm_pool: Pool) -> None:
    program = dspy.ChainOfThought("question -> answer")
    run = lm_pool.run_stream(program, question="How do tides work?")
    result = run.result(60)
    fields = {c["field"] for c in run.chunks if c.kind == "token"}
    assert fields == {"reasoning", "answer"}
    assert "".join(c["text"] for c in run.chunks if c.kind == "token" and c["field"] == "answer") == result.answer
    with dspy.context(lm=dspy.LM(MODEL, **settings(server)), track_usage=True):
        expected = program(question="How do tides work?")
    assert result == expected
    assert result.get_lm_usage() == expected.get_lm_usage() and expected.get_lm_usage()[MODEL]["prompt_tokens"] > 0
    usage = expected.get_lm_usage()[MODEL]
    assert run.tokens == (usage["prompt_tokens"], usage["completion_tokens"])
    assert run.cost is None and "$" not in StreamText(run).summary()  # an unpriced model is not free
    assert lm_pool.stats()["tools"]["run_module"]["tokens_out"] >= usage["completion_tokens"]


def test_a_429_is_retried_once_after_its_retry_after(server: OpenAIServer, lm_pool: Pool) -> None:
    answer = lm_pool.run(dspy.Predict("question -> answer"), question="rate limited [429]")
    assert answer.answer.startswith("Demo LM answer to 'rate limited [429]'")
    assert server.count("rate limited [429]") == 2  # one 429, one retry by dspy.LM: not stacked retries


def test_a_batch_retries_a_dropped_connection(server: OpenAIServer, lm_pool: Pool) -> None:
    lm_pool.configure_lm(MODEL, **settings(server, num_retries=0))  # dspy.LM gives up at once: the batch retries
    try:
        batch = lm_pool.map(dspy.Predict("question -> answer"), ["first?", "cut [drop]", "third?"])
        answers = batch.result(60)
    finally:
        lm_pool.configure_lm(MODEL, **settings(server))
    assert [a.answer.split(":")[0] for a in answers] == [
        "Demo LM answer to 'first?'", "Demo LM answer to 'cut [drop]'", "Demo LM answer to 'third?'"]
    assert server.count("cut [drop]") == 2 and batch.retries == 1
    assert batch.snapshot()["tokens_out"] > 0


def test_stalls_and_server_errors_fail_their_items_and_the_journal_keeps_the_rest(
        server: OpenAIServer, tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    items = ["fine?", "slow [stall]", "broken [500]"]
    with Pool(workers=2, lm=MODEL, lm_kwargs=settings(server, num_retries=1), journal=journal) as pool:
        program = dspy.Predict("question -> answer")
        batch = pool.map(program, items, item_timeout=3, max_retries=1)
        batch.wait(120)
        records = batch.records
        assert records[0]["ok"]
        assert records[1]["error"]["type"] == "ItemTimeout"
        assert records[2]["error"]["type"] == "LMServerError" and "simulated HTTP 500" in records[2]["error"]["message"]
        assert server.count("broken [500]") == 4  # 2 tries of the batch, each with 1 retry of dspy.LM
        assert batch.result()[0].answer.startswith("Demo LM answer to 'fine?'")

        again = pool.map(program, items[:1])
        assert again.result(60) == batch.result()[:1] and again.from_journal == 1


def test_workers_share_the_users_dspy_cache_across_sessions(server: OpenAIServer) -> None:
    cache_dir = Path(os.environ["DSPY_CACHEDIR"])  # the test run's own (conftest), as a user's DSPY_CACHEDIR
    question = f"cached {os.getpid()}?"
    for _ in range(2):  # two pools: two sessions of worker processes
        with Pool(workers=1, lm=MODEL, lm_kwargs=settings(server, cache=True), journal=False) as pool:
            assert pool.run(dspy.Predict("question -> answer"), question=question).answer.startswith(
                f"Demo LM answer to '{question}'")
    assert server.count(question) == 1  # the second session's call came from DSPy's cache on disk
    assert any(cache_dir.rglob("*")), f"nothing in {cache_dir}"


def test_the_kernels_dspy_cache_turned_off_is_off_on_the_pool(server: OpenAIServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # DSPy's cache tutorial: dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False) in the
    # kernel, e.g. for fresh samples; the workers' cache (shared on disk) answered the repeated calls instead
    monkeypatch.setattr(dspy, "cache", dspy.cache)  # the kernel's cache is put back after the test
    program = dspy.Predict("question -> answer")
    with Pool(workers=1, lm=MODEL, lm_kwargs=settings(server, cache=True), journal=False) as pool:
        for tiers, calls in [({"enable_disk_cache": False, "enable_memory_cache": False}, 2),
                             ({"enable_memory_cache": False}, 1)]:  # on disk only
            dspy.configure_cache(**tiers)
            question = f"fresh {sorted(tiers)} {os.getpid()}?"
            for _ in range(2):
                pool.run(program, question=question)
            assert server.count(question) == calls, tiers


def test_the_kernels_dspy_cache_folder_is_the_pools(server: OpenAIServer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # dspy.configure_cache(disk_cache_dir=...) in the kernel: a call the kernel made is answered from that folder
    # on the pool too (the same answer, no second LM call), and the pool's calls fill it for the kernel
    monkeypatch.setattr(dspy, "cache", dspy.cache)  # the kernel's cache is put back after the test
    dspy.configure_cache(disk_cache_dir=str(tmp_path), enable_memory_cache=False, disk_size_limit_bytes=2**25)
    program = dspy.Predict("question -> answer")
    cached = {k: v for k, v in settings(server).items() if k != "cache"}  # DSPy's default: cached
    with Pool(workers=1, lm=MODEL, lm_kwargs=cached, journal=False) as pool, dspy.context(lm=dspy.LM(MODEL, **cached)):
        kernel_first, pool_first = f"kernel first {os.getpid()}?", f"pool first {os.getpid()}?"
        in_kernel = program(question=kernel_first)
        assert pool.run(program, question=kernel_first) == in_kernel
        on_pool = pool.run(program, question=pool_first)
        assert program(question=pool_first) == on_pool
        assert server.count(kernel_first) == server.count(pool_first) == 1
        assert pool.run(cache_made_as) == {"disk": str(tmp_path), "memory": False, "limit": 2**25}
    assert any(tmp_path.rglob("*")), f"nothing in {tmp_path}"
    # diskcache keeps a folder's size limit in it, and whoever opens it last sets it: the workers kept the kernel's
    with diskcache.Cache(str(tmp_path / "000")) as shard:  # opened without a limit: the one kept in the folder
        assert shard.size_limit == 2**25 / 16


def cache_made_as() -> dict:
    """The worker's DSPy cache, as a call finds it."""
    import dspy

    disk = dspy.cache.disk_cache
    return {"disk": dspy.cache.disk_cache_dir, "memory": dspy.cache.enable_memory_cache,
            "limit": round(disk.size_limit * disk._count)}


class _Planted:
    """A cache entry planted by another user of a shared cache folder: unpickling it touches ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return Path.touch, (self.marker,)


def test_the_kernels_restricted_dspy_cache_is_restricted_on_the_pool(server: OpenAIServer, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # dspy.configure_cache(disk_cache_dir=..., restrict_pickle=True): a folder others may write to, read without
    # unpickling what they put there; the workers read that folder too, and unpickled an entry planted there
    import diskcache

    monkeypatch.setattr(dspy, "cache", dspy.cache)  # the kernel's cache is put back after the test
    folder, marker = tmp_path / "cache", tmp_path / "unpickled"
    dspy.configure_cache(disk_cache_dir=str(folder), enable_memory_cache=False, restrict_pickle=True)
    program = dspy.Predict("question -> answer")
    cached = {k: v for k, v in settings(server).items() if k != "cache"}  # DSPy's default: cached
    question = f"planted {os.getpid()}?"
    with Pool(workers=1, lm=MODEL, lm_kwargs=cached, journal=False) as pool:
        pool.run(program, question=question)
        shared = diskcache.FanoutCache(str(folder), shards=16)
        for key in list(shared):
            shared[key] = _Planted(marker)
        shared.close()
        pool.run(program, question=question)
    assert not marker.exists(), "the worker unpickled a planted cache entry"
    assert server.count(question) == 2  # the planted entry was refused, as in the kernel, and the LM asked again


def billed(lm: dspy.LM) -> float:
    """The cost of an LM's calls by in-kernel DSPy's history (a cache hit keeps its cost, but bills no usage)."""
    return sum(entry["cost"] for entry in lm.history if entry["usage"])


def test_cost_where_dspy_prices_the_model(server: OpenAIServer, lm_pool: Pool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "true")  # DSPy's bundled prices, as the workers use them
    program = dspy.ChainOfThought("question -> answer")
    questions = ["What does it cost?", "And this?", "And that?"]
    before = lm_pool.stats()
    lm_pool.configure_lm(PRICED, **settings(server))
    try:
        run = lm_pool.run_stream(program, question=questions[0])
        run.result(60)
        batch = lm_pool.map(program, questions[1:])
        batch.result(60)
    finally:
        lm_pool.configure_lm(MODEL, **settings(server))
    after = lm_pool.stats()
    lm = dspy.LM(PRICED, **settings(server))
    with dspy.context(lm=lm):
        program(question=questions[0])
        call_cost = billed(lm)
        for question in questions[1:]:
            program(question=question)
    batch_cost = billed(lm) - call_cost
    assert call_cost > 0 and run.cost == pytest.approx(call_cost)
    assert batch.snapshot()["cost"] == pytest.approx(batch_cost)
    assert after["cost"] - (before["cost"] or 0) == pytest.approx(call_cost + batch_cost)
    assert after["tools"]["batch_inference"]["cost"] - (before["tools"].get("batch_inference", {}).get("cost") or 0) \
        == pytest.approx(batch_cost)
    assert StreamText(run).summary().endswith(f"out · {cost_text(run.cost)}")
    assert f"out · {cost_text(batch.snapshot()['cost'])}" in batch_summary(batch.snapshot())
    column = STATS_COLUMNS.index("cost")
    assert cost_text(after["tools"]["run_module"]["cost"]) in {row[column] for row in stats_rows(after)}


def test_a_cache_hit_costs_nothing(server: OpenAIServer, lm_pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "true")
    program = dspy.Predict("question -> answer")
    question = f"cached cost {os.getpid()}?"
    lm_pool.configure_lm(PRICED, **settings(server, cache=True))
    try:
        first = lm_pool.run_stream(program, question=question)
        first.result(60)
        hit = lm_pool.run_stream(program, question=question)  # from DSPy's cache, which the workers share
        hit.result(60)
    finally:
        lm_pool.configure_lm(MODEL, **settings(server))
    lm = dspy.LM(PRICED, **settings(server))
    with dspy.context(lm=lm):
        program(question=question)
    assert first.cost == pytest.approx(billed(lm)) and (hit.tokens, hit.cost) == ((0, 0), None)
    assert server.count(question) == 2  # the worker's first call and the kernel's, not the cache hit

    cached = dspy.LM(PRICED, **settings(server, cache=True))
    with dspy.context(lm=cached):
        program(question=f"{question} again")
        program(question=f"{question} again")
    billed_call, cache_hit = cached.history
    assert cache_hit["cost"] == billed_call["cost"] > 0 and not cache_hit["usage"]  # what the workers rely on
    assert billed(cached) == billed_call["cost"]


def test_no_cost_is_shown_for_an_lm_that_reports_none(server: OpenAIServer, lm_pool: Pool) -> None:
    lm_pool.configure_lm("demo")
    try:
        run = lm_pool.run_stream(dspy.Predict("question -> answer"), question="Is it free?")
        run.result(60)
    finally:
        lm_pool.configure_lm(MODEL, **settings(server))
    summary = StreamText(run).summary()
    assert run.cost is None and "tokens in" in summary and "$" not in summary


def get_weather(city: str) -> str:
    """Get the weather for a city."""
    return f"The weather in {city} is sunny."


def test_native_function_calls_come_back_as_in_the_kernel(server: OpenAIServer, lm_pool: Pool) -> None:
    # DSPy's tools page: ChatAdapter(use_native_function_calling=True), the LM's tool_calls read as dspy.ToolCalls
    class ToolSignature(dspy.Signature):
        """Answer using tools."""

        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        outputs: dspy.ToolCalls = dspy.OutputField()

    predict, tools = dspy.Predict(ToolSignature), [dspy.Tool(get_weather)]
    native = dspy.ChatAdapter(use_native_function_calling=True)  # for a model DSPy knows to call functions
    with dspy.context(lm=dspy.LM(PRICED, **settings(server)), adapter=native):
        expected = predict(question="Weather in Paris?", tools=tools)
        ran = lm_pool.run(predict, question="Weather in Paris?", tools=tools)
        streamed = lm_pool.run_stream(predict, question="Weather in Paris?", tools=tools).result(60)
    assert [call.name for call in expected.outputs.tool_calls] == ["get_weather"]
    assert ran == streamed == expected and isinstance(ran.outputs, dspy.ToolCalls)
    assert ran.outputs.tool_calls[0].execute() == expected.outputs.tool_calls[0].execute()


def test_a_reply_the_chat_adapter_cannot_parse_falls_back_to_json_as_in_the_kernel(server: OpenAIServer,
                                                                                     lm_pool: Pool) -> None:
    # DSPy's ChatAdapter asks again with JSONAdapter; a streamed call does not (its stream showed the reply), and
    # run_stream streamed the program: its answer was the AdapterParseError that qa(...) never raises
    qa, question = dspy.Predict("question -> answer"), "untidy [garbled]"
    lm = dspy.LM(MODEL, **settings(server))
    with dspy.context(lm=lm):
        expected = qa(question=question)
        ran = lm_pool.run(qa, question=question)
        streamed = lm_pool.run_stream(qa, question=question).result(60)
    assert expected.answer.startswith("Demo LM answer to 'untidy [garbled]'")
    assert ran == streamed == expected
    outputs = [entry["outputs"] for entry in lm.history]
    assert outputs[2:4] == outputs[4:] == outputs[:2]  # each: the reply it could not parse, then the JSON one


def test_lm_settings_and_errors_give_the_kernels_result(server: OpenAIServer, lm_pool: Pool) -> None:
    # n completions, logprobs, a rollout_id, a reply cut at max_tokens; an LM's 401 (its key masked) and 400
    qa = dspy.Predict("question -> answer")
    cases = [({"n": 3, "temperature": 1.0}, "three?", {}), ({"logprobs": True}, "sure?", {}),
             ({"temperature": 1.0}, "rollout?", {"config": {"rollout_id": 7}}), ({"max_tokens": 9}, "cut [length]", {})]
    for options, question, extra in cases:
        lm = dspy.LM(MODEL, **settings(server, **options))
        with dspy.context(lm=lm):
            expected = qa(question=question, **extra)
            for got in lm_pool.run(qa, question=question, **extra), \
                    lm_pool.run_stream(qa, question=question, **extra).result(60):
                assert got == expected and got.completions.answer == expected.completions.answer, options
                assert got.get("logprobs") == expected.get("logprobs"), options
        kernel, *pool = ({k: v for k, v in entry.items() if k not in ("timestamp", "uuid", "response")}
                         for entry in lm.history)
        assert pool == [kernel, kernel], options
    for question, error in ("bad key [401]", dspy.LMAuthError), ("too long [400ctx]", dspy.ContextWindowExceededError):
        with dspy.context(lm=dspy.LM(MODEL, **settings(server))):
            with pytest.raises(error) as in_kernel:
                qa(question=question)
            with pytest.raises(error) as on_pool:
                lm_pool.run(qa, question=question)
        assert str(on_pool.value) == str(in_kernel.value).replace("sk-test", "***")
        assert ("sk-test" in str(in_kernel.value)) == (error is dspy.LMAuthError)
        assert "sk-test" not in str(on_pool.value)


# a 1x1 PNG: an image without Pillow
PNG = ("data:image/png;base64,"
       "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


class Describe(dspy.Signature):
    image: dspy.Image = dspy.InputField()
    caption: str = dspy.OutputField()


def test_an_image_reaches_the_lm_as_in_the_kernel(server: OpenAIServer, lm_pool: Pool) -> None:
    describe, lm = dspy.Predict(Describe), dspy.LM(MODEL, **settings(server))
    with dspy.context(lm=lm):
        expected = describe(image=dspy.Image(PNG))
        assert lm_pool.run(describe, image=dspy.Image(PNG)) == expected
    kernel, pool = lm.history
    assert pool["messages"] == kernel["messages"] and kernel["messages"][1]["content"][1]["image_url"]["url"] == PNG


def test_a_raw_pil_image_is_refused_saying_to_wrap_it_as_a_dspy_image(server: OpenAIServer, lm_pool: Pool) -> None:
    # DSPy (in the kernel too) reads a PIL image as an image only in a dspy.Image: given one raw, it sends its repr
    image = pytest.importorskip("PIL.Image", reason="Pillow is not installed").new("RGB", (2, 2), (255, 0, 0))
    describe, lm = dspy.Predict(Describe), dspy.LM(MODEL, **settings(server))
    with pytest.raises(ArgumentError, match=r"inputs\['image'\] is a PIL.*; wrap it as dspy\.Image\(value\)"):
        lm_pool.run(describe, image=image)
    with dspy.context(lm=lm):
        expected = describe(image=dspy.Image(image))
        assert lm_pool.run(describe, image=dspy.Image(image)) == expected
    kernel, pool = lm.history
    assert pool["messages"] == kernel["messages"]  # the same PNG bytes, byte for byte
