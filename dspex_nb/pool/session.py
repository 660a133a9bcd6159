"""``Session``: calls pinned to one worker of a pool, sharing the objects its tools keep."""

from __future__ import annotations

import contextlib
import uuid
from typing import TYPE_CHECKING, Any

from dspex_nb.errors import DspexError
from dspex_nb.pool.calls import Run

if TYPE_CHECKING:
    from dspex_nb.pool.executor import Executor


class Session:
    """Calls pinned to one worker of a pool (per ``affinity``); tools keep objects across its calls.

    ``with pool.session() as s:`` closes it at the end: its objects are dropped on the worker.
    """

    def __init__(self, pool: Executor, worker: str, affinity: str = "hint") -> None:
        self.pool = pool
        self.worker = worker
        self.affinity = affinity
        self.id = uuid.uuid4().hex[:12]

    def execute(self, tool: str, args: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return self.pool.execute(tool, args, worker=self.worker, session_id=self.id, affinity=self.affinity,
                                 **kwargs)

    def execute_stream(self, tool: str, args: dict[str, Any] | None = None, **kwargs: Any) -> Run:
        return self.pool.execute_stream(tool, args, worker=self.worker, session_id=self.id,
                                        affinity=self.affinity, **kwargs)

    def close(self) -> None:
        """Drop the session's objects on its worker (a replaced worker has lost them already)."""
        if self.pool.running:
            with contextlib.suppress(DspexError):
                self.pool.execute("close_session", worker=self.worker, session_id=self.id)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session {self.id} on {self.worker} ({self.affinity})>"
