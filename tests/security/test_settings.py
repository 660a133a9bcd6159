"""Every setting is checked when it is given, with a message that names it and its range."""

from __future__ import annotations

import re
from fractions import Fraction
from types import MappingProxyType

import numpy as np
import pytest

from dspex_nb import Pool
from dspex_nb.errors import ArgumentError, QueueTimeout
from dspex_nb.pool.pool import MAX_LOCAL_WORKERS


@pytest.mark.parametrize("setting, value, message", [
    ("workers", 0, f"workers=...) must be an int from 1 to {MAX_LOCAL_WORKERS}"),
    ("workers", 10**6, f"workers=...) must be an int from 1 to {MAX_LOCAL_WORKERS}, got 1000000"),
    ("health_interval", -1, "health_interval=...) must be a finite number >= 0.05 (seconds)"),
    ("health_interval", 1e-6, "health_interval=...) must be a finite number >= 0.05 (seconds), got 1e-06"),
    ("ping_timeout", 1e-4, "ping_timeout=...) must be a finite number >= 0.1 (seconds), got 0.0001"),
    ("max_in_flight", 0, "max_in_flight=...) must be an int >= 1"),
    ("concurrency", 0, "concurrency=...) must be an int from 1 to 1024"),
    ("concurrency", 10**6, "concurrency=...) must be an int from 1 to 1024, got 1000000"),
    ("queue_timeout", float("nan"), "queue_timeout=...) must be a finite number > 0"),
    ("max_message_mb", 4096, "max_message_mb=...) must be an int from 1 to 2047"),
    ("lm_kwargs", "x", "lm_kwargs=...) must be None or a dict with str keys"),
    ("lm_kwargs", {"temperature": float("nan")}, "lm_kwargs['temperature']=...) must be a finite number >= 0"),
    ("lm_kwargs", {"max_tokens": 0}, "lm_kwargs['max_tokens']=...) must be an int >= 1, got 0"),
    ("lm_kwargs", {"temperature": np.float64("nan")}, "lm_kwargs['temperature']=...) must be a finite number >= 0"),
    ("lm_kwargs", {"temperature": np.float32("inf")}, "lm_kwargs['temperature']=...) must be a finite number >= 0"),
    ("lm_kwargs", {"top_p": np.float32("nan")}, "lm_kwargs['top_p']=...) must be a finite number, got np.float32(nan)"),
    ("env", {"A": 1}, "env=...) must be None or a dict[str, str]"),
    ("rate_limit", 0, "rate_limit=...) must be a finite number > 0"),
    ("max_memory_mb", -5, "max_memory_mb=...) must be a finite number > 0"),
    ("ttl", float("inf"), "ttl=...) must be a finite number > 0"),
    ("start", "fork", "start=...) must be one of ('spawn', 'template')"),
    ("journal", "", "journal=...) must be a file's path, not empty and without a NUL character, got ''"),
    ("journal", "j\0.db", "journal=...) must be a file's path, not empty and without a NUL character"),
])
def test_bad_pool_settings_are_named(setting: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        Pool(**{setting: value})


@pytest.mark.parametrize("knobs, message", [
    ({"per_token": -1}, "lm_kwargs['per_token']=...) must be a finite number >= 0 (seconds), got -1"),
    ({"ttft": float("inf")}, "lm_kwargs['ttft']=...) must be a finite number >= 0 (seconds), got inf"),
    ({"answer_tokens": 0}, "lm_kwargs['answer_tokens']=...) must be an int >= 1, got 0"),
])
def test_bad_demo_lm_knobs_are_named(knobs: dict, message: str) -> None:
    # was: accepted, then every call failed with "[demo/demo] sleep length must be non-negative" (or gave an answer
    # of one token), which names no setting
    with pytest.raises(ValueError, match=re.escape(f"Pool({message}")):
        Pool(lm="demo", lm_kwargs=knobs)


@pytest.mark.parametrize("setting, refusal", [
    ("api_key", "is a connection's: the demo LM answers offline on each worker"),
    ("base_url", "is a connection's"),
    ("cache", "is one the demo LM sets itself"),
])
def test_a_setting_the_demo_lm_cannot_take_is_refused_where_it_is_given(pool: Pool, setting: str,
                                                                         refusal: str) -> None:
    # was: Pool(lm="demo", lm_kwargs={"api_key": ...}) started no worker, with DSPy's ValueError traceback ("['api_key']
    # configure a connection DSPy owns..."), and a cache=True a TypeError ("got multiple values")
    secret = "sk-live-0123456789abcdef"
    with pytest.raises(ValueError, match=re.escape(f"Pool(lm_kwargs[{setting!r}]=...) {refusal}")) as caught:
        Pool(lm="demo", lm_kwargs={setting: secret})
    with pytest.raises(ValueError, match=re.escape(f"configure_lm({setting}=...) {refusal}")) as refused:
        pool.configure_lm("demo", **{setting: secret})
    assert secret not in str(caught.value) + str(refused.value)
    assert pool.lm_kwargs == {}
    assert Pool(lm="demo", lm_kwargs={"api_key": None}).lm_kwargs == {"api_key": None}  # as dspy.LM takes it


def test_the_connection_settings_refused_for_the_demo_lm_are_dspys() -> None:
    from dspy.clients.backend_selection import CLIENT_KEYS

    from dspex_nb.pool.settings import CONNECTION_SETTINGS

    assert set(CLIENT_KEYS) <= CONNECTION_SETTINGS


@pytest.mark.parametrize("option, value", [("concurrency", 0), ("concurrency", 2000), ("item_timeout", -1.0),
                                           ("max_retries", -1), ("shard_size", 0)])
def test_bad_batch_settings_are_named(pool: Pool, option: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"batch\\({option}=...\\)"):
        pool.batch(["q"], "question -> answer", **{option: value})


def test_deep_nesting_and_lone_surrogates_get_clear_errors_or_results(pool: Pool) -> None:
    deep: list = []
    for _ in range(20_000):
        deep = [deep]
    with pytest.raises(ArgumentError, match="argument 'x' is not JSON-serialisable"):
        pool.execute("echo", {"x": deep})
    batch = pool.batch(["fine", "bad \ud800 surrogate"], "question -> answer", journal=True)
    batch.wait(60)
    assert batch.records[0]["ok"] and batch.records[1] is not None  # the item ran (or failed) on its own


def test_an_input_that_contains_itself_is_said_to(pool: Pool) -> None:
    # Was: "the inputs are nested too deeply to be sent to the workers (over 1000 levels)" for a node that links back
    # to its parent, which no one would take for nesting
    node: dict = {"name": "root"}
    node["children"] = [{"name": "leaf", "parent": node}]
    with pytest.raises(ArgumentError, match="or a value in it contains itself"):
        pool.run(lambda tree: tree["name"], tree=node)
    with pytest.raises(ArgumentError, match="items\\[0\\] is nested too deeply .*, or a value in it contains itself"):
        pool.map(lambda tree: tree["name"], [{"tree": node}])


@pytest.mark.parametrize("settings, message", [({"temperature": float("inf")}, "temperature=...) must be a finite"),
                                               ({"max_tokens": True}, "max_tokens=...) must be an int >= 1"),
                                               ({"per_token": -1}, "per_token=...) must be a finite number >= 0")])
def test_a_new_lm_setting_is_checked_before_any_worker_gets_it(pool: Pool, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"configure_lm({message}")):
        pool.configure_lm("demo", **settings)
    assert pool.lm_kwargs == {}  # the pool keeps the LM it had


