"""Property test: any span forest written by ``DagWriter`` leaves a consistent SQLite DB.

Hypothesis generates forests the way the instrumentation shapes them (workflow root,
DAG-node spans, event spans nested in nodes and in each other, spans of other
instrumentations without ``cmbagent.span.kind``), then damages them: parents that never
arrive, duplicate spans, shuffled batches, missing and wrong-typed attributes, huge
values, odd and non-UTF-8 strings, end before start. Invariants checked on the file:

* every referenced parent row (node, event, run, session) exists;
* ``depth == parent depth + 1`` for nodes and events whose spans were not damaged;
* a write that fails leaves the database exactly as it was (one transaction);
* writing the same spans again changes nothing (idempotent).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags
from sqlalchemy import create_engine

from cmbagent_otel import semconv as sc
from cmbagent_otel.dag.database import ensure_schema
from cmbagent_otel.dag.mapping import db_text, event_db_id, node_db_id, run_id_of
from cmbagent_otel.dag.writer import DagWriter, dump_tables

EVENT_KINDS = [sc.KIND_AGENT, sc.KIND_LLM, sc.KIND_TOOL, sc.KIND_CODE, sc.KIND_SPEAKER_SELECTION,
               sc.KIND_HUMAN_INPUT, sc.KIND_CONVERSATION, sc.KIND_MULTI_CONVERSATION, None]
NODE_TYPES = [(sc.KIND_PHASE, sc.NODE_PLANNING), (sc.KIND_PHASE, sc.NODE_CONTROL), (sc.KIND_STEP, sc.NODE_AGENT),
              (sc.KIND_BRANCH, sc.NODE_REDO), (sc.KIND_AGENT, sc.NODE_SUB_AGENT)]
STRUCTURAL = (sc.DAG_NODE, sc.DAG_PARENT_NODE, sc.DAG_DEPTH, sc.EVENT_DEPTH, sc.DAG_NODE_TYPE, sc.SPAN_KIND)
ODD_STRINGS = ["", " ", "é🙂\u0000nul", "'; DROP TABLE dag_nodes; --", "\u202eRTL", "x" * 200_000, "\ud800\udfff"]
T0 = 1_700_000_000_000_000_000


@dataclass
class Forest:
    spans: list[ReadableSpan] = field(default_factory=list)
    damaged: set[tuple[int, int]] = field(default_factory=set)  # (trace id, span id) with broken structure


def _ctx(trace_id: int, span_id: int) -> SpanContext:
    return SpanContext(trace_id, span_id, False, TraceFlags(TraceFlags.SAMPLED))


@st.composite
def forests(draw: Any) -> Forest:
    forest = Forest()
    rnd = random.Random(draw(st.integers(0, 2**32)))
    next_span = iter(range(draw(st.integers(1, 2**40)), 2**63))
    for _ in range(draw(st.integers(1, 3))):
        trace_id = draw(st.integers(1, 2**128 - 1))
        order = iter(range(1, 10_000))
        # (span id, node short id or None, node depth, event depth of children, is node)
        scopes: list[tuple[int, str | None, int, int]] = []
        with_workflow = draw(st.booleans())
        if with_workflow:
            root = next(next_span)
            scopes.append((root, None, -1, 0))
            forest.spans.append(_span(trace_id, root, None, "workflow planning_and_control", {
                sc.SPAN_KIND: sc.KIND_WORKFLOW, sc.EXECUTION_ORDER: next(order), sc.SESSION_ID: "s1",
                sc.WORKFLOW_MODE: "planning-control", sc.WORKFLOW_TASK: "task"}, rnd))
        for _ in range(draw(st.integers(1, 14))):
            span_id = next(next_span)
            parent = rnd.choice(scopes) if scopes and rnd.random() < 0.85 else None
            parent_span, parent_node, node_depth, event_depth = parent or (None, None, -1, 0)
            if parent is not None and rnd.random() < 0.1:
                parent_span = next(next_span)  # a parent that never arrives
            attrs: dict[str, Any] = {sc.EXECUTION_ORDER: next(order), sc.SESSION_ID: "s1"}
            if rnd.random() < 0.35:
                kind, node_type = rnd.choice(NODE_TYPES)
                short = f"{parent_node or 'n'}_{span_id % 1000}_{node_type}"
                attrs.update({sc.SPAN_KIND: kind, sc.DAG_NODE: short, sc.DAG_NODE_TYPE: node_type,
                              sc.DAG_DEPTH: node_depth + 1, sc.DAG_ORDER_INDEX: rnd.randint(0, 5)})
                if parent_node is not None:
                    attrs[sc.DAG_PARENT_NODE] = parent_node
                if kind == sc.KIND_STEP:
                    attrs[sc.STEP_NUMBER] = rnd.randint(1, 4)
                    attrs[sc.STEP_GOAL] = "goal"
                scopes.append((span_id, short, node_depth + 1, 0))
            else:
                kind = rnd.choice(EVENT_KINDS)
                if kind is not None:
                    attrs.update({sc.SPAN_KIND: kind, sc.EVENT_DEPTH: event_depth})
                    if parent_node is not None:
                        attrs[sc.DAG_NODE] = parent_node
                else:
                    attrs = {"http.method": "POST"}  # another instrumentation's span
                if kind == sc.KIND_LLM:
                    attrs.update({sc.GEN_AI_REQUEST_MODEL: "gpt", sc.GEN_AI_USAGE_INPUT_TOKENS: rnd.randint(0, 99),
                                  sc.GEN_AI_USAGE_OUTPUT_TOKENS: rnd.randint(0, 99), sc.LLM_COST_USD: 0.01,
                                  sc.GEN_AI_INPUT_MESSAGES: '[{"role": "user", "content": "hi"}]'})
                if kind is not None:
                    attrs[sc.GEN_AI_AGENT_NAME] = rnd.choice(["engineer", "researcher"])
                # another instrumentation's span does not count in cmbagent.event.depth
                scopes.append((span_id, parent_node, node_depth, event_depth + (kind is not None)))
            span = _span(trace_id, span_id, parent_span, f"span {kind}", attrs, rnd)
            if span.attributes is not None and any(span.attributes.get(k) != attrs.get(k) for k in STRUCTURAL):
                forest.damaged.add((trace_id, span_id))
            forest.spans.append(span)
    for span in list(forest.spans):
        if rnd.random() < 0.15:
            forest.spans.append(span)  # exporters may deliver a span twice
    rnd.shuffle(forest.spans)
    return forest


def _damage(attrs: dict[str, Any], rnd: random.Random) -> dict[str, Any]:
    out = dict(attrs)
    for _ in range(rnd.choice([0, 0, 1, 2])):
        key = rnd.choice(sorted(out) or [sc.SPAN_KIND])
        action = rnd.choice(["drop", "type", "huge", "odd"])
        if action == "drop":
            out.pop(key, None)
        elif action == "type":
            out[key] = rnd.choice(["seven", 7, 3.5, True, ("a", "b"), (1, 2)])
        elif action == "huge":
            out[key] = "h" * rnd.choice([5_000, 300_000])
        else:
            out[key] = rnd.choice(ODD_STRINGS)
    return out


def _span(trace_id: int, span_id: int, parent: int | None, name: str, attrs: dict[str, Any],
          rnd: random.Random) -> ReadableSpan:
    start = T0 + rnd.randint(0, 10**12)
    end = start + rnd.randint(-10**9, 10**10)  # clock skew: end may precede start
    failed = rnd.random() < 0.2
    return ReadableSpan(
        name=rnd.choice([name, name, rnd.choice(ODD_STRINGS)]),
        context=_ctx(trace_id, span_id),
        parent=_ctx(trace_id, parent) if parent is not None else None,
        attributes=_damage(attrs, rnd),
        start_time=start,
        end_time=end,
        status=Status(StatusCode.ERROR, "boom") if failed else Status(StatusCode.UNSET),
    )


# --- database helpers --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template_db() -> Iterator[Path]:
    """One migrated empty database; each example works on a copy (migrations run once)."""
    with tempfile.TemporaryDirectory(prefix="cmbagent-otel-prop-") as tmp:
        path = Path(tmp) / "template.db"
        ensure_schema(f"sqlite:///{path}")
        yield path


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            return dump_tables(conn)
    finally:
        engine.dispose()


def write(path: Path, spans: list[ReadableSpan], batch: int) -> BaseException | None:
    """Write in batches of ``batch``; the first exception (the failing batch is the last tried)."""
    writer = DagWriter(f"sqlite:///{path}", migrate=False)
    try:
        for start in range(0, len(spans), batch):
            before = dump(path)
            try:
                writer.write(spans[start:start + batch])
            except Exception as exc:
                assert dump(path) == before, "a failed write left a partial transaction behind"
                return exc
    finally:
        writer.close()
    return None


def check_invariants(path: Path, forest: Forest) -> None:
    conn = sqlite3.connect(path)
    try:
        q = conn.execute
        orphans = {
            "node parent": "SELECT id FROM dag_nodes WHERE parent_node_id IS NOT NULL AND parent_node_id NOT IN "
                           "(SELECT id FROM dag_nodes)",
            "event parent": "SELECT id FROM execution_events WHERE parent_event_id IS NOT NULL AND parent_event_id "
                            "NOT IN (SELECT id FROM execution_events)",
            "event node": "SELECT id FROM execution_events WHERE node_id IS NOT NULL AND node_id NOT IN "
                          "(SELECT id FROM dag_nodes)",
            "event run": "SELECT id FROM execution_events WHERE run_id NOT IN (SELECT id FROM workflow_runs)",
            "node run": "SELECT id FROM dag_nodes WHERE run_id NOT IN (SELECT id FROM workflow_runs)",
            "run session": "SELECT id FROM workflow_runs WHERE session_id NOT IN (SELECT id FROM sessions)",
            "edge ends": "SELECT id FROM dag_edges WHERE from_node_id NOT IN (SELECT id FROM dag_nodes) OR "
                         "to_node_id NOT IN (SELECT id FROM dag_nodes)",
            "cost run": "SELECT id FROM cost_records WHERE run_id NOT IN (SELECT id FROM workflow_runs)",
            "message event": "SELECT id FROM messages WHERE event_id IS NOT NULL AND event_id NOT IN "
                             "(SELECT id FROM execution_events)",
        }
        for what, sql in orphans.items():
            assert q(sql).fetchall() == [], f"dangling reference: {what}"

        damaged_events = {event_db_id(t, s) for t, s in forest.damaged}
        damaged_nodes: set[str] = set()
        by_key = {(s.context.trace_id, s.context.span_id): s for s in forest.spans}
        for span in forest.spans:
            key = (span.context.trace_id, span.context.span_id)
            short = (span.attributes or {}).get(sc.DAG_NODE)
            if key in forest.damaged and short is not None:
                # the writer's node id from a damaged short id: text made DB-safe, other types str()
                short_id = db_text(short) if isinstance(short, str) else str(short)
                damaged_nodes.add(node_db_id(run_id_of(key[0]), short_id))
            if _chain_damaged(span, by_key, forest.damaged):
                damaged_events.add(event_db_id(*key))
        bad_events = q(
            "SELECT e.id, e.depth, p.id, p.depth FROM execution_events e JOIN execution_events p "
            "ON e.parent_event_id = p.id WHERE e.depth != p.depth + 1").fetchall()
        assert [r for r in bad_events if r[0] not in damaged_events and r[2] not in damaged_events] == []
        bad_nodes = q(
            "SELECT n.id, n.depth, p.id, p.depth, p.meta, n.meta FROM dag_nodes n JOIN dag_nodes p "
            "ON n.parent_node_id = p.id WHERE n.depth != p.depth + 1").fetchall()
        # placeholders (parent spans not arrived) carry no depth yet; derived rows (branch points)
        # take their depth from the redo node they stand for, checked through that node
        assert [r for r in bad_nodes if r[0] not in damaged_nodes and r[2] not in damaged_nodes
                and not _flag(r[4], "placeholder") and not _flag(r[4], "derived") and not _flag(r[5], "derived")] == []
    finally:
        conn.close()


def _flag(meta: str | None, key: str) -> bool:
    """Whether a stored JSON ``meta`` text sets ``key`` to true."""
    value = json.loads(meta) if meta else None
    return isinstance(value, dict) and value.get(key) is True


def _chain_damaged(span: ReadableSpan, by_key: dict[tuple[int, int], ReadableSpan],
                   damaged: set[tuple[int, int]]) -> bool:
    """Whether the way up from ``span`` to its nearest cmbagent ancestor is broken, so its
    ``cmbagent.event.depth`` cannot match the writer's parent: a span on the way is damaged
    (a parent that lost its kind counts as another instrumentation's span, and the child is
    re-attached past it), or another instrumentation's span on the way has a parent that
    never arrives (the child then stays under that span, keeping its own depth)."""
    parent = span.parent
    passed_foreign = False
    while parent is not None:
        key = (span.context.trace_id, parent.span_id)
        if key in damaged:
            return True
        above = by_key.get(key)
        if above is None:
            return passed_foreign
        if (above.attributes or {}).get(sc.SPAN_KIND) is not None:
            return False
        passed_foreign = True
        parent = above.parent
    return passed_foreign


# CI runs the same 50 forests every time (derandomized: no flakes); to explore further, run
# locally with CMBAGENT_OTEL_PROPERTY_EXAMPLES=500 (random forests, a fresh seed each run).
EXPLORE = int(os.environ.get("CMBAGENT_OTEL_PROPERTY_EXAMPLES", "0"))


@settings(max_examples=EXPLORE or 50, deadline=None, derandomize=not EXPLORE, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(forest=forests(), batch=st.sampled_from([1, 3, 7, 1000]))
def test_any_forest_leaves_a_consistent_database(template_db: Path, forest: Forest, batch: int) -> None:
    with tempfile.TemporaryDirectory(prefix="cmbagent-otel-prop-") as tmp:
        db = Path(tmp) / "dag.db"
        shutil.copy(template_db, db)
        error = write(db, forest.spans, batch)
        check_invariants(db, forest)
        # bad spans get a documented fallback, never a failed batch (which would lose the good ones)
        assert error is None, repr(error)[:500]
        first = dump(db)
        assert write(db, forest.spans, batch) is None
        second = dump(db)
        changed = {t: (sorted(set(first[t]) - set(second[t]))[:3], sorted(set(second[t]) - set(first[t]))[:3])
                   for t in first if first[t] != second[t]}
        assert not changed, f"writing the same spans again changed the database: {changed}"


def _plain(trace_id: int, span_id: int, parent: int | None, name: str, attrs: dict[str, Any]) -> ReadableSpan:
    start = T0 + span_id * 1000
    return ReadableSpan(name=name, context=_ctx(trace_id, span_id),
                        parent=_ctx(trace_id, parent) if parent is not None else None,
                        attributes=attrs, start_time=start, end_time=start + 10**9 - span_id)


def _depth_pairs(db: Path) -> list[tuple[int, int]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT e.depth, p.depth FROM execution_events e JOIN execution_events p "
                            "ON e.parent_event_id = p.id").fetchall()
    finally:
        conn.close()


def test_event_under_foreign_span(template_db: Path, tmp_path: Path) -> None:
    """workflow > conversation (event depth 0) > user's own span > speaker selection (event depth 1)."""
    base = {sc.SESSION_ID: "s1"}
    spans = [
        _plain(9, 1, None, "workflow", {**base, sc.SPAN_KIND: sc.KIND_WORKFLOW, sc.EXECUTION_ORDER: 1}),
        _plain(9, 2, 1, "conversation", {**base, sc.SPAN_KIND: sc.KIND_CONVERSATION, sc.EXECUTION_ORDER: 2,
                                         sc.EVENT_DEPTH: 0}),
        _plain(9, 3, 2, "my own span", {"app.step": "x"}),
        _plain(9, 4, 3, "select_speaker", {**base, sc.SPAN_KIND: sc.KIND_SPEAKER_SELECTION, sc.EXECUTION_ORDER: 3,
                                           sc.EVENT_DEPTH: 1}),
    ]
    db = tmp_path / "dag.db"
    shutil.copy(template_db, db)
    assert write(db, spans, 10) is None
    rows = _depth_pairs(db)
    assert len(rows) == 2 and all(child == parent + 1 for child, parent in rows), rows


