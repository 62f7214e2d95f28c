"""map_spans reads a span's fields once: straight from an SDK span's fields, through the
properties for any other span type (a subclass may compute them)."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

from cmbagent_otel import semconv as sc
from cmbagent_otel.dag.mapping import event_db_id, map_spans
from cmbagent_otel.processor import StartedSpan


def _span(cls: type[ReadableSpan] = ReadableSpan, **extra: Any) -> ReadableSpan:
    ctx = SpanContext(0x1234, 0x99, False, TraceFlags(TraceFlags.SAMPLED))
    parent = SpanContext(0x1234, 0x55, False, TraceFlags(TraceFlags.SAMPLED))
    values: dict[str, Any] = {
        "name": "chat model", "context": ctx, "parent": parent,
        "attributes": {sc.SPAN_KIND: sc.KIND_LLM, sc.EVENT_DEPTH: 1, sc.DAG_NODE: "step_1"},
        "status": Status(StatusCode.ERROR, "boom"), "start_time": 1_000_000_000, "end_time": 3_000_000_000,
    }
    values.update(extra)
    return cls(**values)


class _Renamed(ReadableSpan):
    """A span type whose properties are not its stored fields."""

    @property
    def name(self) -> str:
        return "renamed " + self._name

    @property
    def end_time(self) -> int | None:
        return 5_000_000_000


def test_sdk_span_fields_are_read_as_the_properties_give_them() -> None:
    span = _span()
    event = map_spans([span]).events[event_db_id(0x1234, 0x99)]
    assert event["meta"]["span_name"] == "chat model"
    assert event["duration_ms"] == 2000
    assert event["parent_event_id"] == event_db_id(0x1234, 0x55)
    assert event["status"] == "failed" and event["error_message"] == "boom"


def test_a_span_subclass_is_read_through_its_properties() -> None:
    event = map_spans([_span(_Renamed)]).events[event_db_id(0x1234, 0x99)]
    assert event["meta"]["span_name"] == "renamed chat model"
    assert event["duration_ms"] == 4000


def test_a_started_record_and_span_events_are_read() -> None:
    node = _span(StartedSpan, attributes={sc.SPAN_KIND: sc.KIND_STEP, sc.DAG_NODE: "step_1",
                                          sc.DAG_NODE_TYPE: sc.NODE_AGENT}, end_time=None)
    handoff = Event("cmbagent.handoff", {sc.SPAN_KIND: sc.KIND_SPEAKER_SELECTION, sc.HANDOFF_FROM: "a",
                                         sc.HANDOFF_TO: "b"}, 2_000_000_000)
    batch = map_spans([node, _span(events=[handoff])])
    assert [n["status"] for n in batch.started_nodes.values()] == ["running"]
    assert [e["outputs"]["to"] for e in batch.events.values() if e["event_type"] == "handoff"] == ["b"]


def test_span_events_in_the_sdks_bounded_list_are_read_as_a_tuple_of_them() -> None:
    """A finished SDK span hands its events over in a ``BoundedList`` (tested for emptiness through
    its deque, not its Python-level ``__len__``): empty or not, the rows are those of a tuple."""
    handoff = Event("cmbagent.handoff", {sc.SPAN_KIND: sc.KIND_SPEAKER_SELECTION, sc.HANDOFF_FROM: "a",
                                         sc.HANDOFF_TO: "b"}, 2_000_000_000)
    for items in ((), (handoff,)):
        held = BoundedList(None)
        held.extend(items)
        in_list, in_tuple = map_spans([_span(events=held)]), map_spans([_span(events=items)])
        assert in_list.events == in_tuple.events
        assert len(in_list.events) == 1 + len(items)
    assert [e["outputs"]["to"] for e in in_list.events.values() if e["event_type"] == "handoff"] == ["b"]
