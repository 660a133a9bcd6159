"""DSPy tools: configure the LM, predict / chain_of_thought on a signature, batch_inference.

Each request runs under ``dspy.context(lm=...)`` (thread-safe), never ``dspy.configure``.
Streamed calls go through ``dspy.streamify`` with new listeners per request, so tokens
of each output field arrive as ``token`` chunks: {"field", "text", "last"}.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import inspect
import json
import pickle
import queue
import sys
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import cloudpickle
import dspy
from dspy.streaming import StatusMessage, StreamListener, StreamResponse
from dspy.streaming.messages import StatusStreamingCallback
from dspy.streaming.streaming_listener import ADAPTER_SUPPORT_STREAMING
from dspy.utils.usage_tracker import UsageTracker

from dspex_nb import redact, typed
from dspex_nb.errors import ArgumentError, Cancelled
from dspex_nb.wire import CACHE, ENV, LM_STALE, LM_VERSION, definition_version, dumps
from dspex_nb.worker import programs
from dspex_nb.worker.calls import MESSAGE_OVERHEAD, error_info, message_of
from dspex_nb.worker.demo_lm import make_demo_lm
from dspex_nb.worker.limits import StopWhenCancelled
from dspex_nb.worker.output import CALL_OUTPUT
from dspex_nb.worker.state import WorkerState
from dspex_nb.worker.tools import CancelEvent, Emit, ToolContext, tool

_lm_lock = threading.Lock()
DEMO_RETRIES = 8  # dspy.LM's num_retries for the demo LM (a real LM gets dspy.LM's default, or its own setting)
MODULES = {"predict": dspy.Predict, "chain_of_thought": dspy.ChainOfThought}


def set_lm(state: WorkerState, model: str, kwargs: dict[str, Any]) -> None:
    """Build the LM (``"demo"`` is the embedded demo LM; anything else goes to dspy.LM)."""
    if model == "demo":  # retried by dspy.LM itself, as a real LM is (num_retries, honouring retry_after)
        lm, engine = make_demo_lm(**{"num_retries": DEMO_RETRIES, **kwargs})
    else:
        lm, engine = dspy.LM(model, **kwargs), None
    redact.register(kwargs)  # errors quoting the key (a provider's 401 message) are masked
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


@functools.lru_cache(maxsize=256)
def _parsed(signature: str) -> type[dspy.Signature]:
    """A signature string as DSPy parses it, once per string: parsing makes a pydantic model (a millisecond or
    two), and a magic's or a batch's calls send the same string again and again."""
    return dspy.ensure_signature(signature)


def _signature(tool_name: str, signature: str) -> type[dspy.Signature]:
    try:
        return _parsed(signature)
    except Exception as exc:
        raise ArgumentError(tool_name, "ArgumentError",
                            f"argument 'signature': {signature!r} is not a valid DSPy signature "
                            f"(expected 'inputs -> outputs', e.g. 'question -> answer'): {exc}") from None


def _check_inputs(tool_name: str, sig: type[dspy.Signature], inputs: Any, where: str,
                  resolver: typed.Resolver | None = None) -> dict[str, Any]:
    """The inputs (typed JSON) as a dict with the signature's input fields; a bare string fills a single one. Other
    keys stay, as a call in the kernel passes them: DSPy logs that it ignores them (a DataFrame's label column)."""
    inputs = _decode(tool_name, inputs, where, resolver)
    names = list(sig.input_fields)
    if isinstance(inputs, str) and len(names) == 1:
        return {names[0]: inputs}
    if not isinstance(inputs, dict):
        raise ArgumentError(tool_name, "ArgumentError",
                            f"{where} must be a dict of the input fields {names}, got {type(inputs).__name__}")
    missing = [n for n in names if n not in inputs]
    if missing:
        unexpected = [n for n in inputs if n not in names]
        raise ArgumentError(tool_name, "ArgumentError", f"{where} must have the input fields {names}; missing "
                            f"{missing}" + (f"; it has {unexpected}, which are not input fields" if unexpected else ""))
    return inputs


def output_json(output: Any, usage: dict[str, Any] | None = None, cost: float | None = None,
                cached: tuple[int, int] = (0, 0)) -> Any:
    """A program's output as typed JSON: a Prediction as its fields (and its own LM usage, ``typed.LM_USAGE``,
    where DSPy set one), anything else wrapped as an output; with the call's LM usage (``typed.USAGE``) where it
    made LM calls, their cost (``typed.COST``) where an LM reported one, and (``typed.CACHED``) how many of
    them DSPy answered from its cache, where any."""
    if type(output) is dspy.Prediction and typed.TAG not in output and not any(k in output for k in typed.RESERVED):
        encoded = _encoded(output)  # its fields at the top, and its completions where they are not just
        result = dict(encoded["fields"])  # those fields (an LM's one answer: the common case, said by no key)
        completions = encoded.get("completions")
        if completions != typed.ONE_COMPLETION:
            result[typed.COMPLETIONS] = completions  # None: a Prediction made without an LM has none
        if "signature" in encoded:
            result[typed.SIGNATURE] = encoded["signature"]
        if "usage" in encoded:
            result[typed.LM_USAGE] = encoded["usage"]
    else:  # a subclass, or fields that would read as ours, stay inside
        result = {typed.TAG: "output", "value": _encoded(output)}
    if usage:
        result[typed.USAGE] = usage
    if cost is not None:
        result[typed.COST] = cost
    if cached[0]:
        result[typed.CACHED] = list(cached)
    return result


def _encoded(output: Any) -> Any:
    """``typed.encode(output)``; ``NotPortable`` for an output that contains itself or is nested deeper than
    Python recurses, which a RecursionError would have blamed on the program."""
    try:
        return typed.encode(output)
    except RecursionError:
        raise typed.NotPortable(f"the program's output contains itself, or is nested over {sys.getrecursionlimit()} "
                                "levels deep, so it cannot be sent back: return a value without such nesting") from None


MAX_HISTORY = 100  # the newest LM history entries a call brings back to the kernel (its dspy.inspect_history)
RECENT_ENTRIES = 64  # the newest entries of an LM's history in which a call's entry is looked for
HISTORY_FRAME = 1024  # bytes of a result's message kept for the history's key and a stream's chunk framing


class _Costs:
    """The cost and the usage of one call's LM calls, from DSPy's own history: DSPy appends the history entry of
    every LM call to the ``history`` of each object in ``settings.caller_modules`` (the modules it runs in), and
    this one, put there first, keeps only the sum of their costs (so it has no size limit to reach) and their
    usage, counted by DSPy's ``UsageTracker`` as ``dspy.track_usage`` counts it; with ``keep``, also the entries
    themselves as JSON (``history_json``), for the kernel's DSPy history.

    Counting from the history, not under a ``dspy.track_usage`` of the worker's own, leaves DSPy's usage
    tracking as it is in the kernel: with ``track_usage`` on, a module that finds no tracker opens one and sets
    its usage on its prediction (``get_lm_usage()``)."""

    def __init__(self, lm_states: _LMStates, keep: bool = False, modules: dict[int, str] | None = None,
                 lms: dict[tuple[Any, ...], Any] | None = None) -> None:
        self.history = self
        self.total: float | None = None  # None until an LM reports a cost (an unpriced model is not free)
        self.usage = UsageTracker()
        self.entries: collections.deque[Any] | None = collections.deque(maxlen=MAX_HISTORY) if keep else None
        self.modules = modules or {}  # id -> name of the program's modules (named_sub_modules), whose histories
        # DSPy also appends the entry to: the kernel appends it to its own modules of those names
        self.lms = lms or {}  # (module name, attribute[, index or key]) -> an LM the program holds (a predictor's
        # set_lm one, or one its forward calls itself), whose history DSPy appends the entry to first: the kernel's
        # object of that name gets it in the kernel, not the kernel's DSPy LM
        self.lm_states = lm_states  # the LMs the call may change as it answers
        self.calls = 0  # LM calls made
        self.hits = 0  # of them, answered from DSPy's cache
        self._lock = threading.Lock()  # dspy.Parallel's threads append at once

    def __len__(self) -> int:
        return 0  # never full: DSPy drops no entry

    def append(self, entry: dict[str, Any]) -> None:
        # A cache hit keeps the cost of the call that filled the cache, but nothing was billed: DSPy empties
        # its usage (its usage tracker skips it), and so does this.
        cost = entry.get("cost")
        with self._lock:
            self.calls += 1
            self.hits += _cache_hit(entry)
            if isinstance(cost, (int, float)) and entry.get("usage"):
                self.total = (self.total or 0.0) + cost
            if entry.get("usage"):  # keyed by the LM's model, as DSPy's LMs report it to a tracker
                self.usage.add_usage(entry.get("model") or _response_model(entry), entry["usage"])
            if self.entries is not None:  # the newest: inspect_history shows the last calls
                callers = [self.modules[id(m)] for m in dspy.settings.caller_modules or () if id(m) in self.modules]
                self.entries.append((entry, callers, self._lm_of(entry)))

    def _lm_of(self, entry: dict[str, Any]) -> list[str] | None:
        """Where the program holds the LM that made ``entry`` (DSPy appended it to that LM's history just before
        this one's; other threads' calls may have come between), or None for an LM it does not hold."""
        return next((list(where) for where, lm in self.lms.items()
                     if any(seen is entry for seen in getattr(lm, "history", [])[-RECENT_ENTRIES:])), None)

    def tokens(self) -> dict[str, Any]:
        """The usage per model, as ``UsageTracker.get_total_tokens`` gives it."""
        with self._lock:
            return self.usage.get_total_tokens()

    def output_json(self, output: Any) -> Any:
        """``output_json`` of ``output`` with this call's usage, cost and cache hits."""
        with self._lock:
            cached = self.hits, self.calls
        return output_json(output, self.tokens(), self.total, cached)

    def history_json(self, budget: int) -> list[dict[str, Any]]:
        """The kept entries as JSON, as DSPy's ``inspect_history`` reads them: the newest whose JSON fits in
        ``budget`` bytes (each holds its whole prompt: a long document's calls fill a message), each with the
        names of the program's modules that made it (``typed.HISTORY_MODULES``). Its ``response`` comes as
        ``_response_json`` gives it; a provider's objects, such as litellm's tool calls, come as their
        fields; other values that are not JSON, such as a response format's class, as their repr (or a line saying it
        failed); keys JSON has no form for are left out, and an entry that contains itself or whose values' own code
        fails as it is read."""
        with self._lock:
            entries = list(self.entries or ())
        kept = []
        for entry, callers, lm in reversed(entries):
            try:
                text = json.dumps({**entry, **({"response": _response_json(entry["response"])} if "response" in entry
                                               else {}), typed.HISTORY_MODULES: callers, typed.HISTORY_LM: lm},
                                  default=_as_json, skipkeys=True)
            except Exception:  # a circular reference (ValueError, RecursionError), or its values' own code failing
                continue
            budget -= len(text) + 2  # ASCII, as the worker's encoder writes it, and its separator
            if budget < 0:
                break
            kept.append(json.loads(text))
        kept.reverse()
        return kept


_TOKEN_COUNTS = ("total_tokens", "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")


def _cache_hit(entry: dict[str, Any]) -> bool:
    """Whether DSPy answered the LM call of a history entry from its cache. A ``dspy.LM``'s entry does not say so,
    but it empties the usage of a hit (nothing was billed) where the response, as the cache kept it, still has
    the usage of the call that filled it; DSPy's ``TypesafeLM`` says ``cache_hit`` in the entry, and a
    ``BaseLM``'s response read from the cache has it as an attribute."""
    response = entry.get("response")
    if entry.get("cache_hit") or getattr(response, "cache_hit", False) is True:
        return True
    kept = response.get("usage") if isinstance(response, dict) else getattr(response, "usage", None)
    counts = [kept.get(key) if isinstance(kept, dict) else getattr(kept, key, None) for key in _TOKEN_COUNTS]
    return not entry.get("usage") and any(type(n) is int and n > 0 for n in counts)


def _response_model(entry: dict[str, Any]) -> str:
    """The model of a history entry without one of its own (DSPy's ``TypesafeLM``), as its response names it."""
    response = entry.get("response")
    return str(response.get("model", "")) if isinstance(response, dict) else ""


def _response_json(response: Any) -> Any:
    """An LM call's ``response`` as the kernel can have it: one of DSPy's own classes (the lm15 ``Response`` of a
    ``dspy.LM``) as typed JSON, which the kernel rebuilds as that object (``programs.record_history``); another (the
    litellm ``ModelResponse`` an LM of one's own returns, which the kernel would not rebuild from data) as its
    fields, a dict, as ``_as_json`` gives them."""
    if type(response).__module__.partition(".")[0] == "dspy":
        encoded = typed.encode(response)
        if typed.unsendable(encoded, "response") is None:  # no part of it without a JSON form
            return encoded
    return response


def _as_json(value: Any) -> Any:
    """A history entry's value that JSON has no form for: a pydantic model (litellm's tool calls, which
    ``inspect_history`` reads as dicts) as its fields, anything else as its repr, or a line saying it failed."""
    from pydantic import BaseModel

    try:
        return dict(value) if isinstance(value, BaseModel) else repr(value)
    except Exception as exc:  # its own code failed: the entry is kept, inspect_history reads the rest
        return f"<a {type(value).__name__} whose repr failed: {type(exc).__name__}>"


@contextlib.contextmanager
def _tracked(settings: dict[str, Any], history: bool = False, program: Any = None,
             ctx: ToolContext | None = None) -> Generator[_Costs, None, None]:
    """Run under ``settings``, counting the LM usage and the cost of the calls (and with ``history``, keeping
    their DSPy history entries, with the names of ``program``'s modules that made each); ``costs.lm_states``
    watches the LMs the call may change (``_LMStates``). Where the call fails, the changes its LMs made go to
    ``ctx.lm_state``: the kernel keeps them, as DSPy's LM in the kernel keeps them when the program raises."""
    settings = dict(settings)
    shipped = settings.pop(_SHIPPED_LM, None)
    modules = programs.sub_modules(program)
    held = programs.held_lms(modules)
    named = modules if history else []
    watched: dict[str, tuple[list[Any] | None, Any]] = {
        f"the program holds in {'.'.join(map(str, where))}": (list(where), lm) for where, lm in held.items()}
    if shipped is not None:
        watched["dspy.context set around this call"] = (None, shipped)
    costs = _Costs(_LMStates(watched), keep=history, modules={id(module): name for name, module in named},
                   lms=held if history else {})
    with dspy.context(**settings, caller_modules=[*(dspy.settings.caller_modules or []), costs]):
        try:
            yield costs
        except BaseException as exc:
            if ctx is not None and (changes := costs.lm_states.changes()):
                ctx.lm_state = _fitting(changes, error_info(exc), ctx, "the error")
            raise


def _listeners(program: Any) -> list[StreamListener]:
    """New listeners (they keep state) for every str output field of every predictor of ``program`` (of the module
    a ``dspy.asyncify``'d function runs)."""
    if programs.asyncified(program):
        program = programs.streamified_program(program)
    if not isinstance(program, dspy.Module):
        return []
    return [StreamListener(signature_field_name=field, predict=predictor, predict_name=name, allow_reuse=True)
            for name, predictor in program.named_predictors()
            for field, info in predictor.signature.output_fields.items() if info.annotation is str]


def _adapter_not_streamed() -> str | None:
    """The name of the adapter in use where DSPy's ``StreamListener`` cannot read its replies (it knows
    ChatAdapter, JSONAdapter and XMLAdapter by name, and fails the call under any other: ``TwoStepAdapter``, a
    subclass of the notebook's own), else None."""
    adapter = dspy.settings.adapter
    name = type(adapter).__name__
    return None if adapter is None or name in {a.__name__ for a in ADAPTER_SUPPORT_STREAMING} else name


def _async_items(make: Callable[[], AsyncIterator[Any]],
                 settled: Callable[[], bool] = lambda: True) -> Generator[Any, None, None]:
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
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # SystemExit, KeyboardInterrupt... from user code: the call's error
            items.put(_Failure(exc.error if isinstance(exc, _Carried) else exc))
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
            # A program thread that streamify abandoned on cancel may still be in anyio.from_thread.run:
            # serve the loop until it has returned, else close() drops its call and it waits forever.
            while not settled():
                loop.run_until_complete(asyncio.sleep(0.01))
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
    error: BaseException


class _Carried(Exception):
    """A program's ``StopIteration`` (or ``StopAsyncIteration``) on its way through ``dspy.streamify``, which
    Python would make a RuntimeError ("coroutine raised StopIteration") as it left streamify's coroutines: the
    kernel gets the program's own error, as from a call not streamed (``_async_items`` takes it out)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error


def _settings(ctx: ToolContext, kernel: str) -> dict[str, Any]:
    """What a call runs under: the worker's LM and callbacks, and the kernel's settings (its adapter..., and its
    environment variables changed since the pool started, set here); once the call is cancelled, its program
    makes no further LM call."""
    kernel_settings = programs.call_settings(kernel)
    settings = {**ctx.worker.dspy_settings(), **kernel_settings}
    programs.use_environment(settings.pop(ENV, {}))
    programs.use_cache(settings.pop(CACHE, {}))
    callbacks = list(settings["callbacks"])  # this call's own list
    _stop_when(ctx.cancelled, callbacks)
    return {**settings, "callbacks": callbacks, _SHIPPED_LM: kernel_settings.get("lm")}


_SHIPPED_LM = "dspex_shipped_lm"  # in _settings: the LM dspy.context set around the call in the kernel, or None


class _LMStates:
    """The public attributes of the LMs a call may change as it answers (by what holds each: ``[module name,
    attribute(, index or key)]`` for one the program holds, ``set_lm``; None for the copy of the kernel's LM that
    ``dspy.context`` set), as DSPy's ``DummyLM`` given a list does (it gives the next answer at each call), or an LM
    of one's own counting its calls. ``changes()`` are what the kernel sets on its own LMs (``programs.keep_lm_state``),
    so that its next call starts where this one left, as in the kernel. An LM the kernel marked (``LM_STALE``:
    a change that could not come back) is refused before the program runs."""

    def __init__(self, lms: dict[str, tuple[list[Any] | None, Any]]) -> None:
        for label, (_, lm) in lms.items():
            if stale := getattr(lm, LM_STALE, None):
                raise typed.NotPortable(f"the LM {_lm_name(lm)} that {label} {stale}")
        self.lms = lms
        self.before = {label: _public_state(lm) for label, (_, lm) in lms.items()}

    def changes(self, values: bool = True) -> list[dict[str, Any]]:
        """For each LM whose public attributes changed: where it is, how to name it (``label``, ``name``), the names
        of those it changed (``changed``) and no longer has (``removed``), the kernel LM's ``LM_VERSION`` this copy
        was sent at (``version``), and, with ``values``, the new values as typed JSON (``attributes``), or, for values
        that cannot travel as typed JSON (a ``DummyLM``'s iterator of answers), why (``unsent``). A batch item's need
        no values: the kernel's LM is not set from a batch."""
        changes = []
        for label, (where, lm) in self.lms.items():
            was, now = self.before[label], _public_state(lm)
            changed = sorted(name for name in now if now[name] is not None and was.get(name) != now[name])
            removed = sorted(was.keys() - now.keys())
            if not changed and not removed:
                continue
            change: dict[str, Any] = {"lm": where, "label": label, "name": _lm_name(lm), "changed": changed,
                                      "removed": removed, "version": getattr(lm, LM_VERSION, 0)}
            if not values:
                changes.append(change)
                continue
            try:
                attributes = {name: typed.encode(getattr(lm, name)) for name in changed}
                why = next(filter(None, (typed.unsendable(value, name) for name, value in attributes.items())), None)
            except Exception as exc:  # NotPortable, RecursionError, or the value's own code failing
                attributes, why = {}, message_of(exc) if isinstance(exc, typed.NotPortable) else \
                    f"{type(exc).__name__}: {message_of(exc)}"
            change.update({"attributes": attributes} if why is None else {"unsent": why})
            changes.append(change)
        return changes


def _lm_name(lm: Any) -> str:
    return f"{type(lm).__name__} {getattr(lm, 'model', '')!r}"


def _public_state(lm: Any) -> dict[str, bytes | None]:
    """Each attribute of ``lm`` (in its ``__dict__`` or its classes' ``__slots__``) but its history and private ones,
    pickled (a notebook's class or lambda by value, as cloudpickle ships them); None for one that cannot be (a client
    or lock it made), which is not compared: the others are."""
    attributes = dict(getattr(lm, "__dict__", {}))
    for name in _slots(type(lm)):
        with contextlib.suppress(AttributeError):  # a slot not set
            attributes[name] = getattr(lm, name)
    return {name: _pickled(value) for name, value in attributes.items()
            if not name.startswith("_") and name != "history"}


def _slots(cls: type) -> list[str]:
    """The names of the ``__slots__`` of ``cls`` and its bases."""
    names = []
    for base in cls.__mro__:
        slots = vars(base).get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return names


def _pickled(value: Any) -> bytes | None:
    """``value`` pickled, by cloudpickle where pickle refuses it (a lambda, an object of a class the notebook defined,
    which shipped the LM by value); None where neither can (a client): it is not compared, and the others still are
    (one such attribute left the whole LM unwatched)."""
    try:
        return pickle.dumps(value)
    except Exception:
        try:
            return cloudpickle.dumps(value)
        except Exception:
            return None


def _stop_when(cancelled: CancelEvent, callbacks: list[Any]) -> None:
    """Once ``cancelled`` is set, ``callbacks`` (a list DSPy reads at each step) refuse further LM calls. The
    callback joins them only then: DSPy skips its callback machinery (a third of a small call's time) while
    the list is empty."""
    cancelled.on_set(lambda: callbacks.insert(0, StopWhenCancelled(cancelled)))


def _call(program: Any, inputs: dict[str, Any], ctx: ToolContext, settings: str,
          trace: bool = False, history: bool = False, tokens: bool = True) -> Generator[Emit, None, Any]:
    """Run ``program`` on ``inputs`` under the worker's LM and the kernel's ``settings``; streamed calls yield
    token chunks per field (without ``tokens``, only a status chunk: the program runs as a unary call runs it,
    without DSPy's streaming, and the stream carries its end and its cancel).
    The call runs under a DSPy trace of its own (as under an optimizer's ``dspy.context(trace=[])``; a batch's
    items each too): in the worker's global trace a forward that reads ``dspy.settings.trace`` saw the predictor calls
    of whatever that worker ran before, so its answer depended on the worker, and the trace kept them all (up to
    ``max_trace_size``, dropped program copies with them). With ``trace``, the result has the program's predictor
    calls too (``_with_extras``); with ``history``, its LM calls' DSPy history entries (``typed.HISTORY``), for the
    kernel's inspect_history.

    A program with nothing to stream (no str output field) says so in a status chunk and returns its
    result; a program that returns a stream (a ``dspy.streamify``'d one) is run to its end, its tokens
    passed on.
    """
    listeners = _listeners(program) if ctx.streaming and tokens else []
    final: Any = None
    steps: list[Any] = []  # the call's own DSPy trace, sent back with ``trace``
    with _tracked({**_settings(ctx, settings), "trace": steps}, history, program, ctx) as costs:
        unread = _adapter_not_streamed() if listeners else None
        if unread:
            listeners = []
            yield Emit("status", {"message": f"running {_label(program)} (its tokens are not streamed: DSPy's "
                                             f"StreamListener cannot read the fields of {unread})"})
        if ctx.cancelled.is_set():  # cancelled while the call was made ready (its program, inputs): never started
            raise Cancelled("the call was cancelled before its program started")
        if listeners:
            always = _AlwaysPrediction(program, ctx)
            streamed = dspy.streamify(always, stream_listeners=listeners)
            values = _async_items(lambda: streamed(**inputs), always.settled)
        else:
            if ctx.streaming and not unread and not programs.streamified(program):  # that one streams as it was made to
                why = "no str output field to stream" if tokens else "its tokens are not streamed, as asked"
                yield Emit("status", {"message": f"running {_label(program)} ({why})"})
            output = _awaited(programs.invoke(program, inputs))  # in the call's thread, which counts as running
            values = _values_of(output)
            if values is None:
                return _with_extras(program, steps, trace, costs.output_json(output), costs, ctx)
        raw = False
        for value in values:
            if isinstance(value, StreamResponse):
                yield Emit("token", {"field": value.signature_field_name, "text": value.chunk,
                                     "last": value.is_last_chunk, "predictor": value.predict_name})
            elif isinstance(value, _Retry):  # the tokens its predictor streamed since its call began are not the answer
                yield Emit("status", {"message": value.message, "retry": _predictor_name(program, value.predictor)})
            elif isinstance(value, StatusMessage):
                yield Emit("status", {"message": value.message})
            elif isinstance(value, dspy.Prediction):  # a stream's last value
                final = value
            elif not raw:  # DSPy passes on the LM's own chunks where the streamify'd program has no listener
                raw = True
                yield Emit("status", {"message": _RAW_CHUNKS.format(type(value).__name__)})
        if final is None:
            raise _no_final()
    return _with_extras(program, steps, trace, costs.output_json(final.value if isinstance(final, _Boxed) else final),
                        costs, ctx)


def _predictor_name(program: Any, predictor: int) -> str:
    """The name in ``program.named_predictors()`` of the predictor of id ``predictor`` ("" for none of them)."""
    return next((name for name, p in program.named_predictors() if id(p) == predictor), "") \
        if isinstance(program, dspy.Module) else ""


# The LM's raw chunks carry its whole reply, field markers and all, for no field: the kernel gets a stream's chunks
# of a field only, each as a token chunk
_RAW_CHUNKS = ("the LM's raw stream chunks ({}) that this dspy.streamify'd program gives without stream listeners are "
               "not passed on: give streamify a StreamListener(signature_field_name=...) for each field to stream, or "
               "pass the program without streamify, and pool.run_stream streams each str output field")


def _with_extras(program: Any, steps: list[Any], trace: bool, result: Any, costs: _Costs, ctx: ToolContext,
                 batch: bool = False) -> Any:
    """``result`` (a program's output as ``output_json`` makes it), with ``typed.TRACE`` where ``trace`` is asked:
    the predictor calls DSPy recorded in ``steps`` (``dspy.settings.trace``) as ``[name, inputs, prediction]``,
    each predictor by its name in ``program.named_predictors()`` (None for one the program does not hold);
    ``typed.LM_STATE``, the attributes its LMs changed as they answered, where they changed any (a ``batch``
    item's by name only: each of its items would carry a copy of a DummyLM's answers, to the journal too); and
    ``typed.HISTORY``, the LM calls' history entries kept by ``costs``, the newest that fit in the message."""
    if trace:
        result[typed.TRACE] = _trace_json(program, steps)
    if changes := costs.lm_states.changes(values=not batch):
        result[typed.LM_STATE] = _fitting(changes, result, ctx, "the answer")
    if costs.entries:  # what the result leaves of its message: the history must not make it too large
        if history := costs.history_json(_room(ctx) - _size(result)):
            result[typed.HISTORY] = history
    return result


def _item_error(exc: BaseException) -> dict[str, Any]:
    """A failed item's error as ``error_info`` gives it (so the kernel can raise it as its own class, as
    ``pool.evaluate`` does for DSPy's Evaluate), less its traceback, which every failed item of a batch would carry."""
    return {key: value for key, value in error_info(exc).items() if key != "traceback"}


def _size(result: Any) -> int:
    """The bytes of ``result``'s JSON, 0 where it has none (sending it fails, saying why)."""
    try:
        return len(dumps(result))
    except (TypeError, ValueError, RecursionError):
        return 0


def _room(ctx: ToolContext) -> int:
    """The bytes of a message that a call's result (or error) and what goes with it may take."""
    return ctx.worker.max_message_bytes - MESSAGE_OVERHEAD - HISTORY_FRAME


def _fitting(changes: list[dict[str, Any]], beside: dict[str, Any], ctx: ToolContext,
             what: str) -> list[dict[str, Any]]:
    """``changes`` (``_LMStates.changes``), without their new values where with ``beside`` (the call's answer or error
    info, named ``what``) they would not fit in a message: they stay on the worker, saying why, and cost the call
    neither its answer nor its error."""
    size = _size({**beside, typed.LM_STATE: changes})
    if size <= _room(ctx):
        return changes
    why = (f"with {what} they are {size / 2**20:.1f} MiB as JSON, over the {ctx.worker.max_message_bytes / 2**20:g} "
           "MiB message limit")
    return [{**{key: value for key, value in change.items() if key != "attributes"},
             "unsent": change.get("unsent", why)} for change in changes]


def _without_history(item: dict[str, Any]) -> dict[str, Any]:
    """A batch item's chunk data without its result's ``typed.HISTORY``."""
    if not item["ok"] or typed.HISTORY not in item["result"]:
        return item
    return {**item, "result": {k: v for k, v in item["result"].items() if k != typed.HISTORY}}


def _trace_json(program: Any, steps: list[Any]) -> list[list[Any]]:
    """The predictor calls DSPy recorded in ``steps`` as ``[name, inputs, prediction]``, each predictor by its
    name in ``program.named_predictors()`` (None for one the program does not hold)."""
    names = {id(predictor): name for name, predictor in program.named_predictors()} \
        if isinstance(program, dspy.Module) else {}
    return [[names.get(id(predictor)), typed.encode(inputs), typed.encode(outputs)]
            for predictor, inputs, outputs in steps]


class _Boxed(dspy.Prediction):
    """A program's non-Prediction result (e.g. dspy.Parallel's list) on its way through streamify."""


class _AlwaysPrediction(dspy.Module):
    """``program``, returning a Prediction: streamify waits forever for one after any other result."""

    def __init__(self, program: dspy.Module, ctx: ToolContext) -> None:
        super().__init__()
        self.program = program
        self.ctx = ctx
        self._lock = threading.Lock()
        self._running = 0
        self._closed = False

    def settled(self) -> bool:
        """True (and no call starts from now on) once no call runs: its event loop may close."""
        with self._lock:
            self._closed = self._running == 0
            return self._closed

    def __call__(self, **inputs: Any) -> dspy.Prediction:  # type: ignore[override]
        """``forward``, without ``Module.__call__``'s usage tracker, which would stand in for the program's own
        (with ``track_usage`` on, a program's modules set their usage as in the kernel, where nothing wraps it)."""
        return self.forward(**inputs)

    def forward(self, **inputs: Any) -> dspy.Prediction:
        with self._lock:
            if self._closed:
                raise RuntimeError("the stream was closed before the program started")
            self._running += 1
        # streamify's copy of the callbacks, less the StatusStreamingCallback it adds: with a callback, DSPy calls
        # the program's modules and tools down another path, whose stack frames a ReAct's failed tool shows in
        # its trajectory (its next prompt): the answers would differ from a call of the program
        callbacks = [c for c in dspy.settings.callbacks if not isinstance(c, StatusStreamingCallback)]
        _stop_when(self.ctx.cancelled, callbacks)
        try:
            with dspy.context(send_stream=_FromThisThread(dspy.settings.send_stream), callbacks=callbacks,
                              **{UNSEEN_STREAM: True}), self.ctx.program_running():
                output = _awaited(programs.invoke(self.program, inputs))  # an async program runs to its end here
        except (StopIteration, StopAsyncIteration) as exc:
            raise _Carried(exc) from None
        finally:
            with self._lock:
                self._running -= 1
        return output if isinstance(output, dspy.Prediction) else _Boxed(value=output)


class _FromThisThread:
    """streamify's send stream, for a program run in streamify's worker thread, an async one on an event loop
    of its own there (as the kernel awaits it): DSPy's async LM calls ``await send(...)`` on that loop, which
    hands the chunk to streamify's loop as its sync calls do (``anyio.from_thread.run``)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.thread = threading.get_ident()

    async def send(self, item: Any) -> None:
        if threading.get_ident() == self.thread:
            anyio.from_thread.run(self.stream.send, item)
        else:  # on streamify's loop (a sync call's anyio.from_thread.run) or another thread's loop
            await self.stream.send(item)


def _awaited(output: Any) -> Any:
    """A program's result: what a coroutine returns (an ``async def`` program's or a ``dspy.asyncify``'d one's,
    which the kernel awaits), run to its end on an event loop of this thread; any other output as it is."""
    return asyncio.run(output) if inspect.iscoroutine(output) else output


def _values_of(output: Any) -> Iterable[Any] | None:
    """The values of a DSPy stream (a ``dspy.streamify``'d program returns one), or None for a result.

    A generator of the program's own is refused: it cannot travel to the kernel, where the program gives
    the generator itself, and its last value would silently stand in for it."""
    asynchronous = inspect.isasyncgen(output)
    if not (asynchronous or inspect.isgenerator(output)):
        return None
    frame = output.ag_frame if asynchronous else output.gi_frame
    if frame is None or frame.f_globals.get("__name__", "").partition(".")[0] != "dspy":
        raise typed.NotPortable(f"the program returned {'an async' if asynchronous else 'a'} generator "
                                f"({output.__qualname__}), which cannot travel from the worker: return what it "
                                "yields instead, e.g. as a list or a dspy.Prediction")
    return _async_items(lambda: output) if asynchronous else output


def _run_to_end(output: Any) -> Any:
    """A program's result; a stream is run to its final value."""
    values = _values_of(output)
    if values is None:
        return output
    final = None
    for value in values:
        final = value
    if isinstance(final, (StreamResponse, StatusMessage)) or final is None:
        raise _no_final()
    return final


def _no_final() -> typed.NotPortable:
    """The error of a program whose ``dspy.streamify`` stream ends without its final Prediction, which is what the
    pool gives for it: the kernel has the stream's chunks alone."""
    return typed.NotPortable("the program's dspy.streamify stream ended without its final Prediction "
                             "(include_final_prediction_in_output_stream=False), which is what the pool returns for "
                             "a stream: streamify it without that option (pool.run_stream streams its listeners' "
                             "tokens all the same), or run it in the kernel")


def _send_status(message: StatusMessage) -> None:
    """Put ``message`` on the call's DSPy stream, from the program's thread (as DSPy's sync LM calls send)."""
    stream = dspy.settings.send_stream
    if stream is not None:
        with contextlib.suppress(Exception):  # a status line is not worth failing the call for
            anyio.from_thread.run(stream.send, message)


def _parallel_without_streams() -> None:
    """Let ``dspy.Parallel`` / ``Module.batch`` / ``dspy.Evaluate`` run inside a streamed call.

    DSPy's sync LM stream hands each chunk to the stream with ``anyio.from_thread.run``, which works only
    in the AnyIO thread that ``dspy.streamify`` runs the program in; the executor's own threads inherit the
    stream and fail (their items error, the call hangs). Here they run without it: the parallel part says
    so in a status chunk, streams no tokens and returns its results.
    """
    from dspy.utils.parallelizer import ParallelExecutor

    original = ParallelExecutor.execute
    if getattr(original, "dspex_nb", False):
        return

    def execute(self: ParallelExecutor, function: Callable[..., Any], data: Any) -> Any:
        if dspy.settings.send_stream is None:
            return original(self, function, data)
        count = f"{len(data)} " if hasattr(data, "__len__") else ""
        _send_status(StatusMessage(f"running {count}calls in parallel (their tokens are not streamed)"))
        with dspy.context(send_stream=None):
            return original(self, function, data)

    execute.dspex_nb = True  # type: ignore[attr-defined]
    ParallelExecutor.execute = execute  # type: ignore[method-assign]


_parallel_without_streams()

# What a call's own threads do not get of its DSPy settings: what the kernel sets with ``dspy.context``, not
# ``dspy.configure``, so its threads do not see it either (a trace, a usage tracker), and the call's stream
# (see ``_parallel_without_streams``).
NOT_FOR_THREADS = frozenset({"send_stream", "trace", "usage_tracker"})


def _threads_see_the_calls_settings() -> None:
    """Let the threads a program starts itself (``threading.Thread``, a ``ThreadPoolExecutor``) call its LM, and
    their prints go back with the call's (``output.CALL_OUTPUT``).

    In the kernel they see what ``dspy.configure`` set (DSPy: "user threads work"); a worker sets nothing
    globally and runs each call under ``dspy.context``, which DSPy keeps per thread, so there a thread found
    no LM. Here a thread started during a call gets the call's settings, as ``dspy.Parallel`` hands them on,
    less ``NOT_FOR_THREADS``.
    """
    from dspy.dsp.utils import dotdict
    from dspy.dsp.utils.settings import thread_local_overrides

    original = threading.Thread.start
    if getattr(original, "dspex_nb", False):
        return

    def start(self: threading.Thread) -> None:
        overrides = {k: v for k, v in thread_local_overrides.get().items() if k not in NOT_FOR_THREADS}
        output = CALL_OUTPUT.get()  # what it prints goes back with the call's output, as in the kernel to the cell
        if overrides or output is not None:
            run = self.run

            def run_with_settings() -> None:
                thread_local_overrides.set(dotdict(overrides))  # this thread's own variable
                CALL_OUTPUT.set(output)
                run()

            self.run = run_with_settings  # type: ignore[method-assign]
        original(self)

    start.dspex_nb = True  # type: ignore[attr-defined]
    threading.Thread.start = start  # type: ignore[method-assign]


_threads_see_the_calls_settings()

# The DSPy setting of a program the worker streams for the kernel (pool.run_stream of a module not made to stream):
# the stream is the pool's, which the program does not know of, so it runs as its call in the kernel runs it
UNSEEN_STREAM = "dspex_unseen_stream"


@dataclass
class _Retry(StatusMessage):
    """The status of a predictor's LM call made again after its stream showed some of the reply."""

    predictor: int = 0  # the id of the predictor whose call is made again


def _streams_the_program_does_not_see() -> None:
    """Let a program streamed for the kernel do what it does unstreamed once its LM's reply began to stream.

    DSPy stops a streamed call from doing again what its stream already showed: its ChatAdapter does not fall back
    to JSONAdapter on a reply it cannot parse (``dspy.streamify`` raises AdapterParseError there). ``qa(...)`` in the
    kernel streams nothing, so it falls back, and so does the pool's call of it: the kernel gets the result the call
    gives. The tokens of the reply that did not parse are not the answer: a ``_Retry`` status says so, and the views
    drop them (``StreamText``), rather than run the next attempt's on after them.
    """
    try:
        from dspy.adapters.chat_adapter import ChatAdapter
        from dspy.clients import call_context, execution, lm
    except ImportError:  # another DSPy than the one this was written for: its streamed calls run as DSPy has them
        return
    original = getattr(execution, "stream_emitted", None)
    scopes = getattr(call_context, "_adapter_calls", None)  # the adapter calls running, innermost last
    fallback = getattr(ChatAdapter, "_make_json_adapter_fallback", None)
    if original is None or scopes is None or fallback is None or getattr(original, "dspex_nb", False):
        return

    def stream_emitted() -> None:
        if not dspy.settings.get(UNSEEN_STREAM):
            original()
            return
        for progress in scopes.get():  # what DSPy's would mark emitted, which would stop its fallback
            progress.dspex_shown = True

    def make_json_adapter_fallback(self: ChatAdapter) -> Any:
        calls = scopes.get()
        if calls and getattr(calls[-1], "dspex_shown", False):
            _send_status(_Retry("asking again with JSONAdapter: ChatAdapter could not parse the reply streamed so "
                                "far", id(dspy.settings.caller_predict)))
        return fallback(self)

    stream_emitted.dspex_nb = True  # type: ignore[attr-defined]
    execution.stream_emitted = lm.stream_emitted = stream_emitted
    ChatAdapter._make_json_adapter_fallback = make_json_adapter_fallback  # type: ignore[method-assign]


_streams_the_program_does_not_see()


def _label(program: Any) -> str:
    return type(program).__name__ if isinstance(program, dspy.Module) else getattr(program, "__name__", "program")


def _decode(tool_name: str, value: Any, where: str, resolver: typed.Resolver | None = None) -> Any:
    """Inputs sent as typed JSON, rebuilt with ``resolver`` (the program's own types and what came with the
    inputs, see ``_resolver``); a clear ArgumentError if they cannot."""
    try:
        return typed.decode(value, resolver or typed.Resolver(), where)
    except typed.NotPortable as exc:
        raise ArgumentError(tool_name, "ArgumentError", str(exc)) from None


def _resolver(tool_name: str, types: set[type], shipped: str) -> typed.Resolver:
    """The program's ``types`` and the classes and code ``shipped`` by value with the inputs (whose classes
    win: an input is an instance of the kernel's class of now, even where the program was shipped earlier)."""
    if not shipped:
        return typed.Resolver(types)
    shipment = programs.load_shipment(tool_name, shipped)
    return typed.Resolver([*types, *shipment.types], shipment.objects)


def _builtin(tool_name: str, module: str, signature: str, inputs: Any) -> tuple[dspy.Module, dict[str, Any]]:
    sig = _signature(tool_name, signature)
    return MODULES[module](sig), _check_inputs(tool_name, sig, inputs, "argument 'inputs'")


# A DSPy tool's ``settings``: the kernel's DSPy settings (its adapter...), as ``Pool`` sends them; "" for none.


@tool
def predict(ctx: ToolContext, signature: str, inputs: dict | str, settings: str = "",
            history: bool = False, tokens: bool = True) -> Generator[Emit, None, dict[str, Any]]:
    """Run dspy.Predict(signature) on ``inputs``; streamed calls stream the tokens of each str output field
    (with ``tokens``). ``history``: return its LM calls' DSPy history entries too, for the kernel's
    ``dspy.inspect_history``."""
    return (yield from _call(*_builtin("predict", "predict", signature, inputs), ctx, settings, history=history,
                             tokens=tokens))


@tool
def chain_of_thought(ctx: ToolContext, signature: str, inputs: dict | str, settings: str = "",
                     history: bool = False, tokens: bool = True) -> Generator[Emit, None, dict[str, Any]]:
    """Run dspy.ChainOfThought(signature); streamed calls stream reasoning and each str output field (with
    ``tokens``). ``history``: as ``predict``'s."""
    return (yield from _call(*_builtin("chain_of_thought", "chain_of_thought", signature, inputs), ctx, settings,
                             history=history, tokens=tokens))


@tool
def signature_fields(signature: str) -> dict[str, list[str]]:
    """The input and output field names of a signature string, as DSPy parses it (or DSPy's reason why not)."""
    try:
        sig = _parsed(signature)
    except Exception as exc:
        raise ArgumentError("signature_fields", "ArgumentError", str(exc)) from None
    return {"inputs": list(sig.input_fields), "outputs": list(sig.output_fields)}


@tool
def define(ctx: ToolContext, name: str, source: str) -> dict[str, Any]:
    """Run ``source`` (Python; ``dspy`` is imported) and keep its ``name``: a dspy.Module subclass or instance,
    a signature class or a function, as a program that ``run_module`` and ``batch_inference(module=name)`` run."""
    _check_name(name)
    program = programs.from_source(name, source)
    program.version = definition_version(source)
    ctx.worker.modules[name] = program
    return program.info()


@tool
def define_object(ctx: ToolContext, name: str, payload: str) -> dict[str, Any]:
    """Keep a program shipped by value from the kernel (``payload``: base64 cloudpickle, as Pool.define sends)."""
    _check_name(name)
    program = programs.from_pickle(name, payload)
    program.version = definition_version(payload)
    ctx.worker.modules[name] = program
    return program.info()


@tool
def undefine(ctx: ToolContext, name: str) -> dict[str, bool]:
    """Forget the program ``name`` (a define that failed on another worker is undone this way)."""
    return {"removed": ctx.worker.modules.pop(name, None) is not None}


def _check_name(name: str) -> None:
    if not name.isidentifier():
        raise ArgumentError("define", "ArgumentError", f"argument 'name' must be a Python identifier, got {name!r}")


def _defined(ctx: ToolContext, tool_name: str, name: str) -> programs.Program:
    try:
        return ctx.worker.modules[name]
    except KeyError:
        known = sorted(ctx.worker.modules) or "none yet; define one with %%dspex define or pool.define"
        raise ArgumentError(tool_name, "ArgumentError", f"no module named {name!r} on this worker "
                            f"(defined: {known})") from None


@tool
def run_module(ctx: ToolContext, name: str, inputs: dict | str, settings: str = "", shipped: str = "",
               trace: bool = False, history: bool = False,
               tokens: bool = True) -> Generator[Emit, None, dict[str, Any]]:
    """Run a module kept by ``define`` (or, given a handle from ``load_module``, that very instance) on
    ``inputs``; streamed calls stream the tokens of its predictors. ``shipped``: the classes and code of the
    inputs, by value (base64 cloudpickle of a ``typed.Shipment``, as ``Pool.run`` sends where needed).
    ``trace``: return its predictor calls too (DSPy's trace), for the kernel's trace; ``history``: its LM
    calls' DSPy history entries, for the kernel's ``dspy.inspect_history``; ``tokens``: stream its tokens (a
    streamed call)."""
    if name.startswith("h:"):
        defined, program = ctx.resolve("run_module", name)
        kept = None  # a session's instance: what a call changes stays for its next calls
    else:
        defined = _defined(ctx, "run_module", name)
        program, kept = defined.factory(), defined.shipped
    resolver = _resolver("run_module", defined.types, shipped)
    inputs = defined.check("run_module", _decode("run_module", inputs, "inputs", resolver), "argument 'inputs'")
    try:
        result = yield from _call(program, inputs, ctx, settings, trace, history, tokens)
    except BaseException:
        _state_changed(kept, program)  # the next call starts from the kernel's state all the same
        raise
    return _with_state(result, _state_changed(kept, program), defined)


def _state_changed(kept: programs.ShippedCopy | None, program: Any) -> bool:
    return kept is not None and kept.changed(program)


def _with_state(result: Any, changed: bool, defined: programs.Program) -> Any:
    """``result``, with ``typed.STATE_CHANGED`` (the program's name, and what the user calls it) where its call
    ``changed`` the state of the kernel's program that it ran (``ShippedCopy``), for the kernel to say that the change
    does not reach it."""
    if changed and isinstance(result, dict):
        result[typed.STATE_CHANGED] = [defined.name, defined.label or defined.name]
    return result


@tool
def load_module(ctx: ToolContext, name: str) -> dict[str, str]:
    """Make an instance of a defined module and keep it in the session (e.g. to compile or tune it and
    run that same instance later); returns its handle, which ``run_module`` takes as ``name``."""
    defined = _defined(ctx, "load_module", name)
    instance = defined.shipped.fresh() if defined.shipped is not None else defined.factory()  # not the instance
    # the program's plain calls run, which starts each from the kernel's state
    return {"handle": ctx.keep("load_module", (defined, instance))}


@tool
def batch_inference(ctx: ToolContext, batch_items: list, signature: str = "", module: str = "predict",
                    concurrency: int = 4, group: str = "", settings: str = "",
                    shipped: str = "", trace: bool = False,
                    history: bool = False) -> Generator[Emit, None, dict[str, Any]]:
    """Run ``module`` (predict, chain_of_thought on ``signature``, or a defined module) on every item,
    ``concurrency`` at a time; a "started" chunk {"index"} when an item takes its slot and one item chunk
    per item as it completes. Calls with the same ``group`` (the shards of one batch) share their
    ``concurrency`` on this worker. ``shipped``: the items' classes and code, as for ``run_module``;
    ``trace``: each item's result has its predictor calls too (``typed.TRACE``), for the kernel's DSPy trace;
    ``history``: its LM calls' DSPy history entries (``typed.HISTORY``, in its item chunk only), for the kernel's
    ``dspy.inspect_history``.

    Item chunks are {"index", "ok", "result", "worker"} or {"index", "ok": false, "error", "worker"}; of a
    defined module, with the "version" of its definition that ran them (it may be redefined while a batch runs).
    """
    if concurrency < 1:
        raise ArgumentError("batch_inference", "ArgumentError",
                            f"argument 'concurrency' must be >= 1, got {concurrency}")
    where = [f"batch_items[{i}]" for i in range(len(batch_items))]
    version: dict[str, str] = {}
    if module in MODULES:
        if not signature:
            raise ArgumentError("batch_inference", "ArgumentError",
                                f"argument 'signature' is required with module {module!r}")
        sig = _signature("batch_inference", signature)
        resolver = _resolver("batch_inference", set(), shipped)
        items = [_check_inputs("batch_inference", sig, item, w, resolver)
                 for item, w in zip(batch_items, where, strict=True)]
        make, kept, defined = partial(MODULES[module], sig), None, None
    else:
        defined = _defined(ctx, "batch_inference", module)
        resolver = _resolver("batch_inference", defined.types, shipped)
        items = [defined.check("batch_inference", _decode("batch_inference", item, w, resolver), w)
                 for item, w in zip(batch_items, where, strict=True)]
        make, kept = defined.factory, defined.shipped
        version = {"version": defined.version}
    settings, worker = _settings(ctx, settings), ctx.worker.worker_id
    # a shipped program: its items run one instance (as Module.batch runs the program's), a copy of the shard's own (a
    # call made while the batch runs starts from the kernel's state, not from the items'), whose state is checked
    # once, when the last item is done
    shared, start = kept.fresh_copy() if kept is not None else (None, None)

    events: queue.SimpleQueue[tuple[int, futures.Future | None]] = queue.SimpleQueue()  # started / done

    def run_one(index: int, inputs: dict[str, Any]) -> Any:
        """One item. LM errors such as HTTP 429 are retried by dspy.LM itself (its ``num_retries``)."""
        if not slots.take():  # a cancelled batch starts no further LM calls
            raise Cancelled("the batch was cancelled before this item started")
        try:
            events.put((index, None))
            program, steps = shared or make(), []
            with _tracked({**settings, "trace": steps}, history, program) as costs, \
                    ctx.program_running():
                output = _run_to_end(_awaited(programs.invoke(program, inputs)))
            return _with_extras(program, steps, trace, costs.output_json(output), costs, ctx, batch=True)
        finally:
            slots.release()

    results: list[dict[str, Any] | None] = [None] * len(items)
    with ctx.worker.slots(group, concurrency, ctx.cancelled) as slots:
        pool = futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="item")
        left = len(items)
        try:
            for i, inputs in enumerate(items):
                pool.submit(run_one, i, inputs).add_done_callback(partial(lambda i, fut: events.put((i, fut)), i))
            while left:
                try:
                    i, fut = events.get(timeout=0.2)
                except queue.Empty:
                    i, fut = -1, None
                if ctx.cancelled.is_set():
                    break
                if i < 0:
                    continue
                if fut is None:
                    yield Emit("started", {"index": i})
                    continue
                left -= 1
                try:
                    data = {"index": i, "ok": True, "result": fut.result(), "worker": worker, **version}
                except BaseException as exc:  # SystemExit, KeyboardInterrupt... from user code: this item's error
                    data = {"index": i, "ok": False, "worker": worker, "error": _item_error(exc)}
                if not left and kept is not None and data["ok"]:  # the last item: the kernel warns once
                    data["result"] = _with_state(data["result"], kept.copy_changed(shared, start), defined)
                results[i] = _without_history(data)  # the item chunk brings it: the shard's result need not
                yield Emit("item", data)
        finally:  # a cancelled call does not wait for its items still running (their slots are given back)
            pool.shutdown(wait=False, cancel_futures=True)
    ok = sum(1 for r in results if r and r["ok"])
    total: dict[str, Any] = {}
    cost: float | None = None
    for r in results:
        if r and r["ok"]:
            typed.add_usage(total, r["result"].get(typed.USAGE, {}))
            cost = typed.add_cost(cost, typed.cost(r["result"]))
    return {"results": results, "ok": ok, "failed": len(items) - ok, typed.USAGE: total,
            **({typed.COST: cost} if cost is not None else {})}
