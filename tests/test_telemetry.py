"""Pool telemetry: LM cost totals, and OpenTelemetry spans for pool calls (off by default), checked with the
SDK's in-memory exporter."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dspex_nb import Pool
from dspex_nb.pool.telemetry import CallRecord, Telemetry

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)


def test_every_call_becomes_a_span_when_enabled() -> None:
    exporter.clear()
    with Pool(workers=1, otel=True, journal=False) as pool:
        pool.execute("echo", {"x": 1})
        pool.execute_stream("count", {"n": 5}).result()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"dspex echo", "dspex count"}
    count = spans["dspex count"].attributes
    assert (count["dspex.tool"], count["dspex.worker"], count["dspex.ok"], count["dspex.chunks"]) == (
        "count", "w0", True, 6)
    assert spans["dspex count"].end_time >= spans["dspex count"].start_time


def test_no_spans_by_default() -> None:
    exporter.clear()
    with Pool(workers=1, journal=False) as pool:
        pool.execute("echo", {"x": 1})
    assert exporter.get_finished_spans() == ()


def test_stats_sum_the_cost_of_the_calls_whose_lm_reported_one() -> None:
    telemetry = Telemetry()
    assert telemetry.summary()["cost"] is None
    telemetry.add(CallRecord("predict", "w0", True, 0.0, 0.1, tokens_in=10, tokens_out=2, cost=0.001))
    telemetry.add(CallRecord("predict", "w1", True, 0.0, 0.1, tokens_in=10, tokens_out=2))  # an unpriced LM
    telemetry.add(CallRecord("batch_inference", "w0", True, 0.0, 0.1, tokens_in=30, tokens_out=6, cost=0.002))
    telemetry.add(CallRecord("echo", "w0", True, 0.0, 0.1))
    summary = telemetry.summary()
    assert {tool: t["cost"] for tool, t in summary["tools"].items()} == {
        "predict": 0.001, "batch_inference": 0.002, "echo": None}
    assert summary["cost"] == pytest.approx(0.003) and summary["tokens_in"] == 50
