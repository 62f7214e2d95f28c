"""Spill files round-trip spans exactly and replay only what was stored."""

from __future__ import annotations

from opentelemetry.trace import StatusCode

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.spill import SpillStore, record_to_span, span_to_record


def _spans(capture):
    try:
        with workflow("spilled", mode="one-shot"), phase("control"), step(1, "goal ü"):
            with TracedSpan("chat m", "llm", {"gen_ai.usage.input_tokens": 3, "list": ("a", "b")}):
                pass
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    return capture.spans


def test_round_trip_keeps_everything_the_exporters_read(capture):
    for span in _spans(capture):
        back = record_to_span(span_to_record(span))
        assert back.name == span.name
        assert back.context.trace_id == span.context.trace_id and back.context.span_id == span.context.span_id
        assert (back.parent.span_id if back.parent else None) == (span.parent.span_id if span.parent else None)
        assert dict(back.attributes) == dict(span.attributes)
        assert back.status.status_code == span.status.status_code
        assert back.status.description == span.status.description
        assert (back.start_time, back.end_time) == (span.start_time, span.end_time)
        events = [(e.name, dict(e.attributes)) for e in span.events]
        assert [(e.name, dict(e.attributes)) for e in back.events] == events
        assert dict(back.resource.attributes) == dict(span.resource.attributes)
        assert back.instrumentation_scope.name == span.instrumentation_scope.name
    assert any(s.status.status_code is StatusCode.ERROR for s in capture.spans)


def test_replay_stops_at_the_first_refused_batch_and_keeps_it(capture, tmp_path):
    store = SpillStore(tmp_path / "spill")
    spans = _spans(capture)
    store.append(spans[:2])
    store.append(spans[2:])
    (tmp_path / "spill" / "spill-partial.jsonl.tmp").write_text("{half")  # a crash mid-write
    seen = []
    assert store.replay(lambda batch: seen.append(len(batch)) or False) == (0, 2)
    assert len(store.pending()) == 2
    assert store.replay(lambda batch: seen.append(len(batch)) or True) == (len(spans), 0)
    assert store.pending() == []
    assert seen == [2, 2, len(spans) - 2]


def test_corrupt_file_is_set_aside_not_lost(tmp_path):
    store = SpillStore(tmp_path)
    bad = tmp_path / "spill-0-0-000001.jsonl"
    bad.write_text("not json\n")
    assert store.replay(lambda batch: True) == (0, 0)
    assert (tmp_path / "spill-0-0-000001.jsonl.bad").exists()
