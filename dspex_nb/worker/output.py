"""A worker's ``sys.stdout`` and ``sys.stderr``: its log, whose failures never fail the program that prints, and the
text a call's threads write there, which goes back to the kernel with the call (``CallOutput``)."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from dspex_nb import redact
from dspex_nb.wire import LOGS, WARNINGS, valid_text

OUTPUT_LIMIT = 2**20  # characters of one call's output that go back to the kernel; the rest is in the log only
WARNED_AGAIN = 100  # times one call sends one warning made again and again (under the kernel's "always" filter)
HELD = 64 * 1024  # characters of a line held for its end (CallOutput) before part of it goes anyway
Send = Callable[[str, str], None]  # (stream name, text): where a call's output goes as it is written


class CallOutput:
    """What one call's threads write to ``sys.stdout`` / ``sys.stderr`` (``LogStream.write`` hands it here while
    ``CALL_OUTPUT`` holds it), given to ``send`` as it comes, up to ``OUTPUT_LIMIT`` characters: past it one line
    on stderr says where the rest is, the worker's log. A stream's text goes a line (or a ``\r`` progress step) at a
    time, as a terminal's stdout does, so that a secret printed in pieces (``print(key[:10], end="")``, then the
    rest) reaches the masking (``redact.text``, where the text is made a chunk) whole: the rest of a line goes when
    the call ends, or, past ``HELD`` characters, masked and up to its last space. Nothing is sent once the call has
    ended (``close``): a thread it left running writes to the log only."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._room = OUTPUT_LIMIT
        self._capped = False
        self._lock = threading.Lock()
        self._open = True
        self._held: dict[str, list[str]] = {}  # each stream's text not yet sent
        self._size: dict[str, int] = {}
        self._warned: collections.Counter[tuple[Any, ...]] = collections.Counter()

    def repeated(self, warning: tuple[Any, ...]) -> bool:
        """Whether this call has sent ``warning`` (its message, category, file and line) ``WARNED_AGAIN`` times: a
        warning made in a loop of 100,000 goes back that often, and the call's other output is not lost past
        ``OUTPUT_LIMIT``."""
        with self._lock:
            self._warned[warning] += 1
            return self._warned[warning] > WARNED_AGAIN

    def write(self, stream: str, text: str) -> None:
        with self._lock:
            if not self._open or not self._room or not text:
                return
            held = self._held.setdefault(stream, [])
            size = self._size.get(stream, 0)
            room = max(self._room + redact.SECRET_ROOM - size, 0)  # past it, text can never go: none is held
            held.append(text[:room])
            self._size[stream] = size + len(held[-1])
            if len(text) > room:
                self._release(stream, len)
                self._cap()
            elif "\n" in text or "\r" in text:
                self._release(stream, lambda whole: max(whole.rfind("\n"), whole.rfind("\r")) + 1)
            elif self._size[stream] > HELD:
                self._release(stream, _up_to_a_space, masked=True)

    def close(self) -> None:
        with self._lock:
            for stream in list(self._held):
                self._release(stream, len)
            self._open = False

    def _release(self, stream: str, ready: Callable[[str], int], masked: bool = False) -> None:
        """Send the stream's text held up to where ``ready`` says, within the call's room; hold the rest. Text cut
        within a line is masked before it is cut (the rest held is masked again with the text that follows it,
        which masks a secret whose start it holds)."""
        if not self._room or not self._size.get(stream):
            return
        whole = "".join(self._held[stream])
        if masked:
            whole = redact.text(whole, limit=None)
        end = ready(whole)
        self._held[stream], self._size[stream] = [whole[end:]], len(whole) - end
        if end:
            text = whole[:end]
            if len(text) > self._room:
                text = redact.text(text, limit=None)[:self._room]
            self._room -= len(text)
            self._send(stream, text)
            if not self._room:
                self._cap()

    def _cap(self) -> None:
        """Past the room: say so, once, and send no more."""
        self._room = 0
        if not self._capped:
            self._capped = True
            self._send("stderr", f"\n[dspex: this call printed more than {OUTPUT_LIMIT // 2**20} MB; the rest is "
                                 f"in the worker's log only: {log_path()}]\n")


def masked(stream: str, text: str) -> str:
    """A stream's text with its secrets masked (``redact``): that of the warnings and log records streams, JSON a
    line, value by value, so that it stays JSON (a secret-named number, or a quote a masked value leaves open, would
    else run to the line's end)."""
    if stream not in (WARNINGS, LOGS):
        return redact.text(text, limit=None)
    lines = []
    for line in text.splitlines(keepends=True):
        try:
            lines.append(json.dumps(redact.mapping(json.loads(line)), ensure_ascii=False) + "\n")
        except ValueError:  # cut (past the call's room): as text
            lines.append(redact.text(line, limit=None))
    return "".join(lines)


def _up_to_a_space(text: str) -> int:
    """How much of a long line can go: up to its last space, all but its last ``SECRET_ROOM`` characters at least."""
    return max(text.rfind(" ") + 1, text.rfind("\t") + 1, len(text) - redact.SECRET_ROOM)


CALL_OUTPUT: contextvars.ContextVar[CallOutput | None] = contextvars.ContextVar("dspex_call_output", default=None)