NUMPY_SETTINGS = {"temperature": np.float32(0.5), "max_tokens": np.int64(100), "top_p": Fraction(9, 10),
                  "n": np.int8(1), "seed": 7, "logprobs": True}  # numbers dspy.LM takes, from NumPy or a Fraction
AS_PYTHON = {"temperature": 0.5, "max_tokens": 100, "top_p": 0.9, "n": 1, "seed": 7, "logprobs": True}


def test_numpy_and_other_real_lm_settings_are_their_python_numbers(pool: Pool) -> None:
    # was: "must be a finite number >= 0, got np.float32(0.5)" (and an int64 max_tokens refused), which dspy.LM takes
    assert Pool(lm_kwargs=NUMPY_SETTINGS).lm_kwargs == AS_PYTHON
    try:
        pool.configure_lm("demo", **NUMPY_SETTINGS)
        assert pool.lm_kwargs == AS_PYTHON
        for row in pool.status():
            kwargs = pool.describe(row["worker"])["lm"]["kwargs"]
            assert kwargs == AS_PYTHON and {k: type(v) for k, v in kwargs.items()} == {
                k: type(v) for k, v in AS_PYTHON.items()}
    finally:
        pool.configure_lm("demo")


def test_a_call_timeout_bounds_its_wait_in_the_queue() -> None:
    with Pool(workers=1, max_in_flight=1, queue_timeout=60, journal=False) as busy:
        run = busy.execute_stream("sleep", {"seconds": 30})
        try:
            with pytest.raises(QueueTimeout, match="no worker had room within 0.5 s"):  # not queue_timeout's 60
                busy.execute("echo", {"x": 1}, timeout=0.5)
        finally:
            run.cancel()


