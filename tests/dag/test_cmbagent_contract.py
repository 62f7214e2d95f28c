"""Contract test: runs shaped like the span side emits them, written by the real exporter into
SQLite and PostgreSQL, then read the way cmbagent's backend reads them (cmbagent_backend.py).

Checked on every run: no endpoint fails; siblings never share an order_index; non-step nodes
never take a step number; the first node has order_index 0; edges are unique, acyclic and
reach every node; ``meta.tokens`` is an int on events and nodes (a node's is its subtree's
total); cost records are one per agent, model and phase/step.
"""

from __future__ import annotations

import itertools
import json
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Connection, create_engine, select

from cmbagent_otel.cli import main
from cmbagent_otel.dag.writer import DagWriter, T, dump_tables

from . import cmbagent_backend as backend
from .cmbagent_runs import (
    Shaper,
    control_from_plan,
    one_shot,
    plain_ag2,
    plain_ag2_in_user_span,
    plan_stopped_at_a_failed_step,
    planning_and_control,
)


class Exported:
    """The spans of one scenario, exported through DagSpanExporter in small batches."""

    def __init__(self, url: str, spans: list[ReadableSpan]) -> None:
        self.url = url
        self.spans = spans
        self.run_id = str(uuid.UUID(int=spans[0].context.trace_id))
        self.engine = create_engine(url)

    def connect(self) -> Any:
        return self.engine.connect()


@pytest.fixture
def export(db_url: str, tmp_path: Path) -> Iterator[Callable[[Callable[[Shaper], None]], Exported]]:
    engines = []

    def run(scenario: Callable[[Shaper], None]) -> Exported:
        memory = InMemorySpanExporter()
        exporter = DagSpanExporter(db_url, spill_dir=tmp_path / "spill")
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=5, schedule_delay_millis=60_000))
        scenario(Shaper(provider.get_tracer("contract-test")))
        assert provider.force_flush()
        provider.shutdown()
        assert exporter.stats()["dropped"] == 0 and exporter.stats()["spilled"] == 0
        result = Exported(db_url, list(memory.get_finished_spans()))
        engines.append(result.engine)
        return result

    yield run
    for engine in engines:
        engine.dispose()


# --- invariants every run must satisfy --------------------------------------------------------

