"""A worker's ``sys.stdout`` and ``sys.stderr``: its log, whose failures never fail the program that prints."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, TextIO


class LogStream:
    """A log stream whose writes cannot raise: where the log cannot be written (a full disk, as a full tmpfs runtime
    directory), the text is dropped, and a line says how much once the log takes text again. In the kernel the same
    ``print`` goes to the notebook and succeeds; on the worker it must not cost the call its result. ``close`` only
    flushes: the log is the worker's, and a program that closes ``sys.stdout`` must not fail every later call on the
    worker that prints. Everything else (``fileno``, ``buffer``, ``isatty``...) is the stream's own."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lost = 0  # characters dropped since the log last took text
        self._why = ""

    def write(self, text: str) -> int:
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
    """Make this process's ``sys.stdout`` and ``sys.stderr`` ``LogStream``s (where they are streams)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, LogStream):
            setattr(sys, name, LogStream(stream))