@pytest.mark.parametrize("setting, value", [
    ("env", {"OPENAI_API_KEY": "sk-live-0123456789abcdef", "PORT": 8080}),  # one value not a str
    ("lm_kwargs", {"api_key": "sk-live-0123456789abcdef", 1: "x"}),  # one key not a str
    ("lm_kwargs", {"extra_headers": {"Cookie": "sk-live-0123456789abcdef"}, 2: 2}),
    ("env", MappingProxyType({"HF_TOKEN": "sk-live-0123456789abcdef"})),  # not a dict (as os.environ is not)
    ("lm", {"model": "openai/gpt-4o-mini", "api_key": "sk-live-0123456789abcdef"}),  # an LM's settings, not its name
])
def test_a_refused_setting_is_quoted_without_its_secrets(setting: str, value: object) -> None:
    """The error quotes what it refuses, and a notebook shows (and saves) it: the keys in it are masked."""
    with pytest.raises(ValueError, match=f"{setting}=...") as caught:
        Pool(**{setting: value})
    assert "sk-live-0123456789abcdef" not in str(caught.value)
    assert "***" in str(caught.value)


def test_an_argument_of_the_wrong_type_is_quoted_without_its_secrets(pool: Pool) -> None:
    with pytest.raises(ArgumentError, match="argument 'kwargs' must be") as caught:
        pool.execute("configure_lm", {"model": "demo", "kwargs": [{"api_key": "sk-live-0123456789abcdef"}]})
    assert "sk-live-0123456789abcdef" not in str(caught.value)


def _calls_done(pool: Pool) -> int:
    return sum(row["done"] + row["errors"] for row in pool.status())


@pytest.mark.parametrize("option, value, message", [
    ("on_chunk", 5, "count(on_chunk=...) must be None or a function of a chunk, got 5"),
    ("keep_chunks", 0, "count(keep_chunks=...) must be an int >= 1, got 0"),
    ("keep_chunks", -1, "count(keep_chunks=...) must be an int >= 1, got -1"),
    ("keep_chunks", "5", "count(keep_chunks=...) must be an int >= 1, got '5'"),
    ("keep_chunks", 1.5, "count(keep_chunks=...) must be an int >= 1, got 1.5"),
])
def test_a_stream_option_that_would_fail_once_the_call_ran_is_refused_before_it_is_sent(
        pool: Pool, option: str, value: object, message: str) -> None:
    """They failed after the worker had run the call (its result lost) with a TypeError or an IndexError."""
    done = _calls_done(pool)
    with pytest.raises(ValueError, match=re.escape(message)):
        pool.execute_stream("count", {"n": 3}, **{option: value})
    assert _calls_done(pool) == done
    with pytest.raises(ValueError, match=re.escape("call(on_chunk=...) must be None or a function of a chunk")):
        pool.call(lambda question: question, {"question": "q"}, stream=True, on_chunk=5)
    assert pool.execute_stream("count", {"n": 3}, keep_chunks=1).result() == {"count": 3}


@pytest.mark.parametrize("args, message", [
    ({"x": {1: "a", "1": "b"}}, "argument 'x' has the key 1 (int): arguments travel as JSON, whose keys are str, so "
                                "it would arrive as '1'"),
    ({"x": [{"y": {None: 1}}]}, "argument 'x' (at x[0]['y']) has the key None (NoneType): arguments travel as JSON, "
                                "whose keys are str, so it would arrive as 'null'"),
    ({2: "b"}, "the arguments have the key 2 (int)"),
])
def test_a_key_json_would_turn_into_a_str_is_refused(pool: Pool, args: dict, message: str) -> None:
    """JSON writes an int or None key as a str: {1: "a", "1": "b"} arrived as {"1": "b"}, a value lost unsaid."""
    with pytest.raises(ArgumentError, match=re.escape(message)):
        pool.execute("echo", args)
    assert pool.execute("echo", {"x": {"1": "a", "y": [{"z": 1}]}}) == {"x": {"1": "a", "y": [{"z": 1}]}}
