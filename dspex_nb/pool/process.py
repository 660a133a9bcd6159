"""Spawn, watch and end one worker process.

Workers are started with subprocess (never fork: gRPC and fork do not mix), in their own
session (Ctrl-C in the kernel does not reach them), with a pipe on stdin: the worker exits
when that pipe closes, so even a SIGKILLed kernel leaves no orphans.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dspex_nb import deps, redact
from dspex_nb.errors import WorkerStartError
from dspex_nb.wire import KERNEL_ENV, kernel_spec, processes, start_time, started_by

PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
LOG_LIMIT = 8 * 2**20  # bytes a worker's log may reach before the pool cuts it to its end (its last LOG_KEEP)
LOG_KEEP = 2**20
TAIL_READ = 64 * 2**10  # bytes of a log's end read for the lines an error quotes


def open_log(path: str | os.PathLike[str]) -> int:
    """A new private log file for a process's output, opened for appending: each write goes to its end, also
    after ``trim_log`` cut it shorter meanwhile (a plain offset would write on past the cut, leaving a hole of
    that size)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)


def trim_log(path: Path, limit: int = LOG_LIMIT, keep: int = LOG_KEEP) -> bool:
    """Cut the log at ``path`` to its last ``keep`` bytes (from a line's start, after a line saying how much went)
    when it is over ``limit``: a program that prints without end fills neither the runtime directory (often a
    tmpfs, that is memory) nor the disk. The end is written over the start, then the file shortened, so a reader
    never finds it empty. True if it was cut."""
    try:
        with open(path, "r+b") as log:
            size = os.fstat(log.fileno()).st_size
            if size <= limit:
                return False
            log.seek(size - keep)
            tail = log.read(2 * keep)  # with what the worker appended meanwhile (bounded: it may append faster)
            start = tail.find(b"\n") + 1 if b"\n" in tail[:-1] else 0
            text = b"[dspex: %d bytes of output cut here: a worker's log keeps its last %d]\n" % (
                size - keep + start, keep) + tail[start:]
            log.seek(0)
            log.write(text)
            log.flush()
            log.truncate(len(text))
    except OSError:  # gone (the pool stopped), or not ours to cut: the next round tries again
        return False
    return True


def out_of_files(exc: BaseException, workers: int) -> WorkerStartError | None:
    """The error for a pool start that ran out of file descriptors (None where ``exc`` is not that): what ran out
    and what to do, in place of a bare "[Errno 24] Too many open files" from deep in subprocess or a socket, or a
    worker said to have exited where this process could no longer open its log or read its state in /proc."""
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        what = str(exc)
    elif isinstance(exc, WorkerStartError) and not _descriptor_left():
        what = "this process can open no more files"
    else:
        return None
    return WorkerStartError(f"starting {workers} worker(s) ran out of file descriptors ({what}): {files_advice()}; "
                            "nothing of this pool is left running")


