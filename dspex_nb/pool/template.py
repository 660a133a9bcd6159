"""The kernel's side of a template process (``Pool(start="template")``): ask it for workers,
learn their pids and, since they are its children and not ours, their exit codes from it.
See ``dspex_nb.worker.template`` for why forking from a template is safe and fast.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import subprocess
import threading
from pathlib import Path

from dspex_nb.errors import WorkerStartError
from dspex_nb.pool.process import ProcessHandle, open_log, start_module
from dspex_nb.wire import process_state, start_time

FORK_TIMEOUT = 10.0  # seconds a template that has imported DSPy may take to fork before it counts as hung
log = logging.getLogger(__name__)
UNKNOWN_EXIT = 255


class Template:
    def __init__(self, python: str, env: dict[str, str], log_path: Path, run_id: str,
                 fork_timeout: float = FORK_TIMEOUT) -> None:
        self.python = python
        self.fork_timeout = fork_timeout
        self.log_path = log_path
        self.exits: dict[int, int] = {}  # worker pid -> exit code, as the template reported
        self._replies: dict[int, int] = {}  # request id -> the pid forked for it
        self.ready = False  # it has imported DSPy (which takes seconds, many more on a busy machine)
        self.ended = False  # its stdout ended: it answers nothing more, though it may not have exited yet
        self._ids = itertools.count()
        self._cond = threading.Condition()
        log = open_log(log_path)  # private, as the workers' logs (it was made 0644)
        try:
            self.proc = start_module(python, "dspex_nb.worker.template", ["--run-id", run_id], env,
                                     stdout=subprocess.PIPE, stderr=log)
        finally:
            os.close(log)
        self._reader = threading.Thread(target=self._read, name="dspex-template", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:  # something the template imported printed to stdout: not for us
                log.warning("dspex_nb template: %s", line.decode(errors="replace").rstrip())
                continue
            with self._cond:
                if "pid" in message:
                    self._replies[message["id"]] = message["pid"]
                elif "ready" in message:
                    self.ready = True
                else:
                    self.exits[message["exited"]] = message["status"]
                self._cond.notify_all()
        with self._cond:  # the template ended: so did every worker it forked
            self.ended = True
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def _gone(self) -> bool:
        """It cannot answer: it exited, or is exiting (its stdout ended a moment before it can be reaped, and
        nothing would wake a waiter on ``alive`` alone)."""
        return self.ended or not self.alive

    @property
    def answering(self) -> bool:
        """Alive and not stopped: it reaps its workers and reports their exits."""
        return self.alive and process_state(self.proc.pid) not in ("T", "t", None)

    def spawn(self, argv: list[str], env: dict[str, str], log_path: Path, address: str,
              ready_timeout: float) -> ForkedProcess:
        """Fork a worker running ``python -m dspex_nb.worker <argv>`` with ``env`` added to its environment, once
        the template has imported DSPy (within ``ready_timeout`` seconds: the pool's start timeout)."""
        request_id = next(self._ids)
        request = json.dumps({"id": request_id, "argv": argv, "env": env, "log": str(log_path)}) + "\n"
        with self._cond:
            try:
                self.proc.stdin.write(request.encode())  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
            except (BrokenPipeError, ValueError):
                raise self.failure() from None
            if not self._cond.wait_for(lambda: self.ready or self._gone, ready_timeout):
                self.proc.kill()
                raise WorkerStartError(f"the template process (pid {self.proc.pid}) did not import DSPy within "
                                       f"{ready_timeout:g} s (the pool's start_timeout); it was killed")
            if not self._cond.wait_for(lambda: request_id in self._replies or self._gone, self.fork_timeout):
                self.proc.kill()  # hung (e.g. stopped): the pool starts a new template for the next worker
                raise WorkerStartError(f"the template process (pid {self.proc.pid}) did not fork a worker within "
                                       f"{self.fork_timeout:g} s; it was killed, and a new one starts the next worker")
            if request_id not in self._replies:
                raise self.failure()
            pid = self._replies.pop(request_id)
        return ForkedProcess(self, pid, address, log_path)

    def failure(self) -> Exception:
        """Why the template cannot fork (it exited): its missing dependencies, or its output."""
        self.proc.wait()
        return ForkedProcess(self, self.proc.pid, "", self.log_path).start_failure("template")

    def close(self) -> None:
        """End the template; its workers see their watch pipes close and exit too."""
        if self.proc.stdin and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError, OSError):  # a template that already exited
                self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)  # it reads the template's last words (its workers' exits), then the pipe's end
        if not self._reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()


class ForkedProcess(ProcessHandle):
    """A worker forked by the template."""

    def __init__(self, template: Template, pid: int, address: str, log_path: Path) -> None:
        self.template = template
        self.pid = pid
        self.address = address
        self.log_path = log_path
        self.python = template.python

    def exit_code(self) -> int | None:
        if self.pid == self.template.proc.pid:  # the template itself (for its start failure)
            return self.template.proc.poll()
        code = self.template.exits.get(self.pid)
        if code is None and start_time(self.pid) is None and not self.template.answering:
            return UNKNOWN_EXIT  # gone, but its template (the only process that could say how) cannot say
        return code
