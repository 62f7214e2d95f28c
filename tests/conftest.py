"""Fixtures shared by every test package: an SDK provider with an in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel
from cmbagent_otel._spans import workflow_tracers


class SpanCapture:
    """An SDK TracerProvider whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def spans(self) -> list[ReadableSpan]:
        return sorted(self.exporter.get_finished_spans(), key=lambda s: s.start_time or 0)

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name.startswith(prefix)]

    def one(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans if s.name == name]
        assert len(found) == 1, f"expected one span {name!r}, got {[s.name for s in self.spans]}"
        return found[0]

    def parent_of(self, span: ReadableSpan) -> ReadableSpan | None:
        if span.parent is None:
            return None
        for candidate in self.spans:
            if candidate.context.span_id == span.parent.span_id:
                return candidate
        return None

    def tree(self) -> list[str]:
        """Span names indented by depth, children in start order."""
        spans = self.spans
        ids = {s.context.span_id for s in spans}
        children: dict[int | None, list[ReadableSpan]] = {}
        for s in spans:
            parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
            children.setdefault(parent, []).append(s)
        lines: list[str] = []

        def walk(parent: int | None, depth: int) -> None:
            for child in children.get(parent, []):
                lines.append("  " * depth + child.name)
                walk(child.context.span_id, depth + 1)

        walk(None, 0)
        return lines


@pytest.fixture(autouse=True)
def _isolated_spill_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exporters built without a spill dir must not write into the user's home."""
    monkeypatch.setenv("CMBAGENT_OTEL_SPILL_DIR", str(tmp_path_factory.mktemp("spill")))


@pytest.fixture
def capture() -> Iterator[SpanCapture]:
    """Routes cmbagent-otel's workflow spans to an in-memory exporter (no AG2 patching)."""
    cap = SpanCapture()
    try:
        with workflow_tracers.routed_to(cap.provider):
            yield cap
    finally:
        cap.provider.shutdown()


@pytest.fixture
def instrumented(capture: SpanCapture) -> Iterator[SpanCapture]:
    """AG2 instrumented into ``capture``; uninstrumented afterwards."""
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        yield capture
    finally:
        cmbagent_otel.uninstrument()
