"""DurableBatchSpanProcessor: batching, a full queue (spilled, or counted and logged), forks."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from cmbagent_otel.processor import DurableBatchSpanProcessor


class GatedExporter(SpanExporter):
    """Collects batches; ``export`` waits until the gate opens (a slow or stuck backend)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.gate.wait(60)
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def provider_with(processor: DurableBatchSpanProcessor, **kwargs) -> TracerProvider:
    provider = TracerProvider(**kwargs)
    provider.add_span_processor(processor)
    return provider


def test_batches_reach_the_exporter_and_flush_drains(tmp_path):
    memory = InMemorySpanExporter()
    processor = DurableBatchSpanProcessor(memory, max_export_batch_size=7, schedule_delay_millis=60_000)
    provider = provider_with(processor)
    tracer = provider.get_tracer("t")
    for i in range(30):
        tracer.start_span(f"s{i}").end()
    assert provider.force_flush()
    assert sorted(s.name for s in memory.get_finished_spans()) == sorted(f"s{i}" for i in range(30))
    assert processor.stats() == {"queued": 0, "overflowed": 0, "dropped": 0}
    provider.shutdown()


def test_a_full_queue_without_a_spill_store_counts_and_logs_every_drop(caplog):
    exporter = GatedExporter()
    processor = DurableBatchSpanProcessor(exporter, max_queue_size=8, max_export_batch_size=4,
                                          schedule_delay_millis=60_000)
    provider = provider_with(processor)
    tracer = provider.get_tracer("t")
    for i in range(4):
        tracer.start_span(f"first {i}").end()
    assert exporter.entered.wait(60)  # the worker is stuck exporting the first batch
    for i in range(40):
        tracer.start_span(f"burst {i}").end()
    stats = processor.stats()
    assert stats["overflowed"] == stats["dropped"] > 0
    assert "dropped" in caplog.text and "GatedExporter" in caplog.text
    exporter.gate.set()
    assert provider.force_flush()
    assert len(exporter.spans) + processor.stats()["dropped"] == 44  # every span delivered or counted
    provider.shutdown()
    tracer.start_span("late").end()
    assert processor.stats()["dropped"] == stats["dropped"] + 1  # after shutdown: counted, not queued


class RaisingExporter(SpanExporter):
    """A third-party exporter that breaks its contract by raising."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise RuntimeError("backend client bug")


def test_an_exporter_that_raises_has_its_spans_counted_as_dropped_and_the_worker_goes_on(caplog):
    processor = DurableBatchSpanProcessor(RaisingExporter(), max_export_batch_size=5, schedule_delay_millis=60_000)
    provider = provider_with(processor)
    tracer = provider.get_tracer("t")
    for i in range(12):
        tracer.start_span(f"s{i}").end()
    assert provider.force_flush()
    assert processor.stats() == {"queued": 0, "overflowed": 0, "dropped": 12}
    assert "RaisingExporter raised" in caplog.text
    tracer.start_span("after").end()
    assert provider.force_flush()
    assert processor.stats()["dropped"] == 13
    provider.shutdown()


def test_a_started_record_that_cannot_be_read_leaves_the_batch_intact():
    class LiveMemory(InMemorySpanExporter):
        accepts_started_spans = True

    memory = LiveMemory()
    processor = DurableBatchSpanProcessor(memory, schedule_delay_millis=60_000, live=True)
    provider = provider_with(processor)
    tracer = provider.get_tracer("t")
    span = tracer.start_span("workflow", attributes={"cmbagent.span.kind": "workflow"})
    span._attributes = 42  # a span whose attributes cannot be read when the started record is taken
    tracer.start_span("sibling").end()
    assert provider.force_flush()
    assert [s.name for s in memory.get_finished_spans()] == ["sibling"]
    assert processor.stats() == {"queued": 0, "overflowed": 0, "dropped": 0}
    provider.shutdown()


def test_unsampled_spans_are_not_queued():
    memory = InMemorySpanExporter()
    processor = DurableBatchSpanProcessor(memory)
    provider = provider_with(processor, sampler=ALWAYS_OFF)
    provider.get_tracer("t").start_span("dropped by the sampler").end()
    assert provider.force_flush() and memory.get_finished_spans() == ()
    provider.shutdown()


def test_a_forked_child_exports_its_own_spans():
    memory = InMemorySpanExporter()
    processor = DurableBatchSpanProcessor(memory, schedule_delay_millis=60_000)
    provider = provider_with(processor)
    tracer = provider.get_tracer("t")
    tracer.start_span("parent before fork").end()
    pid = os.fork()
    if pid == 0:  # the child: a fresh queue and worker; the parent's queued span is not exported twice
        code = 1
        try:
            tracer.start_span("child").end()
            provider.force_flush()
            names = [s.name for s in memory.get_finished_spans()]
            code = 0 if names == ["child"] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert provider.force_flush()
    assert [s.name for s in memory.get_finished_spans()] == ["parent before fork"]
    provider.shutdown()
