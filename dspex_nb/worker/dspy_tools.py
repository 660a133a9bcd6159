"""DSPy tools: configure the LM, predict / chain_of_thought on a signature, batch_inference.

Each request runs under ``dspy.context(lm=...)`` (thread-safe), never ``dspy.configure``.
Streamed calls go through ``dspy.streamify`` with new listeners per request, so tokens
of each output field arrive as ``token`` chunks: {"field", "text", "last"}.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Generator
from concurrent import futures
from typing import Any

import dspy
from dspy.streaming import StatusMessage, StreamListener, StreamResponse

from dspex_nb.errors import ArgumentError
from dspex_nb.worker.demo_lm import make_demo_lm
from dspex_nb.worker.state import WorkerState
from dspex_nb.worker.tools import Emit, ToolContext, tool

_lm_lock = threading.Lock()
MODULES = {"predict": dspy.Predict, "chain_of_thought": dspy.ChainOfThought}


def set_lm(state: WorkerState, model: str, kwargs: dict[str, Any]) -> None:
    """Build the LM (``"demo"`` is the embedded demo LM; anything else goes to dspy.LM)."""
    if model == "demo":
        lm, engine = make_demo_lm(**kwargs)
    else:
        lm, engine = dspy.LM(model, **kwargs), None
    with _lm_lock:
        state.lm, state.lm_model, state.lm_kwargs, state.demo_engine = lm, model, kwargs, engine


@tool
def configure_lm(ctx: ToolContext, model: str, kwargs: dict | None = None) -> dict[str, Any]:
    """Switch this worker's LM: ``model`` is "demo" or a dspy.LM model string (keys from the environment)."""
    kwargs = kwargs or {}
    try:
        set_lm(ctx.worker, model, kwargs)
    except TypeError as exc:
        raise ArgumentError("configure_lm", "ArgumentError", f"bad LM settings for {model!r}: {exc}") from None
    return {"model": model, "kwargs": kwargs}


def _signature(tool_name: str, signature: str) -> type[dspy.Signature]:
    try:
        return dspy.ensure_signature(signature)
    except Exception as exc:
        raise ArgumentError(tool_name, "ArgumentError",
                            f"argument 'signature': {signature!r} is not a valid DSPy signature "
                            f"(expected 'inputs -> outputs', e.g. 'question -> answer'): {exc}") from None


def _check_inputs(tool_name: str, sig: type[dspy.Signature], inputs: Any, where: str) -> dict[str, Any]:
    """The inputs as a dict of the signature's input fields; a bare string fills a single input field."""
    names = list(sig.input_fields)
    if isinstance(inputs, str) and len(names) == 1:
        return {names[0]: inputs}
    if not isinstance(inputs, dict):
        raise ArgumentError(tool_name, "ArgumentError",
                            f"{where} must be a dict of the input fields {names}, got {type(inputs).__name__}")
    missing = [n for n in names if n not in inputs]
    unexpected = [n for n in inputs if n not in names]
    if missing or unexpected:
        raise ArgumentError(tool_name, "ArgumentError",
                            f"{where} must have exactly the input fields {names}"
                            + (f"; missing {missing}" if missing else "")
                            + (f"; unexpected {unexpected}" if unexpected else ""))
    return inputs


def _jsonable(value: Any) -> Any:
    """A prediction field as JSON: pydantic models are dumped; other objects become their repr."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        dump = getattr(value, "model_dump", None)
        return dump(mode="json") if dump else repr(value)


def prediction_dict(prediction: dspy.Prediction) -> dict[str, Any]:
    return {name: _jsonable(value) for name, value in prediction.items()}


def _run(tool_name: str, module: str, signature: str, inputs: Any,
         ctx: ToolContext) -> Generator[Emit, None, dict[str, Any]]:
    sig = _signature(tool_name, signature)
    inputs = _check_inputs(tool_name, sig, inputs, "argument 'inputs'")
    program = MODULES[module](sig)
    lm = ctx.worker.lm
    if not ctx.streaming:
        with dspy.context(lm=lm):
            return prediction_dict(program(**inputs))
    fields = (["reasoning"] if module == "chain_of_thought" else []) + [
        name for name, f in sig.output_fields.items() if f.annotation is str]
    streamed = dspy.streamify(program, stream_listeners=[StreamListener(signature_field_name=n) for n in fields],
                              async_streaming=False)
    final: dict[str, Any] = {}
    with dspy.context(lm=lm):
        stream = streamed(**inputs)
        try:
            for value in stream:
                if isinstance(value, StreamResponse):
                    yield Emit("token", {"field": value.signature_field_name, "text": value.chunk,
                                         "last": value.is_last_chunk})
                elif isinstance(value, StatusMessage):
                    yield Emit("status", {"message": value.message})
                elif isinstance(value, dspy.Prediction):
                    final = prediction_dict(value)
        finally:
            stream.close()
    return final


@tool
def predict(ctx: ToolContext, signature: str, inputs: dict | str) -> Generator[Emit, None, dict[str, Any]]:
    """Run dspy.Predict(signature) on ``inputs``; streamed calls stream the tokens of each str output field."""
    return (yield from _run("predict", "predict", signature, inputs, ctx))


@tool
def chain_of_thought(ctx: ToolContext, signature: str,
                     inputs: dict | str) -> Generator[Emit, None, dict[str, Any]]:
    """Run dspy.ChainOfThought(signature); streamed calls stream reasoning and each str output field."""
    return (yield from _run("chain_of_thought", "chain_of_thought", signature, inputs, ctx))


@tool
def batch_inference(ctx: ToolContext, signature: str, batch_items: list, module: str = "predict",
                    concurrency: int = 4, index_offset: int = 0) -> Generator[Emit, None, dict[str, Any]]:
    """Run ``module`` on every item, ``concurrency`` at a time; one item chunk per item as it completes.

    Item chunks are {"index", "ok", "result"} or {"index", "ok": false, "error"}; ``index`` is the
    item's position plus ``index_offset`` (for a batch split over several workers).
    """
    if module not in MODULES:
        raise ArgumentError("batch_inference", "ArgumentError",
                            f"argument 'module' must be one of {sorted(MODULES)}, got {module!r}")
    if concurrency < 1:
        raise ArgumentError("batch_inference", "ArgumentError",
                            f"argument 'concurrency' must be >= 1, got {concurrency}")
    sig = _signature("batch_inference", signature)
    items = [_check_inputs("batch_inference", sig, item, f"batch_items[{i}]") for i, item in enumerate(batch_items)]
    program_class, lm = MODULES[module], ctx.worker.lm

    def run_one(inputs: dict[str, Any]) -> dict[str, Any]:
        with dspy.context(lm=lm):
            return prediction_dict(program_class(sig)(**inputs))

    results: list[dict[str, Any] | None] = [None] * len(items)
    with futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="item") as pool:
        pending = {pool.submit(run_one, inputs): i for i, inputs in enumerate(items)}
        try:
            while pending:
                done, _ = futures.wait(pending, timeout=0.2, return_when=futures.FIRST_COMPLETED)
                if ctx.cancelled.is_set():
                    break
                for fut in done:
                    i = pending.pop(fut)
                    try:
                        data = {"index": i + index_offset, "ok": True, "result": fut.result()}
                    except Exception as exc:
                        data = {"index": i + index_offset, "ok": False,
                                "error": {"type": type(exc).__name__, "message": str(exc)}}
                    results[i] = data
                    yield Emit("item", data)
        finally:
            for fut in pending:
                fut.cancel()
    ok = sum(1 for r in results if r and r["ok"])
    return {"results": results, "ok": ok, "failed": len(items) - ok}