def test_node_with_missing_depth_before_its_parent(template_db: Path, tmp_path: Path) -> None:
    base = {sc.SESSION_ID: "s1", sc.DAG_ORDER_INDEX: 1}
    spans = [
        _plain(5, 1, None, "phase control", {**base, sc.SPAN_KIND: sc.KIND_PHASE, sc.DAG_NODE: "control",
                                             sc.DAG_NODE_TYPE: sc.NODE_CONTROL, sc.DAG_DEPTH: 1}),
        _plain(5, 2, 1, "step 1", {**base, sc.SPAN_KIND: sc.KIND_STEP, sc.DAG_NODE: "step_1",
                                   sc.DAG_NODE_TYPE: sc.NODE_AGENT, sc.DAG_PARENT_NODE: "control"}),
    ]
    db = tmp_path / "dag.db"
    shutil.copy(template_db, db)
    error = write(db, spans, 10)
    assert error is None, repr(error)


def test_node_cycle_is_broken_not_fatal(template_db: Path, tmp_path: Path) -> None:
    base = {sc.SESSION_ID: "s1", sc.SPAN_KIND: sc.KIND_STEP, sc.DAG_NODE_TYPE: sc.NODE_AGENT}
    spans = [
        _plain(6, 1, None, "a", {**base, sc.DAG_NODE: "a", sc.DAG_PARENT_NODE: "b", sc.DAG_DEPTH: 1}),
        _plain(6, 2, None, "b", {**base, sc.DAG_NODE: "b", sc.DAG_PARENT_NODE: "a", sc.DAG_DEPTH: 1}),
    ]
    db = tmp_path / "dag.db"
    shutil.copy(template_db, db)
    assert write(db, spans, 10) is None
    conn = sqlite3.connect(db)
    try:
        parents = dict(conn.execute("SELECT json_extract(meta, '$.id'), parent_node_id FROM dag_nodes "
                                    "WHERE json_extract(meta, '$.id') IN ('a', 'b')").fetchall())
    finally:
        conn.close()
    assert sorted(parents) == ["a", "b"]
    assert sorted(p is None for p in parents.values()) == [False, True]  # one link kept, the closing one dropped


