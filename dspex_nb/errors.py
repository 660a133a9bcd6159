"""Exceptions shared by the kernel side and the workers (standard library only)."""

from __future__ import annotations

import builtins
import contextlib
import functools
import inspect
import sys
import traceback
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar


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
        self._shown = self.args[0]  # what str() gives; the program's message where it is raised as its own class

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A ToolError made for a program's exception class (``_combined``) is not a subclass of the program's: its
        class's ``__init_subclass__`` (one that registers each subclass by name, or refuses them) does not run, so
        an error that came back changes nothing of the kernel's classes."""
        if "_program_class" not in vars(cls):
            super().__init_subclass__(**kwargs)

    def __str__(self) -> str:  # not the other class's (KeyError quotes its message)
        return self._shown

    def __reduce__(self) -> tuple[Any, ...]:
        """Copies and pickles as the error it is, with its args, attributes and notes; one that is also the
        program's class (``remote_error``) refers to that class, and is made again from it where it is loaded."""
        fields = (self.tool, self.type, self.message, self.remote_traceback, self.worker)
        return _restored, (getattr(type(self), "_program_class", type(self)), fields, self.args, dict(vars(self)))


F = TypeVar("F", bound=Callable[..., Any])


def program_errors_raised_here(method: F) -> F:
    """A program's error (a ToolError that came back from a worker, with its traceback there) leaves ``method``
    without dspex_nb's own frames below it: the kernel's traceback then reads as the program's would where it ran,
    the caller's code and then the note with the worker's traceback, not the pool's machinery. Any other error
    (one of dspex_nb's own) keeps its whole traceback."""
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def awaited_here(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except ToolError as error:
                raise _without_our_frames(error)  # noqa: B904
        return awaited_here  # type: ignore[return-value]

    @functools.wraps(method)
    def raised_here(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except ToolError as error:
            raise _without_our_frames(error)  # noqa: B904
    return raised_here  # type: ignore[return-value]


def _without_our_frames(error: ToolError) -> ToolError:
    """A program's error (its traceback there is in the note) without a traceback; any other, as it is."""
    return error.with_traceback(None) if error.remote_traceback else error


class UnknownTool(ToolError):
    """The tool name is not registered on the worker; the message lists the tools."""


class ArgumentError(ToolError, TypeError):
    """An argument is missing, unexpected, of the wrong type or has a bad value."""


class NotSent(ArgumentError):
    """The kernel could not send a program or a value to the workers (it cannot be pickled): no worker ran anything,
    so its message is the kernel's reason alone, not a worker tool's failure."""

    def __init__(self, tool: str, type: str, message: str, remote_traceback: str = "", worker: str = "") -> None:
        super().__init__(tool, type, message, remote_traceback, worker)
        self.args = (message,)
        self._shown = message


class MessageTooLarge(DspexError, ValueError):
    """A request or reply is over the gRPC message limit."""


class ResultTooLarge(ToolError, MessageTooLarge):
    """The worker's reply would be over the message limit."""


REMOTE_ERROR_TYPES: dict[str, type[ToolError]] = {
    "UnknownTool": UnknownTool,
    "ArgumentError": ArgumentError,
    "ResultTooLarge": ResultTooLarge,
}


LM_STATE = "_dspex_lm_state"  # on an error from the pool: the changes its program's LMs made before it failed


def remote_error(tool: str, info: Mapping[str, Any], worker: str = "") -> ToolError:
    """``_remote_error``, with the changes the program's LMs made before it failed (``LM_STATE``), which
    ``programs.keep_failed_lm_state`` sets on the kernel's LMs."""
    error = _remote_error(tool, info, worker)
    if info.get("lm_state"):
        with contextlib.suppress(Exception):  # a class of the program's that refuses attributes: they are lost
            setattr(error, LM_STATE, info["lm_state"])
    return error


TIMEOUT_CLASS = "dspex_nb.errors:CallTimeout"  # a call's timeout, as its worker reports it (``worker.calls.Deadline``)


def call_error(tool: str, info: Mapping[str, Any], worker: str = "") -> DspexError:
    """The error a call ended with on its worker: its timeout, which the worker keeps, as the ``CallTimeout`` it
    is; else what the tool raised (``remote_error``)."""
    if list(info.get("bases", ()))[:1] == [TIMEOUT_CLASS]:
        return CallTimeout(info["message"])
    return remote_error(tool, info, worker)


def _remote_error(tool: str, info: Mapping[str, Any], worker: str = "") -> ToolError:
    """The error the worker reported (``info``: its ``type``, ``message``, ``traceback``, ``bases``,
    ``attributes`` and ``args``, as the worker's ``error_info`` gives them), as the most specific ToolError.

    An exception of the program comes back as a ToolError that is also the first of its classes (``bases``,
    "module:qualname") that the kernel has imported, so ``except ValueError`` or ``except
    dspy.utils.exceptions.AdapterParseError`` catches it as in the kernel. Where that is its own class, it reads
    as the kernel's would: its class's name, ``str(e)``, ``e.args`` (where they are plain JSON values its str()
    shows); raised as a class it derives from, its message names its class (``tool 'run_module' failed on worker
    w0: CodedError: 7``).
    Either way it has the exception's plain ``attributes`` (``e.code``, an AdapterParseError's ``lm_response``, an
    LM error's ``status_code``, an OSError's ``errno``) where they do not clash with the ToolError's own (``tool``,
    ``message``...), and a note (shown under its traceback) that names the worker and gives the traceback there.
    A class whose repr or traceback needs what its own constructor sets, and the attributes do not give, is
    passed over for the next (urllib's HTTPError without its response), as is one that refuses its args (a read-only
    ``args``, a ``__setattr__`` of its own), or has a metaclass of its own (whose code would run for the ToolError
    class); one that refuses the note is raised without it. The class's ``__init_subclass__`` does not run for the
    ToolError class, so no registry of its subclasses changes."""
    from dspex_nb import redact  # the kernel masks too: its environment is the workers'

    type_ = info["type"]
    fields = (tool, type_, redact.text(info["message"], limit=None), redact.text(info.get("traceback", ""), limit=None),
              worker)  # the worker cut them
    if type_ in REMOTE_ERROR_TYPES:
        return REMOTE_ERROR_TYPES[type_](*fields)
    attributes = redact.mapping(dict(info.get("attributes") or {}))
    bases = list(info.get("bases", ()))
    if info.get("group") and _ToolErrorGroup is not None:
        return _noted(_with_attributes(_group_error(fields, info["group"], bases[:1] == ["builtins:ExceptionGroup"]),
                                       attributes))
    own = _as_tool_error(bases[0]) if bases else None
    for cls in filter(None, map(_as_tool_error, bases)):
        try:  # the class's own code runs here (a read-only args, a __setattr__ that refuses): then the next class
            error = _with_attributes(cls(*fields), attributes)
            if cls is own:  # its own class: as it reads where it was raised
                error._shown = error.message
                error.args = tuple(redact.mapping(info["args"])) if info.get("args") is not None else (error.message,)
            repr(error)
            traceback.format_exception(error)
        except Exception:
            continue
        return _noted(error)
    return _noted(_with_attributes(ToolError(*fields), attributes))


def _group_error(fields: tuple[str, ...], group: Mapping[str, Any], own: bool) -> ToolError:
    """The program's exception group (``group``: its ``message`` and its ``exceptions``' infos), as an ExceptionGroup
    that is also a ToolError, its sub-exceptions rebuilt as ``remote_error`` rebuilds any (a BaseException among them
    as a ToolError, so the group is an ExceptionGroup, as ``BaseExceptionGroup(...)`` of Exceptions is). Not its own
    class (a BaseExceptionGroup, a subclass of the program's), its message names that class, as other errors' do."""
    from dspex_nb import redact  # the kernel masks too: its environment is the workers'

    tool, type_, _, _, worker = fields
    exceptions = [remote_error(tool, sub, worker) for sub in group["exceptions"]]
    message = redact.text(group["message"], limit=None)
    where = f" on worker {worker}" if worker else ""
    return _ToolErrorGroup(fields, message if own else f"tool '{tool}' failed{where}: {type_}: {message}", exceptions)


def one_line(error: BaseException) -> str:
    """``error`` as the last line of its traceback reads (``ValueError: boom``); a dspex_nb error that is not
    also a program's exception class, as its message alone, which says what failed."""
    if isinstance(error, DspexError) and not hasattr(type(error), "_program_class"):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _noted(error: ToolError) -> ToolError:
    """``error`` with a note that names its worker and tool, and gives the worker's traceback."""
    where = f"on worker {error.worker}" if error.worker else "on the pool"
    note = f"raised {where} (dspex_nb tool '{error.tool}')"
    if error.remote_traceback:
        note += "; the traceback there:\n" + error.remote_traceback.rstrip("\n")
    add_note(error, note)
    return error


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``, also before Python 3.11 (which shows no note, but keeps it in ``__notes__``); none
    where the error's class refuses it (a ``__notes__`` or ``__setattr__`` of its own): the error is still raised."""
    with contextlib.suppress(Exception):  # whatever that code raises
        error.__notes__ = [*getattr(error, "__notes__", ()), note]


def builtin_fields(cls: type) -> tuple[str, ...]:
    """The public fields that Python's own exception classes among ``cls``'s define in C, rather than in the
    instance's ``__dict__`` (an OSError's ``errno`` and ``filename``, an ImportError's ``name``), ``args`` aside.
    Not cached (a few microseconds): a cache by class kept every class of the user's, and its module, alive."""
    return tuple(name for base in cls.__mro__ if base.__module__ == "builtins" for name, attr in vars(base).items()
                 if not name.startswith("_") and name != "args"
                 and isinstance(attr, (types.MemberDescriptorType, types.GetSetDescriptorType)))


def _with_attributes(error: ToolError, attributes: dict[str, Any]) -> ToolError:
    """``error`` with ``attributes`` set, except those with private names or that it has already (other than the
    fields of its built-in classes, ``builtin_fields``)."""
    for name, value in attributes.items():
        if name.isidentifier() and not name.startswith("_") and (
                inspect.getattr_static(error, name, _NONE) is _NONE or name in builtin_fields(type(error))):
            with contextlib.suppress(AttributeError, TypeError):  # a class that takes no new attributes
                setattr(error, name, value)
    return error


_NONE = object()
_PLAIN_METACLASSES = ("builtins", "abc")  # modules of metaclasses that make classes and nothing else (type, ABCMeta)
_NOT_RAISED_AS = (StopIteration, StopAsyncIteration, Warning,  # classes that mean something else when raised
                  *(vars(builtins).get("BaseExceptionGroup", ()),))  # a group is its exceptions (Python 3.11+)


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
    if any(name in vars(meta) for meta in type(base).__mro__ if meta.__module__ not in _PLAIN_METACLASSES
           for name in ("__new__", "__init__", "__call__")):
        return None  # a metaclass of its own: its code (a registry of classes) would run for the ToolError class
    return _tool_error_for(base)


@functools.lru_cache(maxsize=256)  # bounded: each holds its program's class (and module) alive
def _tool_error_for(base: type) -> type[ToolError] | None:
    """``_combined(base)``, the same class each time ``base``'s errors come back (while it is among the last 256)."""
    return _combined(base)


def _restored(cls: type, fields: tuple[str, ...], args: tuple[Any, ...], state: dict[str, Any]) -> ToolError:
    """A copied or unpickled ToolError (``ToolError.__reduce__``): ``cls`` is a ToolError class, or the
    program's exception class it was also; where that cannot be made again, the plain ToolError that
    ``remote_error`` gives for such a class, with the attributes and notes."""
    made = cls if issubclass(cls, ToolError) else _tool_error_for(cls)
    if made is not None:
        try:  # the class's own code runs here (a read-only args, a __setattr__ that refuses)
            error = made(*fields)
            error.args = args
        except Exception:
            pass
        else:
            vars(error).update(state)
            return error
    error = ToolError(*fields)  # not the program's class, so its message names that class, as remote_error's does
    vars(error).update({name: value for name, value in state.items() if name != "_shown"})
    return error


def _combined(base: type) -> type[ToolError] | None:
    """A ToolError that is also ``base``, where one can be made as any ToolError; None for a class that cannot
    be combined (its instance layout, a final class, one refusing attributes)."""
    try:
        combined = type(base.__name__, (ToolError, base), {
            "__module__": base.__module__, "__qualname__": base.__qualname__, "_program_class": base})
        combined("", "", "")
    except Exception:
        return None
    return combined


_EXCEPTION_GROUP: Any = vars(builtins).get("ExceptionGroup")  # Python 3.11+
_ToolErrorGroup: Any = None
if _EXCEPTION_GROUP is not None:
    class _ToolErrorGroup(ToolError, _EXCEPTION_GROUP):  # type: ignore[no-redef]
        """A program's exception group (``_group_error``): ``except* ValueError`` catches its sub-exceptions as in
        the kernel. Its ``message`` is the group's (as an ExceptionGroup's), and the groups ``split``, ``subgroup``
        and ``except*`` derive from it are such groups too (with its fields)."""

        _program_class = _EXCEPTION_GROUP

        def __new__(cls, fields: tuple[str, ...], message: str, exceptions: list[BaseException]) -> Any:
            return super().__new__(cls, message, exceptions)

        def __init__(self, fields: tuple[str, ...], message: str, exceptions: list[BaseException]) -> None:
            # not ToolError's: an ExceptionGroup's ``message`` and ``args`` are its own (read-only)
            self.tool, self.type, _, self.remote_traceback, self.worker = fields

        __str__ = _EXCEPTION_GROUP.__str__

        def _fields(self) -> tuple[str, ...]:
            return self.tool, self.type, self.message, self.remote_traceback, self.worker

        def derive(self, excs: Any) -> Any:
            return _ToolErrorGroup(self._fields(), self.message, list(excs))

        def __reduce__(self) -> tuple[Any, ...]:
            return _group_restored, (self._fields(), self.message, list(self.exceptions), dict(vars(self)))

    _ToolErrorGroup.__name__ = _ToolErrorGroup.__qualname__ = "ExceptionGroup"  # as tracebacks name its class
    _ToolErrorGroup.__module__ = "builtins"


def _group_restored(fields: tuple[str, ...], message: str, exceptions: list[BaseException],
                    state: dict[str, Any]) -> ToolError:
    """A copied or unpickled ``_ToolErrorGroup``."""
    error = _ToolErrorGroup(fields, message, exceptions)
    vars(error).update(state)
    return error


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


class ChunksDropped(UserWarning):
    """An iteration of a ``Run`` fell more than its ``keep_chunks`` behind: the oldest of those were dropped."""


class CallbacksNotRun(UserWarning):
    """The kernel's DSPy callbacks do not see a call that runs on the pool."""


class LMStateNotKept(UserWarning):
    """An LM changed its own attributes as it answered on the pool (DSPy's ``DummyLM`` given a list, an LM counting
    its calls), and the kernel's LM cannot take that change: in a batch (each worker changes a copy of its own), or
    where the new values cannot travel (the pool then refuses that LM's next calls, saying why), or where another
    call on the pool changed it after this one was sent."""


class StateNotKept(UserWarning):
    """A program changed its own state as it ran on the pool (an attribute of one of its modules, a dict or list of
    the notebook that its code adds to): the change stays on the worker's copy, which the worker then drops, and the
    kernel's program is as it was, so the next call starts from that state, not from the changed one as in the
    kernel. Shown once per program and pool."""


def warn_kept(message: str, category: type[Warning], stacklevel: int) -> None:
    """``warnings.warn`` about a result that exists, which must not cost it: it never raises, where a filter makes
    warnings errors (``warnings.simplefilter("error")``, pytest's ``-W error``) or the kernel's ``showwarning``
    fails. Raised in the thread keeping a batch item, it lost that computed item (the journal's warning, the
    ``LMStateNotKept`` of an LM that changed as it answered)."""
    with contextlib.suppress(Exception):
        warnings.warn(message, category, stacklevel=stacklevel + 1)


class TraceIncomplete(UserWarning):
    """Predictor calls of a program on the pool that cannot join the kernel's DSPy trace (``dspy.settings.trace``)."""


class PoolLMDiffers(UserWarning):
    """The kernel's configured DSPy LM (``dspy.configure``) is not the pool's: a call on the pool runs on the pool's
    LM (``Pool(lm=...)``). One that ``dspy.context(lm=...)`` sets travels with the call instead."""


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