def _nodes(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    nodes = T["dag_nodes"]
    return [dict(r) for r in conn.execute(select(nodes).where(nodes.c.run_id == run_id)).mappings()]


def _events(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    events = T["execution_events"]
    return [dict(r) for r in conn.execute(select(events).where(events.c.run_id == run_id)).mappings()]


def check_contract(conn: Connection, run_id: str) -> dict[str, dict[str, Any]]:
    """The DAG invariants cmbagent's UI and backend rely on; returns the nodes by short id."""
    nodes = _nodes(conn, run_id)
    by_short = {n["meta"]["id"]: n for n in nodes}
    assert len(by_short) == len(nodes), "short ids unique within the run"
    by_id = {n["id"]: n for n in nodes}

    siblings: dict[str | None, Counter[int]] = defaultdict(Counter)
    for n in nodes:
        siblings[n["parent_node_id"]][n["order_index"]] += 1
    shared = {parent: [o for o, c in counts.items() if c > 1] for parent, counts in siblings.items()}
    assert not any(shared.values()), f"siblings share an order_index: {shared}"
    steps = {n["order_index"] for n in nodes if n["meta"].get("span_kind") == "step"}
    assert not [n["meta"]["id"] for n in nodes if n["order_index"] in steps and n["meta"].get("span_kind") != "step"]
    assert min(n["order_index"] for n in nodes) == 0

    edges = T["dag_edges"]
    pairs = [(e.from_node_id, e.to_node_id) for e in conn.execute(
        select(edges.c.from_node_id, edges.c.to_node_id).where(edges.c.from_node_id.in_(list(by_id))))]
    assert len(pairs) == len(set(pairs)), "duplicate edges"
    assert all(b in by_id for _, b in pairs)
    out: dict[str, list[str]] = defaultdict(list)
    for a, b in pairs:
        out[a].append(b)
    root = min(nodes, key=lambda n: n["order_index"])["id"]
    seen, stack = {root}, [root]
    while stack:
        for nxt in out[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    assert {by_id[i]["meta"]["id"] for i in by_id if i not in seen} == set(), "nodes unreachable from the first node"
    state: dict[str, int] = {}

    def visit(node: str) -> None:  # edges never loop back
        state[node] = 1
        for nxt in out[node]:
            assert state.get(nxt) != 1, f"cycle through {by_id[nxt]['meta']['id']}"
            if nxt not in state:
                visit(nxt)
        state[node] = 2

    visit(root)

    events = _events(conn, run_id)
    own: dict[str | None, int] = Counter()
    for e in events:
        if (e["event_type"], e["event_subtype"]) != ("info", "otel"):  # another instrumentation's span: no agent
            assert e["agent_name"], f"event without agent_name: {e['event_type']}/{e['event_subtype']}"
        if "tokens" in e["meta"]:
            assert type(e["meta"]["tokens"]) is int
            assert e["meta"]["tokens"] == e["meta"]["prompt_tokens"] + e["meta"]["completion_tokens"]
            assert isinstance(e["meta"]["cost_usd"], float)
            own[e["node_id"]] += e["meta"]["tokens"]
    for n in nodes:
        assert type(n["meta"]["tokens"]) is int and isinstance(n["meta"]["cost_usd"], float)
        subtree, todo = 0, [n["id"]]
        while todo:
            current = todo.pop()
            subtree += own[current]
            todo.extend(c["id"] for c in nodes if c["parent_node_id"] == current)
        assert n["meta"]["tokens"] == subtree, n["meta"]["id"]

    # every endpoint of §8 answers without error
    dag = backend.run_dag(conn, run_id)
    assert dag["nodes"][0]["id"] == min(nodes, key=lambda n: n["order_index"])["meta"]["id"]
    for n in nodes:
        backend.node_events(conn, n["meta"]["id"], run_id)
        summary = backend.execution_summary(conn, n["meta"]["id"], run_id)
        if summary["total_events"]:
            direct = sum(e["meta"].get("tokens", 0) for e in events if e["node_id"] == n["id"])
            assert summary["cost_summary"]["total_tokens"] == direct
        backend.node_files(conn, n["meta"]["id"], run_id)
    backend.run_files(conn, run_id)
    backend.run_history(conn, run_id)
    resumable = backend.resumable_nodes(conn, run_id)
    assert resumable[0]["order_index"] == 0 and resumable[0]["can_resume"]
    assert backend.sessions(conn)
    costs = backend.run_costs(conn, run_id)
    assert costs["total_tokens"] == sum(own.values())
    assert costs["total_cost"] == pytest.approx(sum(e["meta"].get("cost_usd", 0.0) for e in events), abs=1e-5)
    backend.branch_tree(conn, run_id)
    return by_short


def _edges(conn: Connection, run_id: str) -> set[tuple[str, str, str]]:
    return {(e["source"], e["target"], e["type"]) for e in backend.run_dag(conn, run_id)["edges"]}


def _costs(conn: Connection, run_id: str) -> list[tuple[Any, ...]]:
    costs = T["cost_records"]
    return sorted(((r.agent_name, r.model, r.step_id, r.prompt_tokens, r.completion_tokens, r.total_tokens,
                    Decimal(str(r.cost_usd)).quantize(Decimal("0.000001")))
                   for r in conn.execute(select(costs).where(costs.c.run_id == run_id))), key=repr)


def _d(value: str) -> Decimal:
    return Decimal(value).quantize(Decimal("0.000001"))


# --- the runs ---------------------------------------------------------------------------------

def test_planning_and_control(export: Callable[..., Exported]) -> None:
    run = export(planning_and_control)
    with run.connect() as conn:
        nodes = check_contract(conn, run.run_id)
        order = {short: (n["node_type"], n["order_index"], n["parent_node_id"] and
                         next(s for s, p in nodes.items() if p["id"] == n["parent_node_id"]))
                 for short, n in nodes.items()}
        assert order == {
            "planning": ("planning", 0, None), "control": ("control", 1002, None),
            "step_1": ("agent", 1, "control"), "step_2": ("agent", 2, "control"), "step_3": ("agent", 3, "control"),
            "step_1_engineer": ("sub_agent", 1001, "step_1"), "step_1_executor": ("sub_agent", 1002, "step_1"),
            "step_1_engineer_2": ("sub_agent", 1003, "step_1"),
            "step_2_engineer": ("sub_agent", 2001, "step_2"), "step_2_executor": ("sub_agent", 2002, "step_2"),
            "step_2_redo_1": ("redo", 2003, "step_2"), "step_2_redo_2": ("redo", 2004, "step_2"),
            "step_2_redo_1_engineer": ("sub_agent", 2003001, "step_2_redo_1"),
            "step_2_redo_1_executor": ("sub_agent", 2003002, "step_2_redo_1"),
            "step_2_redo_2_engineer": ("sub_agent", 2004001, "step_2_redo_2"),
            "step_2_redo_2_executor": ("sub_agent", 2004002, "step_2_redo_2"),
            "step_3_engineer": ("sub_agent", 3001, "step_3"),
            "branch_at_step_2": ("branch_point", 2000, "step_2"), "terminator": ("terminator", 4, None),
        }
        edges = _edges(conn, run.run_id)
        chain = [("planning", "step_1"), ("step_1", "step_2"), ("step_2", "step_3"), ("step_3", "terminator")]
        assert {(a, b, "sequential") for a, b in chain} <= edges
        assert {("planning", "control", "sequential"), ("control", "step_1", "sequential"),
                ("step_1", "step_1_engineer", "sequential"), ("step_1_engineer", "step_1_executor", "sequential"),
                ("step_1_executor", "step_1_engineer_2", "sequential"),
                ("step_2_executor", "step_2_redo_1", "sequential"), ("step_2_redo_1", "step_2_redo_2", "sequential"),
                ("step_2", "branch_at_step_2", "sequential"), ("branch_at_step_2", "step_2_redo_1", "conditional"),
                ("step_2_redo_2", "step_2_redo_2_engineer", "sequential")} <= edges

        # node usage: the subtree's LLM calls (the nested researcher chat counts for redo 2's engineer)
        assert {s: nodes[s]["meta"]["tokens"] for s in ("planning", "step_1", "step_2_redo_2_engineer", "step_2",
                                                         "control", "terminator")} == {
            "planning": 3300, "step_1": 3000, "step_2_redo_2_engineer": 2600, "step_2": 6650, "control": 10650,
            "terminator": 0}
        summary = backend.execution_summary(conn, "step_2_redo_2_engineer", run.run_id)
        assert summary["cost_summary"]["total_tokens"] == 2600
        assert summary["cost_summary"]["by_agent"] == {"engineer": {"tokens": 2220, "cost": 0.027},
                                                       "researcher": {"tokens": 380, "cost": 0.004}}
        assert backend.execution_summary(conn, "step_1_executor", run.run_id)["event_types"] == {"code_exec": 1}

        events = {(e["event_type"], e["event_subtype"], e["agent_name"]) for e in _events(conn, run.run_id)}
        assert ("handoff", "transfer", "planner") in events  # first selection: no previous speaker, the chosen one
        assert ("handoff", "transfer", "engineer") in events and ("code_exec", "complete", "executor") in events
        assert ("agent_call", "conversation", "admin") in events  # the initiator, not the chat's recipient

        step_row = next(iter(conn.execute(select(T["workflow_steps"].c.id)).scalars()))
        assert _costs(conn, run.run_id) == sorted([
            ("planner", "gpt-4o", None, 1900, 580, 2480, _d("0.025")),
            ("plan_reviewer", "gpt-4o-mini", None, 700, 120, 820, _d("0.006")),
            ("engineer", "gpt-4o", None, 2500, 500, 3000, _d("0.035")),
            ("engineer", "gpt-4o", step_row, 1500, 500, 2000, _d("0.025")),  # step 2 has a branch step row
            ("engineer", "gpt-4o", step_row, 1600, 450, 2050, _d("0.024")),  # redo 1
            ("engineer", "gpt-4o", step_row, 1700, 520, 2220, _d("0.027")),  # redo 2
            ("researcher", "gpt-4o-mini", step_row, 300, 80, 380, _d("0.004")),
            ("engineer", "gpt-4o", None, 800, 200, 1000, _d("0.01")),
        ], key=repr)
        costs = backend.run_costs(conn, run.run_id)
        assert costs["by_agent"]["engineer"]["tokens"] == 10270 and costs["by_agent"]["engineer"]["call_count"] == 5
        assert costs["by_step"][step_row]["tokens"] == 6650 and costs["total_tokens"] == 13950

        tree = backend.branch_tree(conn, run.run_id)
        assert (tree["name"], tree["status"]) == ("main", "completed")
        assert sorted((c["name"], c["status"], c["is_branch"]) for c in tree["children"]) == [
            ("step_2_redo_1", "failed", True), ("step_2_redo_2", "completed", True)]
        assert [(s["mode"], s["status"], s["current_phase"]) for s in backend.sessions(conn)] == [
            ("planning-control", "completed", "control")]
        assert backend.run_dag(conn, run.run_id)["nodes"][1]["id"] == "step_1"  # stepNumber 2, as cmbagent numbers


def test_cmbagent_rows_in_our_database_survive_a_rewrite(export: Callable[..., Exported]) -> None:
    """cmbagent branches from a node of ours (step row, checkpoint, file); re-exporting keeps them and their links."""
    run = export(planning_and_control)
    with run.engine.begin() as conn:
        backend.record_checkpoint_and_file(conn, run.run_id, "default_session", "step_1", datetime(2030, 1, 1))
    with run.connect() as conn:
        assert [f["file_type"] for f in backend.node_files(conn, "step_1", run.run_id)] == ["plot"]
        assert backend.execution_summary(conn, "step_1", run.run_id)["files_generated"] == 1
        assert [(f["agent"], f["step_number"]) for f in backend.run_files(conn, run.run_id)] == [("engineer", 1)]
        assert all(n["has_checkpoint"] for n in backend.resumable_nodes(conn, run.run_id))
        before = dump_tables(conn)
    DagWriter(run.url).write(random.Random(7).sample(run.spans, len(run.spans)))
    with run.connect() as conn:
        assert dump_tables(conn) == before
        check_contract(conn, run.run_id)


def test_one_shot(export: Callable[..., Exported]) -> None:
    run = export(one_shot)
    with run.connect() as conn:
        nodes = check_contract(conn, run.run_id)
        dag = backend.run_dag(conn, run.run_id)
        assert [(n["id"], n["type"], n["stepNumber"], n["status"]) for n in dag["nodes"][:3]] == [
            ("init", "planning", 1, "completed"), ("execute", "agent", 2, "completed"),
            ("terminator", "terminator", 3, "completed")]
        assert nodes["init"]["meta"]["derived"] and nodes["init"]["meta"]["label"] == "Initialize"
        assert sorted((s, n["order_index"]) for s, n in nodes.items() if n["node_type"] == "sub_agent") == [
            ("execute_engineer", 1001), ("execute_engineer_2", 1003), ("execute_executor", 1002)]
        assert {("init", "execute", "sequential"), ("execute", "terminator", "sequential"),
                ("execute", "execute_engineer", "sequential")} <= _edges(conn, run.run_id)
        resumable = backend.resumable_nodes(conn, run.run_id)
        assert (resumable[0]["node_id"], resumable[0]["can_resume"]) == ("init", True)
        assert _costs(conn, run.run_id) == [("engineer", "gpt-4o", None, 900, 210, 1110, _d("0.012"))]
        assert [(s["mode"], s["current_phase"]) for s in backend.sessions(conn)] == [("one-shot", "one_shot")]


def test_run_without_planning_starts_from_init(export: Callable[..., Exported]) -> None:
    """A workflow with plan steps but no planning phase (cmbagent.control, a carryover restart, the
    chat of human_in_the_loop) still has its order-0 node: the derived init, chained to the steps."""
    run = export(control_from_plan)
    with run.connect() as conn:
        nodes = check_contract(conn, run.run_id)
        top = sorted((n["order_index"], s, n["node_type"]) for s, n in nodes.items() if n["parent_node_id"] is None)
        assert top == [(0, "init", "planning"), (3, "terminator", "terminator"), (1001, "control", "control")]
        assert nodes["init"]["meta"]["derived"]
        assert {("init", "step_1", "sequential"), ("step_1", "step_2", "sequential"),
                ("step_2", "terminator", "sequential")} <= _edges(conn, run.run_id)
        resumable = backend.resumable_nodes(conn, run.run_id)
        assert (resumable[0]["node_id"], resumable[0]["can_resume"]) == ("init", True)


def test_plan_step_never_started_is_a_pending_node(export: Callable[..., Exported]) -> None:
    """A plan step the plan never reached (its span: cmbagent.step.status "not started") is a pending
    node with its goal and agent, never started, chained in the plan like the others; every endpoint
    still answers."""
    run = export(plan_stopped_at_a_failed_step)
    with run.connect() as conn:
        nodes = check_contract(conn, run.run_id)
        step2 = nodes["step_2"]
        assert (step2["status"], step2["agent"], step2["parent_node_id"]) == ("pending", "researcher",
                                                                              nodes["control"]["id"])
        meta = step2["meta"]
        assert (meta["status"], meta["goal"], meta["label"]) == ("pending", "task 2", "Step 2: task 2")
        assert meta["started_at"] is None and meta["completed_at"] is None and meta["duration_ms"] is None
        dag = {n["id"]: n for n in backend.run_dag(conn, run.run_id)["nodes"]}
        assert [dag[s]["status"] for s in ("step_1", "step_2", "terminator")] == ["failed", "pending", "failed"]
        assert {("step_1", "step_2", "sequential"), ("step_2", "terminator", "sequential")} <= _edges(conn, run.run_id)
        assert backend.node_events(conn, "step_2", run.run_id) == []
        assert backend.execution_summary(conn, "step_2", run.run_id) == {"total_events": 0}
        (row,) = conn.execute(select(T["workflow_runs"])).mappings()
        assert row["status"] == "failed"


def test_plain_ag2_program(export: Callable[..., Exported], capsys: pytest.CaptureFixture[str]) -> None:
    run = export(plain_ag2)
    with run.connect() as conn:
        nodes = check_contract(conn, run.run_id)
        assert sorted(nodes) == ["conversation_1", "conversation_1_assistant", "conversation_1_assistant_2",
                                 "conversation_1_user_proxy", "conversation_1_user_proxy_2", "terminator"]
        assert nodes["conversation_1"]["meta"]["label"] == "user_proxy -> assistant"
        speaking = ["conversation_1", "conversation_1_assistant", "conversation_1_user_proxy",
                    "conversation_1_assistant_2", "conversation_1_user_proxy_2"]
        assert {(a, b, "sequential") for a, b in itertools.pairwise(speaking)} <= _edges(conn, run.run_id)
        assert ("conversation_1", "terminator", "sequential") in _edges(conn, run.run_id)
        runs = T["workflow_runs"]
        row = conn.execute(select(runs).where(runs.c.id == run.run_id)).mappings().one()
        assert (row["mode"], row["agent"], row["status"], row["meta"]["otel_source"]) == (
            "ag2-chat", "assistant", "completed", "root")
        code_agents = {e["agent_name"] for e in _events(conn, run.run_id) if e["event_type"] == "code_exec"}
        assert code_agents == {"user_proxy"}
        assert _costs(conn, run.run_id) == [("assistant", "gpt-4o", None, 401, 100, 501, _d("0.004"))]

    assert main(["--db", run.url, "dag", run.run_id]) == 0
    tree = capsys.readouterr().out
    assert "conversation_1 (agent)" in tree and "tokens=501" in tree
    assert tree.index("conversation_1_assistant ") < tree.index("conversation_1_user_proxy ")
    assert main(["--db", run.url, "dag", run.run_id, "--format", "mermaid"]) == 0
    mermaid = capsys.readouterr().out
    assert "n_conversation_1 --> n_conversation_1_assistant" in mermaid
    assert "n_conversation_1 --> n_terminator" in mermaid
    assert main(["--db", run.url, "dag", run.run_id, "--format", "json"]) == 0
    dag = json.loads(capsys.readouterr().out)
    assert dag["run"]["tokens"] == 501 and len(dag["edges"]) >= len(dag["nodes"]) - 1


def test_plain_ag2_chats_under_an_application_span(export: Callable[..., Exported]) -> None:
    run = export(plain_ag2_in_user_span)
    with run.connect() as conn:
        nodes = check_contract(conn, run.run_id)
        assert {s for s, n in nodes.items() if n["parent_node_id"] is None} == {
            "conversation_1", "conversation_2", "terminator"}
        assert {("conversation_1", "conversation_2", "sequential"),
                ("conversation_2", "terminator", "sequential")} <= _edges(conn, run.run_id)
        runs = T["workflow_runs"]
        assert conn.execute(select(runs.c.mode).where(runs.c.id == run.run_id)).scalar() == "main"


def test_cost_records_off(export: Callable[..., Exported], monkeypatch: pytest.MonkeyPatch) -> None:
    """A database whose costs cmbagent's backend records: ours write none (node and event usage stay)."""
    monkeypatch.setenv("CMBAGENT_OTEL_COST_RECORDS", "off")
    run = export(one_shot)
    with run.connect() as conn:
        assert _costs(conn, run.run_id) == []
        assert backend.execution_summary(conn, "execute_engineer", run.run_id)["cost_summary"]["total_tokens"] == 650
        assert {n["meta"]["id"]: n["meta"]["tokens"] for n in _nodes(conn, run.run_id)}["execute"] == 1110


def test_any_batching_gives_the_same_rows(export: Callable[..., Exported], tmp_path: Path) -> None:
    """Derived rows (edges, usage, cost records, init, terminator) do not depend on how spans were batched."""
    run = export(planning_and_control)
    with run.connect() as conn:
        reference = dump_tables(conn)
    rng = random.Random(11)
    for attempt in range(2):
        url = f"sqlite:///{tmp_path}/again{attempt}.db"
        writer = DagWriter(url)
        spans = rng.sample(run.spans, len(run.spans))
        for start in range(0, len(spans), rng.randint(1, 9)):
            writer.write(spans[start:start + 9])
        writer.write(spans)
        writer.close()
        engine = create_engine(url)
        with engine.connect() as conn:
            assert dump_tables(conn) == reference
        engine.dispose()