def test_text_no_database_accepts_is_replaced(template_db: Path, tmp_path: Path) -> None:
    """Lone surrogates and NUL in names, ids and columns; a tuple goal; a non-numeric cost."""
    odd = "bad\ud800text\x00end"
    base = {sc.SESSION_ID: "s1"}
    spans = [
        _plain(7, 1, None, "workflow " + odd, {**base, sc.SPAN_KIND: sc.KIND_WORKFLOW, sc.WORKFLOW_TASK: ("a", odd)}),
        _plain(7, 2, 1, odd, {**base, sc.SPAN_KIND: sc.KIND_STEP, sc.DAG_NODE: "step_" + odd,
                              sc.DAG_NODE_TYPE: sc.NODE_AGENT, sc.DAG_DEPTH: 0, sc.STEP_GOAL: ("g", odd)}),
        _plain(7, 3, 2, "chat", {**base, sc.SPAN_KIND: sc.KIND_LLM, sc.DAG_NODE: "step_" + odd, sc.EVENT_DEPTH: 0,
                                 sc.GEN_AI_AGENT_NAME: odd, sc.GEN_AI_USAGE_INPUT_TOKENS: 5,
                                 sc.LLM_COST_USD: "free", sc.EXECUTION_ORDER: 2**40}),
    ]
    db = tmp_path / "dag.db"
    shutil.copy(template_db, db)
    assert write(db, spans, 10) is None
    conn = sqlite3.connect(db)
    try:
        task, = conn.execute("SELECT task_description FROM workflow_runs").fetchone()
        agent, order = conn.execute("SELECT agent_name, execution_order FROM execution_events").fetchone()
        short, = conn.execute("SELECT json_extract(meta, '$.id') FROM dag_nodes").fetchone()
        cost, = conn.execute("SELECT cost_usd FROM cost_records").fetchone()
    finally:
        conn.close()
    clean = "bad\ufffdtext\ufffdend"
    assert (task, agent, short, cost, order) == (f"a\n{clean}", clean, f"step_{clean}", 0.0, 2**31 - 1)
