"""What the layers above the pool (batches, sessions, the views) need of it: the ``Executor`` protocol.

``WorkerPool`` (and so ``Pool``) implements it, whatever its backend (local processes or Ray actors);
``BatchRun``, ``Session`` and the views are written against this protocol, not against ``Pool``, so nothing
in ``pool/`` depends on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dspex_nb.pool.calls import Chunk, Run


@dataclass(frozen=True)
class Placement:
    """A caller's own rule for where its call may run, applied by the pool's one scheduler under its lock
    (so two callers never take the same place): the least busy ready worker with room that ``accept``s it
    is ``claim``ed, waiting (on the pool's condition) while there is none, until ``stopped()``."""

    accept: Callable[[str], bool]  # may the call run on this worker (its id)?
    claim: Callable[[str], None]  # the call takes that worker (called under the pool's lock)
    stopped: Callable[[], bool]  # stop waiting: Cancelled


class Executor(Protocol):
    size: int  # worker slots
    lm: str  # the workers' LM ("demo" or a dspy.LM model string)

    @property
    def running(self) -> bool: ...

    def status(self) -> list[dict[str, Any]]:
        """Per worker slot: id ("worker"), state, in_flight, counters."""

    def stats(self) -> dict[str, Any]:
        """Per tool: calls, failures, tokens, cost, timings."""

    def execute(self, tool: str, args: dict[str, Any] | None = None, *, timeout: float | None = None,
                worker: str | None = None, session_id: str = "", affinity: str = "strict_queue") -> Any: ...

    def execute_stream(self, tool: str, args: dict[str, Any] | None = None, *,
                       on_chunk: Callable[[Chunk], Any] | None = None, timeout: float | None = None,
                       worker: str | None = None, session_id: str = "", affinity: str = "strict_queue",
                       keep_chunks: int | None = ..., placement: Placement | None = None) -> Run: ...

    def check_worker(self, worker_id: str, why: str) -> bool:
        """Ping one worker now; replace it when it does not answer."""

    def notify_change(self) -> None:
        """Something a ``Placement`` accepts may have changed: the scheduler looks again."""
