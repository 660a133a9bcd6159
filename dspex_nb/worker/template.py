"""A template process: imports dspy once, then forks a worker per request (``Pool(start="template")``).

A worker's start is mostly ``import dspy`` (about 0.4 CPU-seconds): forked from this process it
costs a few milliseconds, and the imported modules are shared copy-on-write between the workers.
Forking is safe because nothing here has started a thread or touched gRPC: each child imports
gRPC itself, after the fork, and then runs exactly what ``python -m dspex_nb.worker`` runs.

Protocol (one JSON object a line): on stdin ``{"id": n, "argv": [...], "env": {...}, "log": path}``
asks for a worker; on stdout ``{"id": n, "pid": p}`` answers it and ``{"exited": p, "status": code}``
reports a worker's end (a negative code: killed by that signal). Each child's stdin is a pipe whose other
end only this process holds, so when this process dies, however it dies, its workers exit too;
and this process exits when its own stdin (from the kernel) closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time
import traceback

from dspex_nb import deps
from dspex_nb.wire import EXIT_MISSING_DEPENDENCIES, KERNEL_ENV, kernel_gone


def _child(request: dict, watch: int, other_watches: list[int]) -> None:
    """In the forked child: become a worker (never returns)."""
    code = 1
    try:
        os.setsid()
        for fd in other_watches:
            os.close(fd)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)  # see trim_log
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(watch, 0)  # the worker's parent watch reads its stdin: this pipe
        os.environ.update(request["env"])
        from dspex_nb.worker.__main__ import main

        code = main(request["argv"])
    except BaseException:  # into the worker's log, where the pool looks when a start fails
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _status(raw: int) -> int:
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def _say(message: dict) -> None:
    """Tell the kernel; if it is gone (a broken pipe), there is no one to tell: go on regardless."""
    with contextlib.suppress(BrokenPipeError, OSError):
        print(json.dumps(message), flush=True)


def _end_all(watches: dict[int, int]) -> None:
    """Close every watch pipe (each worker exits on its own), wait for them a moment, kill the rest."""
    for fd in watches.values():
        os.close(fd)
    deadline = time.monotonic() + 5.0
    while watches and time.monotonic() < deadline:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.01)
            continue
        watches.pop(pid, None)
        _say({"exited": pid, "status": _status(raw)})
    for pid in watches:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def serve() -> int:
    sys.modules.setdefault("rfc3987_syntax", None)  # see dspex_nb.worker.__main__
    statuses = deps.report(("protobuf", "dspy")) + deps.report(("grpcio",), import_=False)  # gRPC after forks
    if not all(s.ok for s in statuses):
        print(deps.MISSING_MARKER + deps.as_json(statuses), file=sys.stderr, flush=True)
        return EXIT_MISSING_DEPENDENCIES
    import dspex_nb.worker.dspy_tools  # noqa: F401  (dspy and the tools: what every worker shares)

    _say({"ready": True})  # from now on a fork takes milliseconds: the kernel's fork timeout counts from here
    watches: dict[int, int] = {}  # child pid -> write end of its watch pipe
    pending = b""
    kernel = os.environ.get(KERNEL_ENV, "")
    while True:
        readable, _, _ = select.select([0], [], [], 0.2)
        if kernel and kernel_gone(kernel):  # the kernel ended without closing our stdin (its pipe is shared)
            _end_all(watches)
            return 0
        while True:  # reap every child that ended, and say so
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            os.close(watches.pop(pid))
            _say({"exited": pid, "status": _status(raw)})
        if not readable:
            continue
        data = os.read(0, 65536)
        if not data:  # the kernel is gone (or the pool shut down): so go the workers
            _end_all(watches)
            return 0
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            read_end, write_end = os.pipe()
            with contextlib.suppress(BrokenPipeError, OSError):
                sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                _child(request, read_end, list(watches.values()))
            os.close(read_end)
            watches[pid] = write_end
            _say({"id": request["id"], "pid": pid})


if __name__ == "__main__":
    sys.exit(serve())  # argv ("--run-id ID") only marks the process for stale cleanup
