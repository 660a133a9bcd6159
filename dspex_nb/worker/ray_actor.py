"""A worker as a Ray actor: the same tools and DSPy code as a local worker, reached over Ray's transport.

The Ray backend (``dspex_nb.pool.ray_backend``) wraps ``RayWorker`` with ``ray.remote``; this module does
not import Ray. A streamed call is an actor generator method: each item is one message of chunks (a JSON
array), made by the same ``Call.batches`` as the gRPC stream's. ``cancel`` runs beside the call (a threaded
actor) and sets the call's ``ctx.cancelled``, as gRPC's cancellation callback does.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from dspex_nb.worker.calls import Call, Deadline
from dspex_nb.worker.main import new_state
from dspex_nb.worker.output import spare_output
from dspex_nb.worker.server import describe
from dspex_nb.worker.state import rss_bytes
from dspex_nb.worker.stdin import NoInput

EARLY_CANCEL_KEPT = 600.0  # seconds a cancel waits for its call to arrive
LOCAL_PRICES = "LITELLM_LOCAL_MODEL_COST_MAP"  # DSPy's LM prices from its own copy, not fetched from the internet


def _use(secrets: dict[str, str]) -> None:
    """Take the kernel's secret-named variables (its API keys, as a local worker has them; masked as there:
    ``redact``), except a path to a file this node does not have (``GOOGLE_APPLICATION_CREDENTIALS`` on the
    kernel's machine): there the node's own setting stays."""
    for name, value in secrets.items():
        if not (os.path.isabs(value) and not os.path.exists(value)):
            os.environ[name] = value


def _enter(cwd: str) -> None:
    """Work in the kernel's working directory (where the pool started), as a local worker does, so that a program
    opens a relative path as in the kernel; where this node has no such directory, Ray's stays."""
    with contextlib.suppress(OSError):
        os.chdir(cwd)


class RayWorker:
    def __init__(self, worker_id: str, run_id: str, lm: str, lm_kwargs: dict[str, Any], max_message_bytes: int,
                 rate_limit: float | None, session_ttl: float, secrets: dict[str, str], cwd: str) -> None:
        sys.stdin = NoInput()  # input() in a program fails at once, saying why
        spare_output()  # a print to a log on a full disk (Ray's, on the node) fails no call
        _use(secrets)
        _enter(cwd)
        os.environ.setdefault(LOCAL_PRICES, "True")  # offline-safe, as a local worker (``process.worker_env``)
        self.state = new_state(worker_id=worker_id, run_id=run_id, lm=lm, lm_kwargs=lm_kwargs,
                               max_message_bytes=max_message_bytes, rate_limit=rate_limit, session_ttl=session_ttl)
        self._calls: dict[str, tuple[Call, threading.Event]] = {}  # call id -> the call, and "it is over"
        self._early: dict[str, float] = {}  # ids cancelled before their call got here -> when
        self._lock = threading.Lock()

    def ping(self) -> tuple[int, int, str, str, float]:
        """pid, resident bytes, its node (IP address and Ray node id), and the seconds the program of a cancelled
        call has gone on running since its cancel (``WorkerState.cancelled_running``)."""
        import ray

        return (os.getpid(), rss_bytes(), ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id(),
                self.state.cancelled_running())

    def describe(self) -> dict[str, Any]:
        return describe(self.state)

    def execute(self, call_id: str, tool: str, args_json: bytes, session_id: str, timeout: float | None = None,
                waited: float = 0.0, cwd: str = "") -> tuple[Any, Any, Any]:
        """(result JSON, None, output) or (None, error info, output), as ``Call.unary``; ``timeout`` (less ``waited``
        in the pool's queue) is kept here, and the call runs in the kernel's directory ``cwd`` where this node has
        it."""
        call = self._open(call_id, Call(self.state, tool, args_json, session_id, False, Deadline(timeout, waited), cwd))
        try:
            return call.unary()
        finally:
            self._close(call_id)

    def stream(self, call_id: str, tool: str, args_json: bytes, session_id: str, timeout: float | None = None,
               waited: float = 0.0, cwd: str = "") -> Iterator[bytes]:
        call = self._open(call_id, Call(self.state, tool, args_json, session_id, True, Deadline(timeout, waited), cwd))
        ended = self._calls[call_id][1]
        try:
            yield from call.batches(ended, lambda: not ended.is_set())
        finally:
            self._close(call_id)

    def cancel(self, call_id: str) -> None:
        """Cancel a call, also one that has not reached this actor yet (methods run in several threads)."""
        with self._lock:
            call, ended = self._calls.get(call_id, (None, None))
            if call is None:
                now = time.monotonic()
                self._early = {k: t for k, t in self._early.items() if now - t < EARLY_CANCEL_KEPT}
                self._early[call_id] = now
        if call is not None and ended is not None:
            call.ctx.cancelled.set()
            ended.set()

    def _open(self, call_id: str, call: Call) -> Call:
        ended = threading.Event()
        with self._lock:
            self._calls[call_id] = (call, ended)
            if self._early.pop(call_id, None) is not None:
                call.ctx.cancelled.set()
                ended.set()
        return call

    def _close(self, call_id: str) -> None:
        with self._lock:
            call, ended = self._calls.pop(call_id, (None, None))
        if call is not None and ended is not None:
            ended.set()
            call.ctx.cancelled.set()  # a caller that went away stops the tool too
