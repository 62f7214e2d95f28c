"""A realistic span corpus for the export/memory benchmarks.

One offline demo run (``cmbagent_otel.demo.run_demo``: planning + control phases, a
4-agent group chat per step, tools, code execution, redo branches) is recorded once;
:func:`replicate` then clones it under fresh trace ids, in the end-time order a
``BatchSpanProcessor`` would deliver, to reach any span count.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags


def record_demo(capture_content: bool = False) -> list[ReadableSpan]:
    """The spans of one instrumented offline demo run, in end-time order."""
    import cmbagent_otel
    from cmbagent_otel.demo import run_demo

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    os.environ.setdefault("AUTOGEN_USE_DOCKER", "False")
    cmbagent_otel.instrument(tracer_provider=provider, capture_content=capture_content, instrument_cmbagent=False)
    try:
        with tempfile.TemporaryDirectory(prefix="cmbagent-otel-bench-") as work_dir:
            run_demo(work_dir)
    finally:
        cmbagent_otel.uninstrument()
        provider.shutdown()
    return list(exporter.get_finished_spans())


def _clone(span: ReadableSpan, trace_id: int) -> ReadableSpan:
    ctx = span.context
    parent = span.parent
    return ReadableSpan(
        name=span.name,
        context=SpanContext(trace_id, ctx.span_id, False, TraceFlags(TraceFlags.SAMPLED)),
        parent=SpanContext(trace_id, parent.span_id, False, TraceFlags(TraceFlags.SAMPLED)) if parent else None,
        resource=span.resource,
        # the recorded span's own containers (BoundedAttributes, BoundedList), as the SDK hands a
        # finished span to its processors; the public properties would give read-only copies
        # (MappingProxyType, tuples) that no production exporter sees
        attributes=span._attributes,
        events=span._events,
        links=span._links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def replicate(template: list[ReadableSpan], count: int, seed: int = 7) -> Iterator[ReadableSpan]:
    """``count`` spans: copies of ``template`` (one run each) under fresh trace ids."""
    rng = random.Random(seed)
    made = 0
    while made < count:
        trace_id = rng.getrandbits(128) or 1
        for span in template:
            if made >= count:
                return
            yield _clone(span, trace_id)
            made += 1


def batches(spans: Iterator[Any] | list[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive batches of ``size`` (``BatchSpanProcessor``'s default is 512)."""
    batch: list[Any] = []
    for span in spans:
        batch.append(span)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
