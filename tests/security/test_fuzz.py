"""Property-based fuzzing of the public API, the magic argument parser and the gRPC servicer: every input
gets a result or a clear error, and the worker and the kernel stay alive."""

from __future__ import annotations

import json
import shlex
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

from dspex_nb import Pool
from dspex_nb._proto import bridge_pb2
from dspex_nb.errors import DspexError
from dspex_nb.magics import PARSERS
from dspex_nb.pool.calls import decode_chunks
from dspex_nb.worker import dspy_tools, tools  # noqa: F401  (registers the tools)
from dspex_nb.worker.server import Bridge
from dspex_nb.worker.state import WorkerState

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=20)
any_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                          max_leaves=10)


@FUZZ
@given(args=st.dictionaries(st.text(min_size=1), json_values, max_size=5))
def test_echo_returns_any_json_it_is_given(pool: Pool, args: dict[str, Any]) -> None:
    assert pool.execute("echo", args) == json.loads(json.dumps(args))


@FUZZ
@given(tool=st.sampled_from(["predict", "run_module", "batch_inference", "define", "sleep", "session_get", "nope",
                             "count", "configure_lm"]),
       args=st.dictionaries(st.sampled_from(["signature", "inputs", "name", "source", "seconds", "handle", "n",
                                             "batch_items", "module", "model", "x"]), any_values, max_size=4))
def test_any_call_gets_a_result_or_a_clear_error(pool: Pool, tool: str, args: dict[str, Any]) -> None:
    if tool == "sleep" and isinstance(args.get("seconds"), (int, float)):
        args["seconds"] = min(abs(args["seconds"]), 0.01)  # a valid sleep: short
    if tool == "count" and isinstance(args.get("n"), int):
        args["n"] = min(abs(args["n"]), 10)
    if tool == "configure_lm":
        args["model"] = "demo"  # only the demo LM is offline
    try:
        pool.execute(tool, args, timeout=60)
    except (DspexError, ValueError) as exc:
        assert str(exc)  # a message, naming what was wrong
    assert pool.execute("echo", {"alive": 1}) == {"alive": 1}


@FUZZ
@given(command=st.sampled_from(sorted(PARSERS)), words=st.lists(st.text(max_size=12), max_size=5))
def test_the_magic_parser_accepts_or_says_why(command: str, words: list[str]) -> None:
    try:
        argv = shlex.split(" ".join(shlex.quote(w) for w in words))
        PARSERS[command].parse_args(argv)
    except UsageError as exc:
        assert str(exc)


class _Context:
    """What the servicer asks of a gRPC context, for calling it in-process."""

    def add_callback(self, callback: Any) -> bool:
        return True

    def is_active(self) -> bool:
        return True


@FUZZ
@given(tool=st.text(max_size=20) | st.sampled_from(["echo", "predict", "define", "batch_inference", "fail"]),
       payload=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_the_servicer_answers_random_bytes_with_an_error(tool: str, payload: bytes) -> None:
    bridge = Bridge(WorkerState(worker_id="fuzz", run_id="0" * 12, max_message_bytes=2**20))
    request = bridge_pb2.ExecuteRequest(tool=tool, args_json=payload)
    reply = bridge.Execute(request, _Context())
    assert reply.HasField("error") or json.loads(reply.result_json) is not None or reply.result_json == b"null"
    chunks = [c for batch in bridge.ExecuteStream(request, _Context()) for c in decode_chunks(batch.chunks_json)]
    assert chunks and chunks[-1].is_final


@FUZZ
@given(payload=st.binary(max_size=300))
def test_a_worker_survives_raw_garbage_on_its_socket(pool: Pool, payload: bytes) -> None:
    worker = pool.workers[0]
    raw = worker.conn.channel.unary_unary("/dspex.v1.Bridge/Execute")  # bytes in, bytes out: no (de)serializer
    try:
        raw(payload, timeout=10)
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN)
    assert pool.execute("echo", {"alive": 1}, worker=worker.id) == {"alive": 1}


@pytest.fixture(autouse=True)
def _demo_lm_after(pool: Pool) -> Any:
    yield
    pool.configure_lm("demo")
