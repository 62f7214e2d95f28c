"""A scripted planning/control run lands in the tracking tables exactly as specified."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from sqlalchemy import create_engine, select, text

from cmbagent_otel.dag.mapping import event_db_id, node_db_id, plain_attributes
from cmbagent_otel.dag.writer import DagWriter, T

from .scenario import TASK, run_scenario


def _rows(url: str, table: str) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            out = []
            for r in conn.execute(select(T[table])).mappings():
                row = dict(r)
                for key, value in row.items():
                    if isinstance(value, str) and key in ("meta", "inputs", "outputs", "conversation_history",
                                                          "context_variables"):
                        row[key] = json.loads(value)
                out.append(row)
            return out
    finally:
        engine.dispose()


def _write(url: str, provider: Any) -> tuple[str, list[Any]]:
    spans = list(provider.memory.get_finished_spans())
    DagWriter(url).write(spans)
    run_id = str(uuid.UUID(int=spans[0].context.trace_id))
    return run_id, spans


def test_scripted_run_rows(db_url: str, provider: Any) -> None:
    run_scenario()
    run_id, spans = _write(db_url, provider)

    runs = {r["id"]: r for r in _rows(db_url, "workflow_runs")}
    main = runs.pop(run_id)
    assert (main["mode"], main["agent"], main["model"], main["status"]) == (
        "planning-control", "engineer", "gpt-4o", "completed")
    assert main["task_description"] == TASK
    assert main["meta"]["task_id"] == "task-42" and main["meta"]["work_dir"] == "/tmp/work"
    assert main["meta"]["name"] == "scripted"
    assert (main["checkpoint_frequency_minutes"], main["is_branch"], main["branch_depth"]) == (10, False, 0)
    assert main["session_id"] == "default_session"
    assert main["started_at"].tzinfo is None and main["completed_at"] >= main["started_at"]

    nodes = {r["meta"]["id"]: r for r in _rows(db_url, "dag_nodes")}
    # the order index of phases and redos is the span side's (docs/spans.md); the writer copies it
    order = {s.attributes["cmbagent.dag.node"]: s.attributes["cmbagent.dag.order_index"] for s in spans
             if "cmbagent.dag.order_index" in s.attributes}
    expected_nodes = {
        # short id: (node_type, status, order_index, depth, parent short id, agent)
        "planning": ("planning", "completed", 0, 0, None, "planner"),
        "control": ("control", "completed", order["control"], 0, None, "control"),
        "step_1": ("agent", "completed", 1, 1, "control", "engineer"),
        "step_2": ("agent", "failed", 2, 1, "control", "engineer"),
        "step_3": ("agent", "completed", 3, 1, "control", "engineer"),
        "step_2_redo_1": ("redo", "failed", order["step_2_redo_1"], 2, "step_2", "engineer"),
        "step_2_redo_2": ("redo", "completed", order["step_2_redo_2"], 2, "step_2", "engineer"),  # the step's agent
        "branch_at_step_2": ("branch_point", "completed", 2000, 2, "step_2", "system"),
        "terminator": ("terminator", "completed", 4, 0, None, "system"),
    }
    assert set(nodes) == set(expected_nodes)
    for short, (node_type, status, order, depth, parent, agent) in expected_nodes.items():
        node = nodes[short]
        assert node["id"] == node_db_id(run_id, short)
        assert node["run_id"] == run_id
        got = (node["node_type"], node["status"], node["order_index"], node["depth"], node["parent_node_id"],
               node["agent"])
        assert got == (node_type, status, order, depth, parent and node_db_id(run_id, parent), agent), short
        assert node["meta"]["status"] == status and node["meta"]["type"] == node_type
    assert nodes["step_2"]["meta"]["label"] == "Step 2: fit the model"
    assert nodes["step_2"]["meta"]["goal"] == "fit the model"
    assert nodes["step_2"]["meta"]["error"] == "initial attempt failed"
    assert nodes["step_2"]["meta"]["step_number"] == 2
    assert nodes["step_2_redo_1"]["meta"]["error"] == "still failing"
    assert nodes["step_2_redo_2"]["meta"]["hypothesis"] == "switch to MCMC"
    # usage totals over each node's subtree: integers (cmbagent adds meta["tokens"] to an int)
    usage = {short: (n["meta"]["tokens"], n["meta"]["prompt_tokens"], n["meta"]["completion_tokens"],
                     round(n["meta"]["cost_usd"], 9)) for short, n in nodes.items()}
    assert usage == {
        "planning": (150, 100, 50, 0.001), "step_1": (280, 200, 80, 0.002),
        "step_2_redo_1": (390, 300, 90, 0.003), "step_2_redo_2": (405, 310, 95, 0.004),
        "step_2": (795, 610, 185, 0.007), "step_3": (70, 50, 20, 0.0005),
        "control": (1145, 860, 285, 0.0095), "branch_at_step_2": (0, 0, 0, 0.0), "terminator": (0, 0, 0, 0.0),
    }
    assert all(type(n["meta"]["tokens"]) is int for n in nodes.values())

    short_of = {n["id"]: s for s, n in nodes.items()}
    edges = sorted((short_of[e["from_node_id"]], short_of[e["to_node_id"]], e["dependency_type"], e["condition"])
                   for e in _rows(db_url, "dag_edges"))
    assert edges == sorted([
        # cmbagent's chain
        ("planning", "step_1", "sequential", None),
        ("step_1", "step_2", "sequential", None),
        ("step_2", "step_3", "sequential", None),
        ("step_3", "terminator", "sequential", None),
        # redo branches
        ("step_2", "branch_at_step_2", "sequential", None),
        ("branch_at_step_2", "step_2_redo_1", "conditional", "branch_redo_1"),
        ("branch_at_step_2", "step_2_redo_2", "conditional", "branch_redo_2"),
        # top-level siblings, parent -> first child, consecutive siblings
        ("planning", "control", "sequential", None),
        ("control", "step_1", "sequential", None),
        ("step_2", "step_2_redo_1", "sequential", None),
        ("step_2_redo_1", "step_2_redo_2", "sequential", None),
    ])

    events = sorted(_rows(db_url, "execution_events"), key=lambda e: e["execution_order"])
    got_events = [(short_of[e["node_id"]], e["event_type"], e["event_subtype"], e["agent_name"], e["status"],
                   e["depth"], e["parent_event_id"]) for e in events]
    assert got_events == [
        ("planning", "agent_call", "llm", "planner", "completed", 0, None),
        ("step_1", "agent_call", "llm", "engineer", "completed", 0, None),
        ("step_1", "code_exec", "complete", "executor", "completed", 0, None),
        ("step_2", "code_exec", "error", "executor", "failed", 0, None),
        ("step_2_redo_1", "agent_call", "llm", "engineer", "completed", 0, None),
        ("step_2_redo_1", "code_exec", "error", "executor", "failed", 0, None),
        ("step_2_redo_2", "agent_call", "llm", "engineer", "completed", 0, None),
        ("step_2_redo_2", "code_exec", "complete", "executor", "completed", 0, None),
        ("step_3", "agent_call", "llm", "engineer", "completed", 0, None),
    ]
    orders = [e["execution_order"] for e in events]
    assert orders == sorted(set(orders))
    by_span = {s.context.span_id: s for s in spans}
    for e in events:
        span = by_span[int(e["meta"]["span_id"], 16)]
        assert e["id"] == event_db_id(span.context.trace_id, span.context.span_id)
        assert e["timestamp"] == e["started_at"] and e["completed_at"] >= e["started_at"]
        assert e["duration_ms"] is not None and e["run_id"] == run_id and e["session_id"] == "default_session"
        assert e["meta"]["span_name"] == span.name and e["meta"]["attributes"]["cmbagent.span.kind"]
    llm_meta = [e["meta"] for e in events if e["event_subtype"] == "llm"]
    assert [(m["tokens"], m["prompt_tokens"], m["completion_tokens"]) for m in llm_meta] == [
        (p + c, p, c) for p, c in ((100, 50), (200, 80), (300, 90), (310, 95), (50, 20))]
    assert all(type(m["tokens"]) is int for m in llm_meta)
    assert [m["cost_usd"] for m in llm_meta] == [0.001, 0.002, 0.003, 0.004, 0.0005]
    # usage counts are not secrets: "*_tokens" keys are kept, only "*token" keys are redacted
    assert [(m["attributes"]["gen_ai.usage.input_tokens"], m["attributes"]["gen_ai.usage.output_tokens"])
            for m in llm_meta] == [(100, 50), (200, 80), (300, 90), (310, 95), (50, 20)]
    failed_code = [e for e in events if e["event_subtype"] == "error"]
    assert {e["error_message"] for e in failed_code} == {"exit code 1"}
    assert all(e["outputs"]["exit_code"] == 1 for e in failed_code)

    # branches: a workflow_steps row in the parent run, child runs and branches rows
    steps = _rows(db_url, "workflow_steps")

    # one cost record per agent and model per phase/step/redo (what cmbagent's cost collector
    # writes per CMBAgent instance), timestamped at the scope's last LLM call
    costs = sorted((c["model"], c["agent_name"], c["prompt_tokens"], c["completion_tokens"], c["total_tokens"],
                    Decimal(str(c["cost_usd"])).quantize(Decimal("0.000001")), c["run_id"], c["session_id"],
                    c["step_id"], c["parent_run_id"]) for c in _rows(db_url, "cost_records"))
    q = Decimal("0.000001")
    step_2_row = steps[0]["id"]
    assert costs == sorted([
        ("gpt-4o", "planner", 100, 50, 150, Decimal("0.001").quantize(q), run_id, "default_session", None, None),
        ("gpt-4o", "engineer", 200, 80, 280, Decimal("0.002").quantize(q), run_id, "default_session", None, None),
        ("gpt-4o", "engineer", 300, 90, 390, Decimal("0.003").quantize(q), run_id, "default_session", step_2_row,
         None),
        ("gpt-4o", "engineer", 310, 95, 405, Decimal("0.004").quantize(q), run_id, "default_session", step_2_row,
         None),
        ("gpt-4o", "engineer", 50, 20, 70, Decimal("0.0005").quantize(q), run_id, "default_session", None, None),
    ])
    llm_end = {e["meta"]["tokens"]: e["completed_at"] for e in events if e["event_subtype"] == "llm"}
    assert sorted(c["timestamp"] for c in _rows(db_url, "cost_records")) == sorted(llm_end.values())

    assert [(s["run_id"], s["step_number"], s["goal"], s["status"], s["progress_percentage"]) for s in steps] == [
        (run_id, 2, "fit the model", "failed", 0)]
    children = sorted(runs.values(), key=lambda r: r["meta"]["branch_name"])
    assert [(r["is_branch"], r["branch_parent_id"], r["branch_depth"], r["status"], r["meta"]["branch_name"],
             r["meta"]["hypothesis"], r["mode"]) for r in children] == [
        (True, run_id, 1, "failed", "step_2_redo_1", "use a smaller learning rate", "planning-control"),
        (True, run_id, 1, "completed", "step_2_redo_2", "switch to MCMC", "planning-control"),
    ]
    branches = sorted(_rows(db_url, "branches"), key=lambda b: b["branch_name"])
    assert [(b["parent_run_id"], b["parent_step_id"], b["child_run_id"], b["branch_name"], b["status"])
            for b in branches] == [
        (run_id, steps[0]["id"], children[0]["id"], "step_2_redo_1", "abandoned"),
        (run_id, steps[0]["id"], children[1]["id"], "step_2_redo_2", "completed"),
    ]

    sessions = _rows(db_url, "sessions")
    assert [(s["id"], s["name"], s["status"]) for s in sessions] == [("default_session", "Default Session", "active")]
    states = _rows(db_url, "session_states")
    assert [(s["session_id"], s["mode"], s["status"], s["current_phase"], s["conversation_history"], s["version"])
            for s in states] == [("default_session", "planning-control", "completed", "control", [], 1)]
    assert _rows(db_url, "messages") == []


def test_idempotent_rewrite(db_url: str, provider: Any) -> None:
    run_scenario()
    spans = list(provider.memory.get_finished_spans())
    writer = DagWriter(db_url)
    writer.write(spans)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        before = {name: conn.execute(text(f"SELECT COUNT(*) FROM {name}")).scalar() for name in T}
    writer.write(spans)
    writer.write(spans[::-1])
    with engine.connect() as conn:
        after = {name: conn.execute(text(f"SELECT COUNT(*) FROM {name}")).scalar() for name in T}
    engine.dispose()
    writer.close()
    assert before == after
    assert after["cost_records"] == 5 and after["dag_edges"] == 11 and after["execution_events"] == 9


def test_trace_without_workflow_is_a_run(sqlite_url: str, provider: Any) -> None:
    from .scenario import llm

    with llm("assistant", 1, 2, 0.0):
        pass
    spans = list(provider.memory.get_finished_spans())
    DagWriter(sqlite_url).write(spans)
    runs = _rows(sqlite_url, "workflow_runs")
    assert [(r["mode"], r["status"], r["meta"]["otel_source"]) for r in runs] == [("ag2-chat", "completed", "root")]
    events = _rows(sqlite_url, "execution_events")
    assert [(e["event_type"], e["event_subtype"], e["node_id"]) for e in events] == [("agent_call", "llm", None)]
    assert _rows(sqlite_url, "dag_nodes") == []


@pytest.mark.parametrize("capture", [True])
def test_messages_only_with_content(sqlite_url: str, provider: Any, capture: bool) -> None:
    from cmbagent_otel import semconv as sc
    from cmbagent_otel._spans import TracedSpan

    with TracedSpan("chat gpt-4o", sc.KIND_LLM, {
        sc.GEN_AI_AGENT_NAME: "engineer",
        sc.GEN_AI_INPUT_MESSAGES: json.dumps([{"role": "user", "content": "hi"}]),
        sc.GEN_AI_OUTPUT_MESSAGES: json.dumps(["hello there"]),
    }):
        pass
    spans = list(provider.memory.get_finished_spans())
    DagWriter(sqlite_url).write(spans)
    DagWriter(sqlite_url).write(spans)
    msgs = sorted((m["sender"], m["recipient"], m["content"]) for m in _rows(sqlite_url, "messages"))
    assert msgs == [("engineer", "user", "hello there"), ("user", "engineer", "hi")]


class _MappingWithoutCopy(Mapping[str, Any]):
    """An attribute mapping without ``copy()`` (older SDKs' BoundedAttributes had none)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.mark.parametrize("container", [dict, _MappingWithoutCopy])
def test_plain_attributes_copies_any_attribute_mapping(provider: Any, container: Any) -> None:
    with provider.get_tracer("test").start_as_current_span("s", attributes={"a": 1, "b": ("x", "y")}):
        pass
    recorded = provider.memory.get_finished_spans()[0]
    assert plain_attributes(recorded) == {"a": 1, "b": ("x", "y")}
    copy = plain_attributes(recorded)
    copy["a"] = 2
    assert recorded.attributes["a"] == 1  # a copy, never the span's own mapping

    span = ReadableSpan(name="s", context=recorded.context, attributes=container({"a": 1}))
    assert plain_attributes(span) == {"a": 1}
    assert type(plain_attributes(span)) is dict
    assert plain_attributes(ReadableSpan(name="s", context=recorded.context)) == {}


def _llm_span(trace_id: int, span_id: int, **extra: Any) -> ReadableSpan:
    from opentelemetry.trace import SpanContext, Status, StatusCode

    attributes: dict[str, Any] = {
        "cmbagent.span.kind": "llm", "cmbagent.execution_order": 3, "cmbagent.dag.node": "planning",
        "gen_ai.agent.name": "planner", "gen_ai.request.model": "m", "gen_ai.response.id": "r-1",
        "gen_ai.response.finish_reasons": ("stop",), "gen_ai.usage.input_tokens": 4, **extra,
    }
    return ReadableSpan(
        name="chat m", context=SpanContext(trace_id, span_id, False),
        parent=SpanContext(trace_id, span_id + 1, False), attributes=attributes,
        status=Status(StatusCode.OK), start_time=1_700_000_000_000_000_000, end_time=1_700_000_001_000_000_000)


def test_event_attributes_checked_and_scrubbed_in_one_pass() -> None:
    """An event span of ours whose keys are known is checked for unstorable text in the same pass
    that scrubs its attributes: a NUL or lone surrogate still makes the sanitized copy (in a value
    and in a tuple item), and a text the redaction memo has not seen is still redacted."""
    from cmbagent_otel import redaction
    from cmbagent_otel.dag.mapping import map_spans

    secret_text = "connect with api_key=sk-live-0123456789abcdefABCDEF please"
    assert redaction.redact(secret_text) != secret_text
    map_spans([_llm_span(0xA1, 0x10)])  # the keys are classified and checked once
    spans = [_llm_span(0xA1, 0x20, **{"gen_ai.response.id": "r\x00-2"}),
             _llm_span(0xA1, 0x30, **{"gen_ai.response.finish_reasons": ("stop", "x\ud800")}),
             _llm_span(0xA1, 0x40, **{"gen_ai.response.id": secret_text})]
    events = {e["meta"]["span_id"]: e for e in map_spans(spans).events.values()}
    assert events[f"{0x20:016x}"]["meta"]["attributes"]["gen_ai.response.id"] == "r\ufffd-2"
    assert events[f"{0x30:016x}"]["meta"]["attributes"]["gen_ai.response.finish_reasons"] == ["stop", "x\ufffd"]
    assert events[f"{0x40:016x}"]["meta"]["attributes"]["gen_ai.response.id"] == redaction.redact(secret_text)
    assert events[f"{0x40:016x}"]["meta"]["attributes"]["gen_ai.agent.name"] == "planner"


def test_event_attributes_scrubbed_again_after_a_secret_is_registered() -> None:
    """A text an earlier span's attributes held, storable and scrubbed to itself then, is redacted in
    a later span once a secret it contains is registered (the texts checked storable and scrubbed
    are remembered per redaction memo)."""
    import secrets as random_secrets

    from cmbagent_otel import redaction
    from cmbagent_otel.dag.mapping import map_spans

    shapeless = f"MARKER{random_secrets.token_urlsafe(24)}"
    text = f"use {shapeless} for the archive"
    first = map_spans([_llm_span(0xA2, 0x10, **{"gen_ai.response.id": text})])
    assert [e["meta"]["attributes"]["gen_ai.response.id"] for e in first.events.values()] == [text]
    again = map_spans([_llm_span(0xA2, 0x20, **{"gen_ai.response.id": text})])  # remembered as clean now
    assert [e["meta"]["attributes"]["gen_ai.response.id"] for e in again.events.values()] == [text]
    redaction.register_secret(shapeless)
    later = map_spans([_llm_span(0xA2, 0x30, **{"gen_ai.response.id": text})])
    assert [e["meta"]["attributes"]["gen_ai.response.id"] for e in later.events.values()] == [
        f"use {redaction.REDACTED} for the archive"]
