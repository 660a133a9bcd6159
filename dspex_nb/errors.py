"""Exceptions shared by the kernel side and the workers (standard library only)."""

from __future__ import annotations

import builtins
import contextlib
import inspect
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any


class DspexError(Exception):
    """Base class of every dspex_nb error."""


class ToolError(DspexError):
    """A tool failed on its worker; ``type`` and ``remote_traceback`` come from there."""

    def __init__(self, tool: str, type: str, message: str, remote_traceback: str = "",
                 worker: str = "") -> None:
        self.tool = tool
        self.type = type
        self.message = message
        self.remote_traceback = remote_traceback
        self.worker = worker
        where = f" on worker {worker}" if worker else ""
        # Exception's own, not super()'s: a ToolError that is also the program's exception class (see
        # ``remote_error``) must not call that class's constructor, which takes other arguments
        Exception.__init__(self, f"tool '{tool}' failed{where}: {type}: {message}")

    def __str__(self) -> str:  # not the other class's (KeyError quotes its message)
        return str(self.args[0]) if self.args else ""


class UnknownTool(ToolError):
    """The tool name is not registered on the worker; the message lists the tools."""


class ArgumentError(ToolError, TypeError):
    """An argument is missing, unexpected, of the wrong type or has a bad value."""


class MessageTooLarge(DspexError, ValueError):
    """A request or reply is over the gRPC message limit."""


class ResultTooLarge(ToolError, MessageTooLarge):
    """The worker's reply would be over the message limit."""


REMOTE_ERROR_TYPES: dict[str, type[ToolError]] = {
    "UnknownTool": UnknownTool,
    "ArgumentError": ArgumentError,
    "ResultTooLarge": ResultTooLarge,
}


def remote_error(tool: str, type: str, message: str, remote_traceback: str = "",
                 worker: str = "", bases: Sequence[str] = (), attributes: Mapping[str, Any] | None = None) -> ToolError:
    """The most specific ToolError subclass for an error the worker reported: for an exception of the program,
    a ToolError that is also the first of its classes (``bases``, "module:qualname") that the kernel has
    imported, so ``except ValueError`` or ``except dspy.utils.exceptions.AdapterParseError`` catches it as in
    the kernel, with the exception's plain ``attributes`` (``e.code``, an AdapterParseError's ``lm_response``,
    an LM error's ``status_code``) where they do not clash with the ToolError's own (``tool``, ``message``...).
    A class whose repr or traceback needs what its own constructor sets, and the attributes do not give, is
    passed over for the next (urllib's HTTPError without its response)."""
    from dspex_nb import redact  # the kernel masks too: its environment is the workers'

    args = (tool, type, redact.text(message), redact.text(remote_traceback, limit=None), worker)
    attributes = redact.mapping(dict(attributes or {}))
    if type in REMOTE_ERROR_TYPES:
        return REMOTE_ERROR_TYPES[type](*args)
    for cls in filter(None, map(_as_tool_error, bases)):
        error = _with_attributes(cls(*args), attributes)
        try:
            repr(error)
            traceback.format_exception(error)
        except Exception:
            continue
        return error
    return _with_attributes(ToolError(*args), attributes)


def _with_attributes(error: ToolError, attributes: dict[str, Any]) -> ToolError:
    """``error`` with ``attributes`` set, except those with private names or that it has already."""
    for name, value in attributes.items():
        if name.isidentifier() and not name.startswith("_") and inspect.getattr_static(error, name, _NONE) is _NONE:
            with contextlib.suppress(AttributeError, TypeError):  # a class that takes no new attributes
                setattr(error, name, value)
    return error


_NONE = object()
_NOT_RAISED_AS = (StopIteration, StopAsyncIteration, Warning,  # classes that mean something else when raised
                  *(vars(builtins).get("BaseExceptionGroup", ()),))  # a group is its exceptions (Python 3.11+)
_AS_TOOL_ERROR: dict[type, type[ToolError] | None] = {}


def _as_tool_error(path: str) -> type[ToolError] | None:
    """A ToolError that is also the exception class at ``path`` ("module:qualname"), where it is an Exception
    class of a module imported here; None otherwise. Nothing is imported: modules' and
    classes' own namespaces are read, not their attributes."""
    module_name, _, qualname = path.partition(":")
    module = builtins if module_name == "builtins" else sys.modules.get(module_name)
    base: Any = None
    namespace: Any = vars(module) if module is not None else {}
    for part in qualname.split("."):
        base = namespace.get(part)
        namespace = vars(base) if isinstance(base, type) else {}
    if not isinstance(base, type) or not issubclass(base, Exception) or issubclass(base, (ToolError, *_NOT_RAISED_AS)):
        return None
    if any("__new__" in vars(cls) and cls.__module__ != "builtins" for cls in base.__mro__):
        return None  # its own __new__ takes its own arguments, not a ToolError's
    if base not in _AS_TOOL_ERROR:
        _AS_TOOL_ERROR[base] = _combined(base)
    return _AS_TOOL_ERROR[base]


def _combined(base: type) -> type[ToolError] | None:
    """A ToolError that is also ``base``, where one can be made as any ToolError; None for a class that cannot
    be combined (its instance layout, a final class, one refusing subclasses or attributes)."""
    try:
        combined = type("ToolError", (ToolError, base), {"__module__": __name__})
        combined("", "", "")
    except Exception:
        return None
    return combined


class WorkerDied(DspexError):
    """The worker running a call died or was replaced before the call finished."""


class WorkerStartError(DspexError):
    """A worker process could not be started or did not become ready."""


class CallTimeout(DspexError, TimeoutError):
    """A call did not finish within its ``timeout=``; the remote work was cancelled."""


class PoolClosed(DspexError):
    """The pool was shut down (or never started)."""


class Cancelled(DspexError):
    """The call was cancelled (``run.cancel()``, a callback that returned False, or Ctrl-C)."""


class CallbacksNotRun(UserWarning):
    """The kernel's DSPy callbacks do not see a call that runs on the pool."""


class TraceIncomplete(UserWarning):
    """Predictor calls of a program on the pool that cannot join the kernel's DSPy trace (``dspy.settings.trace``)."""


class PoolLMDiffers(UserWarning):
    """The kernel's DSPy LM is not the pool's: a call on the pool runs on the pool's LM (``Pool(lm=...)``)."""


class StopStream(Exception):
    """Raise it in an ``on_chunk`` callback to cancel the stream (as returning False does)."""


class PoolSaturated(DspexError):
    """The pool's queue of waiting calls is full (``max_queue``)."""


class QueueTimeout(DspexError, TimeoutError):
    """No worker had room for the call within ``queue_timeout`` seconds."""


class WorkerBusy(DspexError):
    """A session's worker is busy and its affinity is ``strict_fail_fast``."""


class ItemTimeout(DspexError):
    """An item of a batch ran for ``item_timeout`` seconds (or its worker did nothing for that long)."""
