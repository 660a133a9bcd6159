"""A worker's state (``new_state``), and the gRPC server of a local worker, kept until stdin closes or
SIGTERM."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from dspex_nb._proto import bridge_pb2_grpc
from dspex_nb.wire import KERNEL_ENV, health_address, kernel_gone, message_options, started_any, started_by
from dspex_nb.worker import dspy_tools, tools  # noqa: F401  (importing registers the tools)
from dspex_nb.worker.limits import LimitLMCalls, RateLimiter
from dspex_nb.worker.server import Bridge
from dspex_nb.worker.state import WorkerState

KERNEL_POLL = 0.5  # seconds between checks that the owning kernel still runs
END_GRACE = 0.5  # seconds the processes programs started have to end on SIGTERM as the worker ends


def end_started_processes() -> None:
    """End the processes that programs on this worker started (a ``subprocess``, a ``multiprocessing`` pool, DSPy's
    ``PythonInterpreter``), so that none outlives the worker (``started_by``: also those in a session of their own):
    SIGTERM, then SIGKILL for those still there after ``END_GRACE`` seconds (one that ignores SIGTERM, as a shell
    script's ``trap '' TERM``). Within the pool's own grace for a worker's end (``ProcessHandle.kill``). A worker
    that never started a process (``started_any``) does not scan /proc for them."""
    with contextlib.suppress(Exception):  # nothing here may keep the worker from exiting
        if not started_any():
            return
        me = os.getpid()
        _signal_each(started_by(me), signal.SIGTERM)
        deadline = time.monotonic() + END_GRACE
        while (left := started_by(me)) and time.monotonic() < deadline:
            time.sleep(0.02)
        _signal_each(left, signal.SIGKILL)


def _signal_each(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _exit_when_stdin_closes(pipe: io.BufferedReader | None) -> None:
    try:
        while pipe is not None and pipe.read(65536):
            pass
    finally:
        end_started_processes()
        os._exit(0)


def _exit_when_kernel_ends(kernel: str) -> None:
    """Exit when the owning kernel is gone, even if the pipe from our parent stays open (a stopped template
    holds it): end that template too, then this worker."""
    while not kernel_gone(kernel):
        time.sleep(KERNEL_POLL)
    parent = os.getppid()
    try:
        if b"dspex_nb.worker.template" in Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0"):
            os.kill(parent, signal.SIGKILL)
    except OSError:
        pass
    end_started_processes()
    os._exit(0)


def new_state(*, worker_id: str, run_id: str, lm: str, lm_kwargs: dict[str, Any], max_message_bytes: int,
              rate_limit: float | None, session_ttl: float) -> WorkerState:
    """A worker's state with its LM set, however the worker is reached (gRPC here, a Ray actor there)."""
    state = WorkerState(worker_id=worker_id, run_id=run_id, max_message_bytes=max_message_bytes,
                        rate_limit=rate_limit, session_ttl=session_ttl)
    if rate_limit:
        state.callbacks.append(LimitLMCalls(RateLimiter(rate_limit)))
    dspy_tools.set_lm(state, lm, lm_kwargs)
    return state


def serve(address: str, *, worker_id: str, run_id: str, lm: str, lm_kwargs: dict[str, Any],
          max_message_mb: int, rate_limit: float | None, session_ttl: float, threads: int,
          parent: io.BufferedReader | None, watch_parent: bool) -> int:
    """Serve until SIGTERM; with ``watch_parent``, exit when ``parent`` (the pipe from the process that
    started this one, see ``stdin.take_stdin``) closes, or the owning kernel ends."""
    state = new_state(worker_id=worker_id, run_id=run_id, lm=lm, lm_kwargs=lm_kwargs,
                      max_message_bytes=max_message_mb * 2**20, rate_limit=rate_limit, session_ttl=session_ttl)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
                         options=message_options(max_message_mb * 2**20))
    bridge = Bridge(state)
    bridge_pb2_grpc.add_BridgeServicer_to_server(bridge, server)
    health = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    bridge_pb2_grpc.add_BridgeServicer_to_server(bridge, health)  # the pool only pings it: never busy with work
    for grpc_server, at in ((server, address), (health, health_address(address))):
        grpc_server.add_insecure_port(at)
        os.chmod(at.removeprefix("unix:"), 0o600)  # as the pool's other files (gRPC made it 0755, by the umask)
    health.start()
    server.start()
    if watch_parent:
        threading.Thread(target=_exit_when_stdin_closes, args=(parent,), name="parent-watch", daemon=True).start()
        if os.environ.get(KERNEL_ENV):
            threading.Thread(target=_exit_when_kernel_ends, args=(os.environ[KERNEL_ENV],), name="kernel-watch",
                             daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: (health.stop(grace=0), server.stop(grace=1)))
    server.wait_for_termination()
    end_started_processes()
    return 0
