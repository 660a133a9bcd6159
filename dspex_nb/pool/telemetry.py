"""Per-call timings kept by the pool: queue wait, execution, time to first chunk, chunk count, LM tokens and cost.

``Telemetry.summary()`` is what ``pool.stats()`` returns and the pool dashboard shows. With
``otel=True`` (extra ``otel``: opentelemetry-api) every call also becomes an OpenTelemetry span,
with the same timings as attributes; it is off by default.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

KEEP = 2000  # calls remembered for percentiles


@dataclass(slots=True)
class CallRecord:
    """One ended call. (Not frozen: every call makes one, and a frozen dataclass of these fields takes eight times
    as long to make.)"""

    tool: str
    worker: str
    ok: bool
    queue_wait: float  # seconds waiting for a worker
    duration: float  # seconds from sending the call to its end
    first_chunk: float | None = None  # seconds from sending to the first chunk (streams)
    chunks: int = 0
    started_ns: int = 0  # wall clock, for spans
    tokens_in: int = 0  # LM prompt tokens the call used (dspy.track_usage on the worker)
    tokens_out: int = 0  # LM completion tokens
    cost: float | None = None  # USD cost of its LM calls, where an LM reported one
    cancelled: bool = False  # by its caller: not ok, and not an error either


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": pick(0.5) * 1e3, "p95_ms": pick(0.95) * 1e3, "max_ms": ordered[-1] * 1e3}


class Telemetry:
    def __init__(self, otel: bool = False) -> None:
        self._records: deque[CallRecord] = deque(maxlen=KEEP)
        self._totals: dict[str, list[int]] = {}  # tool -> [calls, errors, chunks, tokens in, out], pool's life
        self._costs: dict[str, float] = {}  # tool -> USD cost, for the tools whose LM reported a cost
        self._lock = threading.Lock()
        self._tracer = _tracer() if otel else None

    def add(self, record: CallRecord) -> None:
        with self._lock:
            self._records.append(record)
            totals = self._totals.setdefault(record.tool, [0, 0, 0, 0, 0])
            totals[0] += 1
            totals[1] += not record.ok and not record.cancelled
            totals[2] += record.chunks
            totals[3] += record.tokens_in
            totals[4] += record.tokens_out
            if record.cost is not None:
                self._costs[record.tool] = self._costs.get(record.tool, 0.0) + record.cost
        if self._tracer is not None:
            self._span(record)

    def summary(self) -> dict[str, Any]:
        """Per tool: calls, errors, chunks, LM tokens in and out, LM cost (USD; None where no LM reported one)
        (all time) and percentiles of the recent calls' timings; and the totals."""
        with self._lock:
            records = list(self._records)
            totals = {tool: list(t) for tool, t in self._totals.items()}
            costs = dict(self._costs)
        tools = {}
        for tool, (calls, errors, chunks, tokens_in, tokens_out) in sorted(totals.items()):
            mine = [r for r in records if r.tool == tool]
            tools[tool] = {"calls": calls, "errors": errors, "chunks": chunks, "tokens_in": tokens_in,
                           "tokens_out": tokens_out, "cost": costs.get(tool),
                           "queue_wait": _percentiles([r.queue_wait for r in mine]),
                           "execution": _percentiles([r.duration for r in mine]),
                           "first_chunk": _percentiles([r.first_chunk for r in mine if r.first_chunk is not None])}
        return {"calls": sum(t["calls"] for t in tools.values()),
                "tokens_in": sum(t["tokens_in"] for t in tools.values()),
                "tokens_out": sum(t["tokens_out"] for t in tools.values()),
                "cost": sum(costs.values()) if costs else None, "tools": tools}

    def _span(self, record: CallRecord) -> None:
        end_ns = record.started_ns + int((record.queue_wait + record.duration) * 1e9)
        span = self._tracer.start_span(f"dspex {record.tool}", start_time=record.started_ns, attributes={
            "dspex.tool": record.tool, "dspex.worker": record.worker, "dspex.ok": record.ok,
            "dspex.queue_wait_s": record.queue_wait, "dspex.duration_s": record.duration,
            "dspex.chunks": record.chunks, "dspex.first_chunk_s": record.first_chunk or 0.0})
        span.end(end_time=end_ns)


def _tracer() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        raise ImportError("Pool(otel=True) needs opentelemetry-api: pip install 'opentelemetry-api>=1.20'") from None
    return trace.get_tracer("dspex_nb")
