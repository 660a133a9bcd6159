"""DSPy tools: configure the LM, predict / chain_of_thought on a signature, batch_inference.

Each request runs under ``dspy.context(lm=...)`` (thread-safe), never ``dspy.configure``.
Streamed calls go through ``dspy.streamify`` with new listeners per request, so tokens
of each output field arrive as ``token`` chunks: {"field", "text", "last"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import queue
import threading
from collections.abc import AsyncIterator, Callable, Generator
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from typing import Any

import dspy
from dspy.streaming import StatusMessage, StreamListener, StreamResponse
from dspy.utils.exceptions import LMRateLimitError

from dspex_nb.errors import ArgumentError, Cancelled
from dspex_nb.worker.demo_lm import make_demo_lm
from dspex_nb.worker.limits import backoff_delays
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


def output_dict(output: Any) -> dict[str, Any]:
    """A program's output as a JSON object: a Prediction's fields, a dict, or {"output": value}."""
    if isinstance(output, dspy.Prediction):
        return {name: _jsonable(value) for name, value in output.items()}
    if isinstance(output, dict):
        return {str(k): _jsonable(v) for k, v in output.items()}
    return {"output": _jsonable(output)}


def _listeners(program: Any) -> list[StreamListener]:
    """New listeners (they keep state) for every str output field of every predictor of ``program``."""
    if not isinstance(program, dspy.Module):
        return []
    return [StreamListener(signature_field_name=field, predict=predictor, predict_name=name, allow_reuse=True)
            for name, predictor in program.named_predictors()
            for field, info in predictor.signature.output_fields.items() if info.annotation is str]


def _async_items(make: Callable[[], AsyncIterator[Any]]) -> Generator[Any, None, None]:
    """Iterate an async generator from sync code, on an event loop in a thread of its own.

    Unlike ``streamify(async_streaming=False)``, closing this generator cancels the async task,
    which stops the program and its LM stream instead of letting them run to the end unseen.
    """
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()
    end = object()

    async def forward() -> None:
        try:
            async for value in make():
                items.put(value)
        except Exception as exc:
            items.put(_Failure(exc))
        finally:
            items.put(end)

    loop = asyncio.new_event_loop()
    task = loop.create_task(forward())

    def run() -> None:
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        finally:
            loop.close()

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), name="dspy-stream", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not end:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to cancel
                loop.call_soon_threadsafe(task.cancel)
        thread.join()


@dataclass
class _Failure:
    error: Exception


def _call(program: Any, inputs: dict[str, Any], ctx: ToolContext) -> Generator[Emit, None, dict[str, Any]]:
    """Run ``program`` on ``inputs`` under the worker's LM; streamed calls yield token chunks."""
    settings = ctx.worker.dspy_settings()
    listeners = _listeners(program) if ctx.streaming else []
    if not listeners:
        with dspy.context(**settings):
            return output_dict(program(**inputs))
    streamed = dspy.streamify(program, stream_listeners=listeners)
    final: dict[str, Any] = {}
    with dspy.context(**settings):
        for value in _async_items(lambda: streamed(**inputs)):
            if isinstance(value, StreamResponse):
                yield Emit("token", {"field": value.signature_field_name, "text": value.chunk,
                                     "last": value.is_last_chunk, "predictor": value.predict_name})
            elif isinstance(value, StatusMessage):
                yield Emit("status", {"message": value.message})
            elif isinstance(value, dspy.Prediction):
                final = output_dict(value)
    return final


def _builtin(tool_name: str, module: str, signature: str, inputs: Any) -> tuple[dspy.Module, dict[str, Any]]:
    sig = _signature(tool_name, signature)
    return MODULES[module](sig), _check_inputs(tool_name, sig, inputs, "argument 'inputs'")


@tool
def predict(ctx: ToolContext, signature: str, inputs: dict | str) -> Generator[Emit, None, dict[str, Any]]:
    """Run dspy.Predict(signature) on ``inputs``; streamed calls stream the tokens of each str output field."""
    return (yield from _call(*_builtin("predict", "predict", signature, inputs), ctx))


@tool
def chain_of_thought(ctx: ToolContext, signature: str,
                     inputs: dict | str) -> Generator[Emit, None, dict[str, Any]]:
    """Run dspy.ChainOfThought(signature); streamed calls stream reasoning and each str output field."""
    return (yield from _call(*_builtin("chain_of_thought", "chain_of_thought", signature, inputs), ctx))


