"""The seam between the pool and its workers: a ``Backend`` starts workers, a ``Connection`` reaches one.

The pool (scheduling, supervision, retries, the journal and everything above it) speaks only these;
the local backend (``local.py``: processes on this machine over gRPC on Unix sockets) and the Ray
backend (``ray_backend.py``: Ray actors, over Ray's own transport) implement them. A call's failure
arrives as a ``DspexError`` already translated (``died`` says whether the worker is gone), or as
``ConnectionClosed`` when the connection was closed before the call reached it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from dspex_nb.errors import DspexError
from dspex_nb.pool.calls import ChunkSource
from dspex_nb.pool.process import ProcessHandle

Died = Callable[[], DspexError | None]  # for a failed call: the error saying its worker died, or None


BACKSTOP = 10.0  # seconds past a call's timeout that the kernel waits for its worker's answer (its CallTimeout)


def left(timeout: float | None, waited: float) -> float | None:
    """What is left of a call's ``timeout`` after ``waited`` seconds in the queue."""
    return None if timeout is None else max(0.001, timeout - waited)


def kernel_dir() -> str:
    """The kernel's working directory now, which each call brings to its worker; "" where it was removed (the worker
    then stays where it is)."""
    try:
        return os.getcwd()
    except OSError:
        return ""


def backstop(timeout: float | None, waited: float) -> float | None:
    """How long the kernel waits for a unary call's answer: the worker keeps the call's timeout and answers
    ``CallTimeout`` when it passes, so this only ends the wait for a worker that cannot answer at all."""
    remaining = left(timeout, waited)
    return None if remaining is None else remaining + BACKSTOP


class ConnectionClosed(Exception):
    """The connection was closed (its worker is being replaced, or the pool shut down)."""


class Health(NamedTuple):
    """What a ping says of a worker."""

    rss: int  # its resident bytes
    cancelled_running: float  # seconds the program of a cancelled call has gone on running since (0: none)


class Pending(Protocol):
    def result(self) -> Health:
        """Raises if the ping failed or timed out."""


class Connection(Protocol):
    """One worker as the pool reaches it."""

    # pid, exit_code(), wait(), terminate(), kill(), signal(), log_tail(), trim_log(), start_failure()
    process: ProcessHandle

    def ready(self) -> bool:
        """Whether it answers now (polled while it starts)."""

    def ping(self, timeout: float) -> Pending:
        """A health ping, on a path that never waits behind work."""

    def execute(self, tool: str, args_json: bytes, session_id: str, timeout: float | None, waited: float,
                died: Died) -> Any:
        """Run ``tool`` and return its decoded result; ``timeout`` is the call's, of which it already spent
        ``waited`` seconds in the pool's queue."""

    def stream(self, tool: str, args_json: bytes, session_id: str, timeout: float | None, waited: float,
               died: Died) -> ChunkSource: ...

    def describe(self, timeout: float, died: Died) -> dict[str, Any]: ...

    def close(self) -> None:
        """Close the transport; calls in flight on it end with an error."""


@dataclass
class WorkerSpec:
    """What every worker of a pool starts with."""

    run_id: str
    lm: str
    lm_kwargs: dict[str, Any]
    max_message_bytes: int
    session_ttl: float
    rate_limit: float | None  # this worker's share of the pool's LM requests per minute
    start_timeout: float
    env: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    """Starts a pool's workers somewhere: ``open`` once, ``spawn`` per slot and generation, ``close`` once."""

    name: str
    run_id: str  # marks its workers (sockets, call ids)

    def fresh(self) -> Backend:
        """The backend to open for a start (a local one swaps in the template ``%load_ext`` warmed, if it fits)."""

    def open(self) -> list[dict[str, Any]]:
        """Prepare (returns what stale cleanup did, if anything)."""

    def spawn(self, worker_id: str, generation: int, spec: WorkerSpec) -> Connection: ...

    def close(self) -> None: ...

    def follows(self, name: str, value: str) -> bool:
        """Whether its workers take the kernel's environment variable ``name`` as it changes after they started
        (``environment.Changes``)."""
