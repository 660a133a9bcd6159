"""The tool registry: a tool is a plain function (unary) or a generator (streaming).

Register one with ``@tool``. Its argument schema is derived from the signature and
type hints, and every call is validated against it before the tool runs. A tool that
takes a parameter named ``ctx`` receives the :class:`ToolContext` of the call.

A generator tool yields :class:`Emit` values (tokens, items, status lines) and
``return``s its final result; a plain function just returns it. Either kind can be
called through ``Execute`` (only the final result comes back) or ``ExecuteStream``.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import os
import threading
import time
import typing
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from dspex_nb.errors import ArgumentError, UnknownTool
from dspex_nb.schema import type_name, validate

EMIT_KINDS = frozenset({"token", "item", "started", "status"})  # the call adds the error and final chunks


@dataclass(slots=True)
class Emit:
    """One chunk a generator tool sends before its final result. (Not frozen: a stream makes one per chunk,
    and a frozen dataclass takes four times as long to make.)"""

    kind: str
    data: dict[str, Any]

    def __post_init__(self) -> None:
        if self.kind not in EMIT_KINDS:
            raise ValueError(f"a tool emits token, item, started or status chunks, not {self.kind!r}")


class CancelEvent:
    """A call's cancellation: ``is_set`` / ``set`` / ``wait`` as a ``threading.Event``'s, and what was registered
    with ``on_set`` runs once it is set. Every call has one, and few wait on it: the Event behind ``wait`` is
    made by the first that does (a threading.Event is a good part of a small call's time on the worker)."""

    __slots__ = ("set_at", "_hooks", "_lock", "_event")

    def __init__(self) -> None:
        self.set_at: float | None = None  # time.monotonic() of the cancel
        self._hooks: list[Callable[[], Any]] = []
        self._lock = threading.Lock()
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        return self.set_at is not None

    def wait(self, timeout: float | None = None) -> bool:
        with self._lock:
            if self.set_at is not None:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def on_set(self, hook: Callable[[], Any]) -> None:
        """Run ``hook`` when the call is cancelled (now, if it already is)."""
        with self._lock:
            if self.set_at is None:
                self._hooks.append(hook)
                return
        hook()

    def set(self) -> None:
        with self._lock:
            if self.set_at is None:
                self.set_at = time.monotonic()
            event, hooks, self._hooks = self._event, self._hooks, []
        if event is not None:
            event.set()
        for hook in hooks:
            hook()


@dataclass
class ToolContext:
    """What a running tool may know about its call."""

    streaming: bool
    cancelled: CancelEvent = field(default_factory=CancelEvent)
    session_id: str = ""
    worker: Any = None  # the WorkerState: LM, counters
    lm_state: list[dict[str, Any]] = field(default_factory=list)  # where the call failed, the changes its LMs made
    # as they answered before (dspy_tools._LMStates): they come back with its error, as with a result

    def program_running(self) -> contextlib.AbstractContextManager[None]:
        """Around code of the program's: the worker counts it as running, and after a cancel, as going on."""
        return self.worker.running(self.cancelled)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the call was cancelled meanwhile."""
        return self.cancelled.wait(seconds)

    def keep(self, tool: str, obj: Any) -> str:
        """Keep ``obj`` on this worker for the call's session; return the handle that finds it again."""
        return self.worker.sessions.keep(tool, self.session_id, obj)

    def resolve(self, tool: str, handle: str) -> Any:
        """The object a handle of this session stands for (a clear ArgumentError when it is gone)."""
        return self.worker.sessions.resolve(tool, self.session_id, handle)


@dataclass
class Tool:
    name: str
    func: Callable[..., Any]
    description: str
    params: dict[str, inspect.Parameter]
    hints: dict[str, Any]
    wants_ctx: bool
    streaming: bool
    open_ended: bool  # takes **kwargs: any extra argument is accepted
    _schema: dict[str, Any] | None = field(default=None, repr=False)

    def schema(self) -> dict[str, Any]:
        """Name, description, whether it streams, and each argument's type and required/default (made once:
        every call is checked against it)."""
        if self._schema is None:
            self._schema = self._make_schema()
        return self._schema

    def _make_schema(self) -> dict[str, Any]:
        args = {}
        for name, param in self.params.items():
            spec: dict[str, Any] = {"type": type_name(self.hints.get(name, Any))}
            if param.default is inspect.Parameter.empty:
                spec["required"] = True
            else:
                spec["default"] = param.default
            args[name] = spec
        return {"name": self.name, "description": self.description, "streaming": self.streaming,
                "open": self.open_ended, "args": args}

    def run(self, args: dict[str, Any], ctx: ToolContext) -> Generator[Emit, None, Any]:
        """Validate ``args``, then yield the tool's Emits and return its final result."""
        if not self.streaming:
            return self.call(args, ctx)
        validate(self.schema(), args)
        return (yield from self.func(**(dict(args, ctx=ctx) if self.wants_ctx else args)))

    def call(self, args: dict[str, Any], ctx: ToolContext) -> Any:
        """Validate ``args`` and return what a plain (not a generator) tool returns."""
        validate(self.schema(), args)
        return self.func(**(dict(args, ctx=ctx) if self.wants_ctx else args))


REGISTRY: dict[str, Tool] = {}


def tool(func: Callable[..., Any] | None = None, *, name: str | None = None,
         description: str | None = None) -> Any:
    """Register ``func`` as a tool (usable bare, ``@tool``, or as ``@tool(name=...)``)."""
    def register(f: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(f)
        hints = typing.get_type_hints(f)
        params = {n: p for n, p in signature.parameters.items()
                  if n != "ctx" and p.kind is not inspect.Parameter.VAR_KEYWORD}
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        doc = description or (inspect.getdoc(f) or "").split("\n\n")[0]
        tool_name = name or f.__name__
        REGISTRY[tool_name] = Tool(tool_name, f, doc, params, hints, "ctx" in signature.parameters,
                                   inspect.isgeneratorfunction(f), open_ended)
        return f
    return register(func) if func is not None else register


def get_tool(name: str) -> Tool:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownTool(name, "UnknownTool",
                          f"no tool named {name!r}; available tools: {', '.join(sorted(REGISTRY))}") from None


@tool
def echo(**kwargs: Any) -> dict[str, Any]:
    """Return the arguments unchanged."""
    return kwargs


@tool
def whoami(ctx: ToolContext) -> dict[str, Any]:
    """This worker's id, pid and the session id of the call."""
    return {"worker": ctx.worker.worker_id, "pid": os.getpid(), "session": ctx.session_id}


@tool
def fail(message: str, type: str = "RuntimeError") -> None:
    """Raise a built-in exception class (``type``, e.g. "ValueError") with ``message``: exercises error reporting."""
    cls = vars(builtins).get(type)
    if not (isinstance(cls, builtins.type) and issubclass(cls, BaseException)):
        raise ArgumentError("fail", "ArgumentError", f"argument 'type' must name a built-in exception, got {type!r}")
    raise cls(message)


@tool
def session_put(ctx: ToolContext, value: Any) -> dict[str, str]:
    """Keep a JSON value (e.g. a loaded dataset) on this worker for the session; returns its handle."""
    return {"handle": ctx.keep("session_put", value)}


@tool
def session_get(ctx: ToolContext, handle: str) -> dict[str, Any]:
    """The value behind a handle of this session."""
    return {"value": ctx.resolve("session_get", handle)}


@tool
def close_session(ctx: ToolContext) -> dict[str, int]:
    """End the call's session: its objects are dropped and its handles stop working."""
    return {"dropped": ctx.worker.sessions.close(ctx.session_id)}


@tool
def sleep(ctx: ToolContext, seconds: float) -> dict[str, Any]:
    """Wait ``seconds``, or less when the call is cancelled."""
    cancelled = ctx.wait(seconds)
    return {"slept": seconds, "cancelled": cancelled}


@tool
def count(ctx: ToolContext, n: int, delay: float = 0.0) -> Iterator[Emit]:
    """Stream ``n`` item chunks {"index": i} (``delay`` seconds apart); the final result is {"count": n}."""
    for i in range(n):
        if delay and ctx.wait(delay):
            return {"count": i}
        yield Emit("item", {"index": i})
    return {"count": n}