@dataclass
class DefinedModule:
    name: str
    factory: Callable[[], Any]
    params: list[inspect.Parameter]

    def check(self, tool_name: str, inputs: Any, where: str) -> dict[str, Any]:
        names = [p.name for p in self.params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if isinstance(inputs, str) and len(names) == 1:
            return {names[0]: inputs}
        if not isinstance(inputs, dict):
            raise ArgumentError(tool_name, "ArgumentError",
                                f"{where} must be a dict of {self.name}'s inputs {names}, got {type(inputs).__name__}")
        missing = [p.name for p in self.params if p.name not in inputs and p.default is p.empty
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if missing:
            raise ArgumentError(tool_name, "ArgumentError", f"{where} lacks {self.name}'s input(s) {missing}")
        return inputs


@tool
def define(ctx: ToolContext, name: str, source: str) -> dict[str, Any]:
    """Run ``source`` (Python; ``dspy`` is imported) and keep its ``name``: a dspy.Module subclass or instance,
    or a function, as a module that ``run_module`` and ``batch_inference(module=name)`` can run."""
    if not name.isidentifier():
        raise ArgumentError("define", "ArgumentError", f"argument 'name' must be a Python identifier, got {name!r}")
    try:
        code = compile(source, f"<dspex define {name}>", "exec")
    except SyntaxError as exc:
        raise ArgumentError("define", "ArgumentError", f"the source of {name!r} has a syntax error: {exc}") from None
    namespace: dict[str, Any] = {"dspy": dspy, "__name__": f"dspex_defined_{name}"}
    exec(code, namespace)
    if name not in namespace:
        defined = sorted(k for k in namespace if not k.startswith("__") and k != "dspy")
        raise ArgumentError("define", "ArgumentError", f"the source defines no {name!r} (it defines {defined})")
    obj = namespace[name]
    if isinstance(obj, type) and issubclass(obj, dspy.Module):
        factory, kind, call = obj, "module class", obj.forward
    elif isinstance(obj, dspy.Module):
        factory, kind, call = (lambda: obj), "module instance", type(obj).forward
    elif callable(obj):
        factory, kind, call = (lambda: obj), "function", obj
    else:
        raise ArgumentError("define", "ArgumentError",
                            f"{name!r} must be a dspy.Module subclass or instance, or a function; "
                            f"got {type(obj).__name__}")
    params = [p for p in inspect.signature(call).parameters.values() if p.name != "self"]
    ctx.worker.modules[name] = DefinedModule(name, factory, params)
    return {"name": name, "kind": kind, "inputs": [p.name for p in params]}


def _defined(ctx: ToolContext, tool_name: str, name: str) -> DefinedModule:
    try:
        return ctx.worker.modules[name]
    except KeyError:
        known = sorted(ctx.worker.modules) or "none yet; define one with %%dspex define or pool.define"
        raise ArgumentError(tool_name, "ArgumentError", f"no module named {name!r} on this worker "
                            f"(defined: {known})") from None


@tool
def run_module(ctx: ToolContext, name: str, inputs: dict | str) -> Generator[Emit, None, dict[str, Any]]:
    """Run a module kept by ``define`` (or, given a handle from ``load_module``, that very instance) on
    ``inputs``; streamed calls stream the tokens of its predictors."""
    if name.startswith("h:"):
        defined, program = ctx.resolve("run_module", name)
    else:
        defined = _defined(ctx, "run_module", name)
        program = defined.factory()
    inputs = defined.check("run_module", inputs, "argument 'inputs'")
    return (yield from _call(program, inputs, ctx))


@tool
def load_module(ctx: ToolContext, name: str) -> dict[str, str]:
    """Make an instance of a defined module and keep it in the session (e.g. to compile or tune it and
    run that same instance later); returns its handle, which ``run_module`` takes as ``name``."""
    defined = _defined(ctx, "load_module", name)
    return {"handle": ctx.keep("load_module", (defined, defined.factory()))}


@tool
def batch_inference(ctx: ToolContext, batch_items: list, signature: str = "", module: str = "predict",
                    concurrency: int = 4) -> Generator[Emit, None, dict[str, Any]]:
    """Run ``module`` (predict, chain_of_thought on ``signature``, or a defined module) on every item,
    ``concurrency`` at a time; one item chunk per item as it completes.

    Item chunks are {"index", "ok", "result", "worker"} or {"index", "ok": false, "error", "worker"}.
    """
    if concurrency < 1:
        raise ArgumentError("batch_inference", "ArgumentError",
                            f"argument 'concurrency' must be >= 1, got {concurrency}")
    where = [f"batch_items[{i}]" for i in range(len(batch_items))]
    if module in MODULES:
        if not signature:
            raise ArgumentError("batch_inference", "ArgumentError",
                                f"argument 'signature' is required with module {module!r}")
        sig = _signature("batch_inference", signature)
        items = [_check_inputs("batch_inference", sig, item, w) for item, w in zip(batch_items, where, strict=True)]
        make = partial(MODULES[module], sig)
    else:
        defined = _defined(ctx, "batch_inference", module)
        items = [defined.check("batch_inference", item, w) for item, w in zip(batch_items, where, strict=True)]
        make = defined.factory
    settings, worker = ctx.worker.dspy_settings(), ctx.worker.worker_id

    def run_one(inputs: dict[str, Any]) -> dict[str, Any]:
        """One item; an LM rate limit (HTTP 429) is waited out with exponential backoff, not failed."""
        delays = backoff_delays()
        with dspy.context(**settings):
            while not ctx.cancelled.is_set():  # a cancelled batch starts no further LM calls
                try:
                    return output_dict(make()(**inputs))
                except LMRateLimitError:
                    delay = next(delays, None)
                    if delay is None or ctx.wait(delay):
                        raise
                    ctx.worker.count("rate_limit_retries")
        raise Cancelled("the batch was cancelled before this item started")

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
                        data = {"index": i, "ok": True, "result": fut.result(), "worker": worker}
                    except Exception as exc:
                        data = {"index": i, "ok": False, "worker": worker,
                                "error": {"type": type(exc).__name__, "message": str(exc)}}
                    results[i] = data
                    yield Emit("item", data)
        finally:
            for fut in pending:
                fut.cancel()
    ok = sum(1 for r in results if r and r["ok"])
    return {"results": results, "ok": ok, "failed": len(items) - ok}
