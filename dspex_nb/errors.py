"""Exceptions shared by the kernel side and the workers (standard library only)."""

from __future__ import annotations


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
        super().__init__(f"tool '{tool}' failed{where}: {type}: {message}")


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
                 worker: str = "") -> ToolError:
    """The most specific ToolError subclass for an error the worker reported."""
    from dspex_nb import redact  # the kernel masks too: its environment is the workers'

    cls = REMOTE_ERROR_TYPES.get(type, ToolError)
    return cls(tool, type, redact.text(message), redact.text(remote_traceback, limit=None), worker)


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
