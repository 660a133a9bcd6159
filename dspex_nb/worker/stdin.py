"""A worker's stdin: the pipe from its parent, which it watches, kept away from the programs it runs."""

from __future__ import annotations

import io
import os
import sys


class NoInput(io.TextIOBase):
    """A worker's ``sys.stdin``: nobody can answer ``input()`` on a worker, so reading fails at once, saying
    why, rather than waiting forever (a human-in-the-loop tool, say)."""

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        raise EOFError("input() has no one to answer it on a dspex_nb worker (a program on the pool cannot read "
                       "from the notebook); run the program in the kernel, or pass the answer as an input")

    read = readline  # type: ignore[assignment]


def take_stdin() -> io.BufferedReader | None:
    """This process's stdin (the pipe from its parent, which it watches; None if it has none), leaving
    /dev/null as file 0 and ``NoInput`` as ``sys.stdin`` for the programs it runs. Called before anything
    else opens a file, so file 0 is never another's (gRPC's epoll, say)."""
    try:
        pipe: io.BufferedReader | None = os.fdopen(os.dup(0), "rb")
    except OSError:  # started with stdin closed
        pipe = None
    devnull = os.open(os.devnull, os.O_RDONLY)  # file 0 itself when stdin was closed
    if devnull != 0:
        os.dup2(devnull, 0)
        os.close(devnull)
    sys.stdin = NoInput()
    return pipe
