"""Speaker selections recorded as span events land as the same ``handoff`` execution events as
``select_speaker`` spans: same node, parent event, order, agent, inputs and outputs; ids from the
span id and the event's index, so writing a batch again changes nothing."""

from __future__ import annotations

import json
import uuid
from typing import Any

from autogen import GroupChat, GroupChatManager
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, select

import cmbagent_otel
from cmbagent_otel import semconv as sc
from cmbagent_otel.dag.mapping import event_db_id, map_spans, node_db_id, span_event_db_id
from cmbagent_otel.dag.writer import DagWriter, T
from cmbagent_otel.demo import prepare_group
from cmbagent_otel.testing import offline_agent

HANDOFF = {sc.HANDOFF_FROM: "engineer", sc.HANDOFF_TO: "executor", sc.HANDOFF_REASON: "round_robin",
           sc.HANDOFF_CANDIDATES: ("engineer", "executor")}
MANAGER = {sc.SPAN_KIND: sc.KIND_AGENT, sc.EXECUTION_ORDER: 5, sc.EVENT_DEPTH: 1, sc.DAG_NODE: "conversation_1",
           sc.SESSION_ID: sc.DEFAULT_SESSION_ID, sc.GEN_AI_AGENT_NAME: "chat_manager"}


def _events(url: str) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(select(T["execution_events"])).mappings()]
    finally:
        engine.dispose()
    for row in rows:
        for key in ("meta", "inputs", "outputs"):
            if isinstance(row[key], str):
                row[key] = json.loads(row[key])
    return rows


def _record(event_form: bool) -> list[Any]:
    """The manager's span with one selection in it, as an event or as a child span."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("invoke_agent chat_manager", attributes=MANAGER) as manager:
        selection = {**HANDOFF, sc.SPAN_KIND: sc.KIND_SPEAKER_SELECTION, sc.EXECUTION_ORDER: 6, sc.EVENT_DEPTH: 2}
        if event_form:
            manager.add_event("cmbagent.handoff", selection)
        else:
            with tracer.start_as_current_span("select_speaker engineer", attributes={
                    **selection, sc.DAG_NODE: "conversation_1", sc.SESSION_ID: sc.DEFAULT_SESSION_ID}):
                pass
    return list(memory.get_finished_spans())


def test_either_form_maps_to_the_same_handoff_row() -> None:
    rows = []
    for event_form in (True, False):
        spans = _record(event_form)
        events = map_spans(spans).events
        (handoff,) = [e for e in events.values() if e["event_type"] == "handoff"]
        manager = next(s for s in spans if s.name == "invoke_agent chat_manager")
        assert handoff["parent_event_id"] == event_db_id(manager.context.trace_id, manager.context.span_id)
        if event_form:
            assert handoff["id"] == span_event_db_id(manager.context.trace_id, manager.context.span_id, 0)
            assert len(handoff["id"]) == 36 and handoff["duration_ms"] == 0
        rows.append(handoff)
    same = ("event_type", "event_subtype", "agent_name", "inputs", "outputs", "execution_order", "depth", "status",
            "error_message", "step_id", "session_id")
    assert {k: rows[0][k] for k in same} == {k: rows[1][k] for k in same}
    assert rows[0]["meta"]["span_name"] == rows[1]["meta"]["span_name"] == "select_speaker engineer"
    assert rows[0]["inputs"] == {"from": "engineer", "candidates": ["engineer", "executor"]}
    assert rows[0]["outputs"] == {"to": "executor", "reason": "round_robin"}
    assert rows[0]["node_id"] == node_db_id(rows[0]["run_id"], "conversation_1")  # the manager's node


def test_a_group_chat_writes_its_handoffs_once(db_url: str, tmp_path: Any) -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    first = offline_agent("first", ["one", "three"])
    second = offline_agent("second", ["two", "four"])
    prepare_group([first, second], str(tmp_path))
    chat = GroupChat([first, second], messages=[], max_round=4, speaker_selection_method="round_robin")
    manager = GroupChatManager(chat, llm_config=False)
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        first.initiate_chat(manager, message="begin", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
    spans = list(memory.get_finished_spans())
    writer = DagWriter(db_url)
    try:
        writer.write(spans)
        once = sorted(_events(db_url), key=lambda e: e["execution_order"])
        writer.write(spans)  # again, and the manager's span alone: nothing new, nothing changed
        writer.write([s for s in spans if s.name == "invoke_agent chat_manager"])
        twice = sorted(_events(db_url), key=lambda e: e["execution_order"])
    finally:
        writer.close()
    assert once == twice
    run_id = str(uuid.UUID(int=spans[0].context.trace_id))
    handoffs = [e for e in once if e["event_type"] == "handoff"]
    assert [(h["agent_name"], h["outputs"]["to"]) for h in handoffs] == [
        ("first", "second"), ("second", "first"), ("first", "second")]
    manager_span = next(s for s in spans if s.name == "invoke_agent chat_manager")
    manager_row = next(e for e in once if e["id"] == event_db_id(manager_span.context.trace_id,
                                                                 manager_span.context.span_id))
    for h in handoffs:
        assert h["node_id"] == node_db_id(run_id, "conversation_1")
        assert h["parent_event_id"] == manager_row["id"] and h["depth"] == manager_row["depth"] + 1
        assert h["status"] == "completed" and h["inputs"]["candidates"] == ["first", "second"]
    orders = [e["execution_order"] for e in once]
    assert len(orders) == len(set(orders))  # one execution order across spans and handoff events