def log_path() -> str:
    """The file this worker's stderr goes to (its log), or words saying so where it cannot be read."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.readlink(f"/proc/self/fd/{sys.stderr.fileno()}")
    return "see the worker's log_path"


class LogStream:
    """A log stream whose writes cannot raise: where the log cannot be written (a full disk, as a full tmpfs runtime
    directory), the text is dropped, and a line says how much once the log takes text again. In the kernel the same
    ``print`` goes to the notebook and succeeds; on the worker it must not cost the call its result. ``close`` only
    flushes: the log is the worker's, and a program that closes ``sys.stdout`` must not fail every later call on the
    worker that prints. Everything else (``fileno``, ``buffer``, ``isatty``...) is the stream's own."""

    def __init__(self, stream: TextIO, name: str) -> None:
        self._stream = stream
        self._name = name  # stdout or stderr: the stream a call's output (``CallOutput``) names
        self._lost = 0  # characters dropped since the log last took text
        self._why = ""

    def write(self, text: str) -> int:
        text = valid_text(text)  # a lone surrogate, which the log's encoder and the kernel's stdout refuse, escaped
        call = CALL_OUTPUT.get()
        if call is not None:
            call.write(self._name, text)
        try:
            if self._lost:
                self._stream.write(f"\n[dspex: {self._lost} characters of output lost here: the log could not be "
                                   f"written ({self._why})]\n")
                self._lost = 0
            return self._stream.write(text)
        except OSError as exc:
            self._lost += len(text)
            self._why = exc.strerror or type(exc).__name__
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.flush()

    def close(self) -> None:
        self.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def spare_output() -> None:
    """Make this process's ``sys.stdout`` and ``sys.stderr`` ``LogStream``s (where they are streams), also in the
    ``logging`` handlers that write to them (one made before this, as by a library the template imported); a call's
    warnings and log records go back to the kernel (``forward_warnings``, ``forward_log_records``)."""
    forward_warnings()
    forward_log_records()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, LogStream):
            setattr(sys, name, LogStream(stream, name))
            for handler in _stream_handlers():
                if handler.stream is stream:
                    handler.setStream(getattr(sys, name))


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(logger for logger in list(logging.Logger.manager.loggerDict.values())
                                      if isinstance(logger, logging.Logger))]
    return [handler for logger in loggers for handler in logger.handlers if isinstance(handler, logging.StreamHandler)]


def forward_warnings() -> None:
    """A warning a call's program makes goes back to the kernel, which warns it there as its own code would
    (``pool.calls.warn_here``): the kernel's filters and once-per-place registry decide whether it shows, and
    ``warnings.catch_warnings(record=True)`` or ``pytest.warns`` there see it. So every warning passes this worker's
    own filters (a filter the program sets inside itself still applies). One made outside a call, written to a file
    of the program's, or made in the worker's own code (DSPy attributes its deprecations to the first frame outside
    DSPy, which is the worker's where the program is a DSPy module) is written to the log only."""
    warnings.simplefilter("always")
    shown = warnings.showwarning

    def showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        call, module = CALL_OUTPUT.get(), _module_at(filename, lineno)
        if call is None or file is not None or (module or "").partition(".")[0] == "dspex_nb":
            with _log_only():  # DSPy names the frame that called it: here the worker's
                shown(message, category, filename, lineno, file, line)
            return
        if call.repeated((str(message), category, filename, lineno)):
            return  # the kernel has had it often enough from this call: the rest would fill the call's output
        classes = [f"{cls.__module__}:{cls.__qualname__}" for cls in category.__mro__ if issubclass(cls, Warning)]
        call.write(WARNINGS, json.dumps({"message": str(message), "category": classes, "filename": filename,
                                         "lineno": lineno, "module": module}, ensure_ascii=False) + "\n")

    warnings.showwarning = showwarning


def _module_at(filename: str, lineno: int) -> str | None:
    """The name of the module whose code at ``filename``:``lineno`` made the warning (the frame ``warnings.warn``'s
    ``stacklevel`` names), which the kernel's filters match; None where no frame of the stack is there."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename, frame.f_lineno) != (filename, lineno):
        frame = frame.f_back
    return None if frame is None else frame.f_globals.get("__name__")


def forward_log_records() -> None:
    """A record a call logs (DSPy's warnings, the program's own ``logging``) goes back to the kernel, which handles
    it there with the logger of its name (``pool.calls.log_here``): the kernel's levels, ``dspy.disable_logging()``,
    its handlers and formatters decide whether and how it shows, and pytest's ``caplog`` sees it; the worker's log
    keeps it too. A record this worker's levels leave unmade (a DEBUG one the kernel would show) does not come."""
    handle = logging.Logger.handle

    def forwarded(self: logging.Logger, record: logging.LogRecord) -> None:
        call = CALL_OUTPUT.get()
        made = None if call is None else _record(record)
        if call is None or made is None:
            handle(self, record)
            return
        call.write(LOGS, made)
        with _log_only():
            handle(self, record)

    logging.Logger.handle = forwarded  # type: ignore[method-assign]


def _record(record: logging.LogRecord) -> str | None:
    """The record as one JSON line (its message made, its exception as text), or None where it cannot be."""
    fields = {name: value for name, value in vars(record).items() if name not in ("args", "exc_info")}
    try:
        fields["msg"] = record.getMessage()
        if record.exc_info and not record.exc_text:
            fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
        return json.dumps(fields, ensure_ascii=False, default=str) + "\n"
    except Exception:
        return None


@contextlib.contextmanager
def _log_only() -> Iterator[None]:
    """What is written meanwhile goes to the worker's log only, not back to the kernel with the call."""
    token = CALL_OUTPUT.set(None)
    try:
        yield
    finally:
        CALL_OUTPUT.reset(token)
