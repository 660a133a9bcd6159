"""OpenTelemetry spans for pool calls (off by default), checked with the SDK's in-memory exporter."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dspex_nb import Pool

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