def _descriptor_left() -> bool:
    """Whether this process can open a file now."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        return exc.errno not in (errno.EMFILE, errno.ENFILE)
    return True


def files_advice() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"this process may hold {soft} open files (ulimit -n), and each worker takes some here and in the worker "
            "processes; raise the limit (`ulimit -n 4096` in the shell that starts Jupyter, or "
            "resource.setrlimit(resource.RLIMIT_NOFILE, ...) before the pool starts), close what holds descriptors, "
            "or start fewer workers (Pool(workers=...))")


def worker_env(extra: dict[str, str] | None) -> dict[str, str]:
    """The environment of a worker: the kernel's (API keys included), made offline-safe. DSPy's persistent
    cache is the user's own (``DSPY_CACHEDIR``, else DSPy's default), shared by the workers and kept
    between sessions."""
    env = dict(os.environ)
    env.update(extra or {})
    # The worker's Python may be another interpreter: let it import this very dspex_nb.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    env["PYTHONUNBUFFERED"] = "1"
    env[KERNEL_ENV] = kernel_spec()  # workers and the template end when this process does, however it ends
    return env


WORKER_SET = frozenset({"PYTHONPATH", "PYTHONUNBUFFERED", KERNEL_ENV})  # what worker_env sets of its own


# ``python -m module`` with the current directory moved from the front of sys.path to its end: first there, a
# folder of the notebook's named dspex_nb, dspy or grpc would be imported in place of the installed package the
# kernel runs; at the end, the notebook's own modules are still found. (A bootstrap, not ``-P``, which Python 3.10
# lacks; the module stays an argument of its own, which stale cleanup and a worker's parent check look for.
# Under PYTHONSAFEPATH the directory is not on sys.path at all, and stays off.)
RUN_MODULE = ("import sys\n"
              "if not getattr(sys.flags, 'safe_path', False):\n"
              "    sys.path.append(sys.path.pop(0))\n"
              "import runpy\n"
              "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)\n")


def module_argv(python: str, module: str, *args: str) -> list[str]:
    """The command that runs ``python -m module args``, the current directory last on its sys.path."""
    return [python, "-c", RUN_MODULE, module, *args]


def start_module(python: str, module: str, args: list[str], env: dict[str, str], **io: Any) -> subprocess.Popen:
    """``python -m module args`` (``module_argv``) in a session of its own, with a pipe on stdin; a clear error
    when ``python`` cannot be run."""
    try:
        return subprocess.Popen(module_argv(python, module, *args), stdin=subprocess.PIPE, env=env,
                                start_new_session=True, close_fds=True, **io)
    except FileNotFoundError:
        raise WorkerStartError(f"the worker Python {python!r} does not exist (Pool(python=...))") from None
    except PermissionError:
        raise WorkerStartError(f"the worker Python {python!r} is not executable (Pool(python=...))") from None


class ProcessHandle:
    """What the pool needs of a worker process, however it was started; ``log_path`` has its output."""

    pid: int
    address: str
    log_path: Path
    python: str
    terminated_at: float | None = None  # when ``terminate`` asked it to end (time.monotonic)

    def exit_code(self) -> int | None:
        """None while it runs; else its exit code (negative: killed by that signal)."""
        raise NotImplementedError

    def ended(self) -> str:
        """How it ended, once it has: "exit code 7", "killed by SIGKILL"."""
        return describe_exit(self.exit_code())

    def wait(self, timeout: float) -> int:
        """Its exit code, waiting at most ``timeout`` seconds (TimeoutError after that)."""
        deadline = time.monotonic() + timeout
        while (code := self.exit_code()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker pid {self.pid} still runs after {timeout} s")
            time.sleep(0.01)
        return code

    def kill(self, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL ``grace`` seconds after it (counted from ``terminate`` where that came first: workers
        asked to end at once are all killed then, not each ``grace`` after the one before); wait until it has ended.
        What its programs started goes too, where its own end could not end it (``end_group``, ``end_started``):
        those of a worker still there after its grace, found (a scan of /proc) only then, while it still holds them;
        a worker that ends on SIGTERM ends its own."""
        if self.exit_code() is None:
            if self.terminated_at is None:
                self.terminate()
            started: dict[int, str | None] = {}
            try:
                self.wait(max(0.0, self.terminated_at + grace - time.monotonic()))  # type: ignore[operator]
            except TimeoutError:
                started = {pid: start_time(pid) for pid in started_by(self.pid)}
                self.signal(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                self.wait(10.0)
            end_started(started)
        self.end_group()

    def terminate(self) -> None:
        """Ask it to end (SIGTERM), without waiting (``kill`` waits): many workers end in the time of one."""
        self.terminated_at = time.monotonic()
        self.signal(signal.SIGTERM)

    def end_group(self) -> None:
        """SIGKILL what is left of its process group once it ended: the processes its programs started (a
        ``subprocess``, DSPy's ``PythonInterpreter``), which a worker killed outright could not end and which
        otherwise live on after the pool. A worker leads a session of its own, so its group's id is its pid, and
        that id stays taken while the group has a member: only a group with a process of this user in it is
        signalled, which is the worker's, never a newer process's that got the pid again."""
        if self.pid > 0 and group_members(self.pid):
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of its output (read from the log's end only), secrets masked."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, os.fstat(log.fileno()).st_size - TAIL_READ))
                text = log.read(TAIL_READ).decode(errors="replace")
        except OSError:
            return ""
        return redact.text("\n".join(text.splitlines()[-lines:]), None)

    def trim_log(self) -> None:
        """Keep its log within ``LOG_LIMIT`` bytes (see ``trim_log``)."""
        trim_log(self.log_path)

    def start_failure(self, worker_id: str) -> Exception:
        """The error for a worker that exited before it was ready."""
        code = self.exit_code()
        try:  # a missing dependency is said at its start: its first lines
            with open(self.log_path, "rb") as log:
                text = log.read(TAIL_READ).decode(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            if line.startswith(deps.MISSING_MARKER):
                python, statuses = deps.from_json(line[len(deps.MISSING_MARKER):])
                return deps.MissingDependency(f"the worker Python {python}", statuses, worker_python=python)
        advice = f"\nIt ran out of file descriptors: {files_advice()}" if "Too many open files" in text else ""
        return WorkerStartError(f"worker {worker_id} (pid {self.pid}, {self.python}) exited with code {code} "
                                f"before it was ready; its output:\n{self.log_tail()}{advice}")


class WorkerProcess(ProcessHandle):
    """A worker started as its own interpreter: ``python -m dspex_nb.worker``."""

    def __init__(self, python: str, address: str, log_path: Path, env: dict[str, str], args: list[str]) -> None:
        self.address = address
        self.log_path = log_path
        self.python = python
        log = open_log(log_path)
        try:
            self.proc = start_module(python, "dspex_nb.worker", ["--address", address, *args], env,
                                     stdout=log, stderr=subprocess.STDOUT)
        finally:
            os.close(log)
        self.pid = self.proc.pid

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        self._close_stdin()
        super().terminate()

    def kill(self, grace: float = 2.0) -> None:
        self._close_stdin()  # also where it ended by itself: the pipe is ours to close
        super().kill(grace)

    def _close_stdin(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the worker's parent watch sees EOF


def end_started(started: dict[int, str | None]) -> None:
    """SIGKILL the processes of ``started`` (pid: start time, as ``started_by`` found them while their worker ran) that
    still run, the same processes: those in a session of their own, which a worker killed outright (hung, stopped)
    could not end and its process group does not hold."""
    for pid, started_at in started.items():
        if started_at is not None and start_time(pid) == started_at:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def group_members(group: int) -> list[int]:
    """The pids of this user's processes in process group ``group`` (from /proc; none where it cannot be read)."""
    return [pid for pid, fields in processes(os.getuid()).items() if int(fields[2]) == group]


def interpreter(python: str | None) -> str:
    return python or sys.executable


def describe_exit(code: Any) -> str:
    if isinstance(code, int) and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
