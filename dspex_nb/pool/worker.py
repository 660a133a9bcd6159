"""One slot of a pool: its current worker (reached through its backend's ``Connection``), state and counters."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dspex_nb.pool.connection import Connection
from dspex_nb.pool.process import ProcessHandle

STARTING, READY, DRAINING, RESTARTING, FAILED, STOPPED = (
    "starting", "ready", "draining", "restarting", "failed", "stopped")


@dataclass
class Worker:
    """One slot of the pool: its current worker and counters."""

    id: str
    conn: Connection
    generation: int = 0
    state: str = STARTING
    in_flight: int = 0
    done: int = 0  # calls that finished
    errors: int = 0  # calls that failed
    cancelled: int = 0  # calls cancelled by their caller (not errors)
    items: int = 0  # batch items it returned (ok or failed)
    restarts: int = 0  # replaced after dying or hanging
    recycles: int = 0  # replaced on purpose (max_requests, ttl, max_memory_mb, cancel_grace)
    served: int = 0  # calls this process finished
    taken: int = 0  # calls routed to this process (max_requests bounds them, not only those finished)
    rss: int = 0  # resident bytes, as the worker last reported
    start_rss: int = 0  # resident bytes at its first health ping (what a fresh worker needs)
    cancelled_running: float = 0.0  # seconds the program of a cancelled call has gone on running, as last pinged
    failed_pings: int = 0
    ready_at: float = 0.0
    last_error: str = ""

    @property
    def process(self) -> ProcessHandle:
        return self.conn.process

    def close(self) -> None:
        """Close its connection (calls in flight on it end with an error)."""
        self.conn.close()

    def status(self) -> dict[str, Any]:
        return {"worker": self.id, "pid": self.process.pid, "state": self.state, "in_flight": self.in_flight,
                "done": self.done, "errors": self.errors, "cancelled": self.cancelled, "items": self.items,
                "restarts": self.restarts, "recycles": self.recycles,
                "rss_mb": round(self.rss / 2**20, 1), "cancelled_running_s": round(self.cancelled_running, 1),
                "uptime": time.monotonic() - self.ready_at if self.state in (READY, DRAINING) else 0.0,
                "last_error": self.last_error}
