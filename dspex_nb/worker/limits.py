"""Keeping a worker's LM calls within limits: a requests-per-minute bucket, and none for a cancelled call.

``RateLimiter`` spaces calls evenly (no bursts), enforced in DSPy's ``on_lm_start`` callback, so it counts real LM
calls (a multi-step module makes several per item). A Pool's ``rate_limit`` is split evenly over
its workers. HTTP 429 answers are retried by ``dspy.LM`` itself (``num_retries``, honouring ``retry_after``).
``StopWhenCancelled`` ends a cancelled call's program at its next LM call, also where nothing else would stop
it: a call that does not stream, a batch's items already running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dspy.utils.callback import BaseCallback

if TYPE_CHECKING:
    from dspex_nb.worker.tools import CancelEvent


class RateLimiter:
    """At most ``per_minute`` acquisitions a minute, spaced ``60 / per_minute`` seconds apart (no bursts)."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = time.sleep) -> None:
        if per_minute <= 0:
            raise ValueError(f"rate_limit must be > 0 requests/min, got {per_minute}")
        self.interval = 60.0 / per_minute
        self._clock = clock
        self._sleep = sleep
        self._next = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Wait for the next slot; return how long it waited."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        wait = start - now
        if wait > 0:
            self._sleep(wait)
        return wait


class LimitLMCalls(BaseCallback):
    """A DSPy callback that takes a slot of ``limiter`` before every LM call."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.limiter.acquire()


class CallCancelled(BaseException):
    """Raised at an LM call of a cancelled call. Not an ``Exception``, so that neither DSPy (which logs and
    ignores a callback's ``Exception``, and retries a failed parse with another adapter) nor the program's
    own ``except Exception`` goes on with the call."""


class StopWhenCancelled(BaseCallback):
    """A DSPy callback that refuses every LM call once ``cancelled`` (the call's) is set."""

    def __init__(self, cancelled: CancelEvent) -> None:
        self.cancelled = cancelled

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if self.cancelled.is_set():
            raise CallCancelled("the call was cancelled: no further LM calls")
