"""The real cmbagent package, its real AG2 group chats, offline (issue 11).

Every LLM call of cmbagent goes to the scripted loopback backend (``scripted_cmbagent``):
planner, plan_reviewer, control with its ``record_status`` tool calls, engineer whose code
really runs in cmbagent's executor, formatters, researcher. Nothing of cmbagent or AG2 is
replaced. Each scenario runs once per module, instrumented and plain.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from sqlalchemy import create_engine, select

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
cmbagent = pytest.importorskip(
    "cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)"
)

from cmbagent_otel.exporters.dag import DagSpanExporter  # noqa: E402

import cmbagent_otel  # noqa: E402
from cmbagent_otel import semconv as sc  # noqa: E402
from cmbagent_otel.dag.writer import T  # noqa: E402
from cmbagent_otel.instrumentation._steps import plan_steps  # noqa: E402
from cmbagent_otel.integrations.cmbagent import CmbagentInstrumentor  # noqa: E402
from cmbagent_otel.testing import FakeOpenAIServer  # noqa: E402
from tests.dag.test_cmbagent_contract import check_contract  # noqa: E402

from .scripted_cmbagent import API_KEYS, DEFAULT_PLAN, TASK, GeminiServer, call_workflow, script_for  # noqa: E402

pytestmark = pytest.mark.cmbagent_autogen

TOOL_RUNNER = "_Group_Tool_Executor"
MANAGERS = ("main_cmbagent_chat", "engineer_nested_chat", "idea_maker_manager")


class SpanCapture:
    """A TracerProvider whose finished spans are kept in memory, in start order."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def spans(self) -> list[ReadableSpan]:
        return sorted(self.exporter.get_finished_spans(), key=lambda s: s.start_time or 0)


@dataclass
class Run:
    results: dict[str, Any]
    sequence: list[str]
    unexpected: list[str]
    work_dir: Path
    spans: list[ReadableSpan]
    error: Exception | None = None  # what the workflow raised (``results`` is then empty)
    warnings: list[str] = field(default_factory=list)  # what cmbagent_otel logged at WARNING or above


class _Records(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Runs a scenario once per module (instrumented or plain) against its own scripted backend."""
    cache: dict[tuple[Any, ...], Run] = {}
    with pytest.MonkeyPatch.context() as mp:
        empty = tmp_path_factory.mktemp("no-ca-certs")
        mp.delenv("SSL_CERT_FILE", raising=False)
        mp.setenv("SSL_CERT_DIR", str(empty))
        mp.setenv("OPENAI_API_KEY", API_KEYS["OPENAI"])  # summarize_document reads it from the environment

        def run(kind: str, *, instrumented: bool = True, fail: bool = False, threads: bool = False,
                **options: Any) -> Run:
            """``threads``: instrument() with threading (worker threads carry the run's context)."""
            key = (kind, instrumented, fail, threads, *sorted(options.items()))
            if key in cache:
                return cache[key]
            script = script_for(kind, fail_first_code=fail)
            work_dir = tmp_path_factory.mktemp(f"{kind}-{'otel' if instrumented else 'plain'}{'-fail' * fail}")
            capture = SpanCapture()
            with FakeOpenAIServer(request_responder=script) as server, GeminiServer(script) as gemini:
                mp.setenv("OPENAI_BASE_URL", server.base_url)
                mp.setenv("GOOGLE_GEMINI_BASE_URL", gemini)  # evaluate_plots' VLM call (google.genai)
                mp.setenv("GEMINI_API_KEY", API_KEYS["GEMINI"])
                if instrumented:
                    cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False,
                                             instrument_threading=threads)
                results: dict[str, Any] = {}
                error = None
                ours = _Records(logging.WARNING)
                logging.getLogger("cmbagent_otel").addHandler(ours)
                try:
                    results = call_workflow(kind, work_dir, **options)
                except Exception as exc:  # cmbagent's own failure: compared with the plain run's
                    error = exc
                finally:
                    if instrumented:
                        cmbagent_otel.uninstrument()
                    logging.getLogger("cmbagent_otel").removeHandler(ours)
            cache[key] = Run(results, list(script.sequence), list(script.unexpected), work_dir, capture.spans, error,
                             [r.getMessage() for r in ours.records])
            capture.provider.shutdown()
            return cache[key]

        yield run


# --- span-tree helpers -------------------------------------------------------------------------
def _by_id(run: Run) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in run.spans}


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    out = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        out.append(span)
    return out


def _named(run: Run, name: str) -> list[ReadableSpan]:
    return [s for s in run.spans if s.name == name]


def _one(run: Run, name: str) -> ReadableSpan:
    found = _named(run, name)
    assert len(found) == 1, f"{name}: {len(found)} spans"
    return found[0]


def _kind(span: ReadableSpan) -> Any:
    return (span.attributes or {}).get(sc.SPAN_KIND)


def _nodes(run: Run) -> dict[str, ReadableSpan]:
    return {s.attributes[sc.DAG_NODE]: s for s in run.spans if sc.DAG_NODE_TYPE in (s.attributes or {})}


def _check_common_shape(run: Run, ends_by_handoff: bool = True) -> None:
    """What every run guarantees: one trace, no tool-runner/manager nodes, named handoffs, chat ends no errors
    (``ends_by_handoff``: the chat ends when no agent is left to speak, not when the human types exit)."""
    assert run.unexpected == []
    assert len({s.context.trace_id for s in run.spans}) == 1
    nodes = _nodes(run)
    for short, span in nodes.items():
        assert TOOL_RUNNER not in short and not any(m in short for m in MANAGERS), short
        assert isinstance(span.attributes[sc.DAG_ORDER_INDEX], int)
    siblings: dict[Any, list[int]] = defaultdict(list)
    for span in nodes.values():
        siblings[span.attributes.get(sc.DAG_PARENT_NODE)].append(span.attributes[sc.DAG_ORDER_INDEX])
    steps = {s.attributes[sc.STEP_NUMBER] for s in nodes.values() if _kind(s) == sc.KIND_STEP}
    for parent, orders in siblings.items():
        assert len(orders) == len(set(orders)), f"order_index collides under {parent}: {sorted(orders)}"
    for span in nodes.values():
        if _kind(span) != sc.KIND_STEP:
            assert span.attributes[sc.DAG_ORDER_INDEX] not in steps, span.name
    for span in run.spans:
        if _kind(span) == sc.KIND_SPEAKER_SELECTION:  # a selection that asked the model
            assert span.status.status_code is not StatusCode.ERROR, span.name
    handoffs = _handoffs(run)
    for attrs, _, _ in handoffs:
        assert attrs[sc.HANDOFF_FROM]  # the agent handing off: the handoff event's agent_name
        assert sc.ERROR_TYPE not in attrs
    assert any(attrs.get(sc.HANDOFF_ENDS_CHAT) for attrs, _, _ in handoffs) is ends_by_handoff


def _handoffs(run: Run) -> list[tuple[Any, ReadableSpan, int]]:
    """Every speaker selection: (its attributes, the span it is on or is, its time in ns), from either
    form (a ``cmbagent.handoff`` event, or a ``select_speaker`` span when it asked the model)."""
    found = []
    for span in run.spans:
        if _kind(span) == sc.KIND_SPEAKER_SELECTION:
            found.append((span.attributes, span, span.start_time))
        for event in span.events:
            if event.name == "cmbagent.handoff":
                found.append((event.attributes, span, event.timestamp))
    return found


def _step_members(run: Run, step_span: ReadableSpan) -> list[ReadableSpan]:
    by_id = _by_id(run)
    return [s for s in run.spans if step_span in _ancestors(s, by_id)]


# --- planning_and_control: every step inside ONE group chat ---------------------------------------
@pytest.mark.parametrize("fail", [False, True], ids=["clean", "first-code-run-fails"])
def test_planning_and_control_steps_inside_one_chat(runner: Any, fail: bool) -> None:
    run = runner("planning_and_control", fail=fail)
    _check_common_shape(run)
    assert run.results["final_context"]["current_plan_step_number"] == 3
    assert run.results["final_context"]["current_status"] == "completed"
    by_id = _by_id(run)
    root = _one(run, "workflow planning_and_control")
    assert root.attributes[sc.WORKFLOW_MODE] == "planning-control"
    control = _one(run, "phase control")
    chat = [s for s in _named(run, "invoke_agent main_cmbagent_chat") if control in _ancestors(s, by_id)]
    assert len(chat) == 1, "the control phase runs ONE group chat"
    manager = chat[0]
    steps = [_one(run, f"step {n}") for n in (1, 2, 3)]
    for number, (span, planned) in enumerate(zip(steps, DEFAULT_PLAN, strict=True), 1):
        a = span.attributes
        assert span.parent.span_id == manager.context.span_id, "the step is a child of the chat, by explicit context"
        assert (a[sc.DAG_NODE], a[sc.DAG_NODE_TYPE], a[sc.DAG_ORDER_INDEX], a[sc.DAG_PARENT_NODE]) == (
            f"step_{number}", "agent", number, "control")
        assert (a[sc.STEP_NUMBER], a[sc.STEP_GOAL], a[sc.STEP_AGENT]) == (number, planned.task, planned.agent)
        assert a[sc.STEP_STATUS] == "completed" and a[sc.STEP_MAX_ATTEMPTS] == 3
        assert span.status.status_code is StatusCode.UNSET
    assert steps[0].end_time <= steps[1].start_time and steps[1].end_time <= steps[2].start_time

    # every agent call, LLM call, tool call, handoff and code run between a step's start and end sits under it
    chat_spans = [s for s in run.spans if manager in _ancestors(s, by_id)]
    for span in chat_spans:
        if _kind(span) not in (sc.KIND_AGENT, sc.KIND_LLM, sc.KIND_TOOL, sc.KIND_CODE, sc.KIND_SPEAKER_SELECTION):
            continue
        inside = [st for st in steps if st.start_time <= span.start_time and span.end_time <= st.end_time]
        if inside:
            assert inside[0] in _ancestors(span, by_id), f"{span.name} escapes {inside[0].name}"
            assert span.attributes[sc.DAG_NODE].startswith(inside[0].attributes[sc.DAG_NODE])
    for attrs, span, when in _handoffs(run):  # handoff events: on the step they happen in
        inside = [st for st in steps if st.start_time <= when <= st.end_time]
        if inside and manager in [*_ancestors(span, by_id), span]:
            assert span is inside[0] or inside[0] in _ancestors(span, by_id), attrs[sc.HANDOFF_FROM]

    # children per step: the sub-agent nodes, in speaking order
    expected = {
        1: ["engineer", "engineer_nest", "executor_response_formatter"] * (2 if fail else 1) + ["control"],
        2: ["researcher", "researcher_response_formatter", "researcher_executor", "control"],
        3: ["engineer", "engineer_nest", "executor_response_formatter", "control"],
    }
    for number, span in enumerate(steps, 1):
        members = _step_members(run, span)
        subs = sorted((m for m in members if m.attributes.get(sc.DAG_NODE_TYPE) == sc.NODE_SUB_AGENT),
                      key=lambda m: m.attributes[sc.DAG_ORDER_INDEX])
        assert [m.attributes[sc.GEN_AI_AGENT_NAME] for m in subs] == expected[number]
        assert [m.attributes[sc.DAG_ORDER_INDEX] for m in subs] == [number * 1000 + k for k in
                                                                      range(1, len(subs) + 1)]
        assert all(m.attributes[sc.DAG_PARENT_NODE] == f"step_{number}" for m in subs)
        runners = [m for m in members if m.name == f"invoke_agent {TOOL_RUNNER}"]
        assert runners and all(sc.DAG_NODE_TYPE not in m.attributes for m in runners)
        tools = [m.attributes[sc.GEN_AI_TOOL_NAME] for m in members if _kind(m) == sc.KIND_TOOL]
        assert tools[-1] == "record_status"  # the call that completed it
        languages = [m.attributes[sc.CODE_LANGUAGE] for m in members if _kind(m) == sc.KIND_CODE]
        assert languages == (["markdown"] if number == 2 else ["python"] * (2 if fail and number == 1 else 1))
    # the planning group chat (its own phase) has no steps
    planning = _one(run, "phase planning")
    assert not any(planning in _ancestors(s, by_id) for s in steps)


def test_failed_first_code_run_is_a_retry_inside_the_step(runner: Any) -> None:
    run = runner("planning_and_control", fail=True)
    by_id = _by_id(run)
    step1 = _one(run, "step 1")
    assert step1.attributes[sc.STEP_ATTEMPTS] == 1  # cmbagent's n_attempts for the step
    assert step1.status.status_code is StatusCode.UNSET  # completed after the retry
    codes = [s for s in _step_members(run, step1) if _kind(s) == sc.KIND_CODE]
    assert [c.attributes[sc.CODE_EXIT_CODE] for c in codes] == [1, 0]
    assert codes[0].status.status_code is StatusCode.ERROR
    attempts = [s for s in run.spans if _kind(s) == sc.KIND_ATTEMPT]
    assert len(attempts) == 1
    attempt = attempts[0]
    assert attempt.parent.span_id == step1.context.span_id
    assert attempt.status.status_code is StatusCode.ERROR
    assert (attempt.attributes[sc.STEP_NUMBER], attempt.attributes[sc.STEP_ATTEMPT], attempt.attributes[sc.DAG_NODE]) \
        == (1, 1, "step_1")
    assert codes[0].end_time <= attempt.start_time <= codes[1].start_time
    for number in (2, 3):
        assert _one(run, f"step {number}").attributes[sc.STEP_ATTEMPTS] == 0
    assert not any(step1 in _ancestors(s, by_id) for s in _named(run, "step 2"))


# --- the DAG written by the exporter, read back from SQLite ----------------------------------------
def _rows(url: str, table: str) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            out = []
            for r in conn.execute(select(T[table])).mappings():
                row = dict(r)
                for key in ("meta", "inputs", "outputs"):
                    if isinstance(row.get(key), str):
                        row[key] = json.loads(row[key])
                out.append(row)
            return out
    finally:
        engine.dispose()


def _exported(run: Run, directory: Path) -> str:
    """The run's spans written by the DAG exporter into a new SQLite database in ``directory``; its URL."""
    url = f"sqlite:///{directory / 'cmbagent.db'}"
    exporter = DagSpanExporter(url, spill=False)
    try:
        assert exporter.export(run.spans).name == "SUCCESS"
    finally:
        exporter.shutdown()
    return url


@pytest.fixture(scope="module")
def dag_db(runner: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _exported(runner("planning_and_control", fail=True), tmp_path_factory.mktemp("dag"))


def test_planning_and_control_dag_rows(dag_db: str) -> None:
    nodes = {r["meta"]["id"]: r for r in _rows(dag_db, "dag_nodes")}
    short_of = {r["id"]: s for s, r in nodes.items()}
    top = {s: (r["node_type"], r["order_index"], r["status"]) for s, r in nodes.items() if r["parent_node_id"] is None}
    assert top == {"planning": ("planning", 0, "completed"), "control": ("control", 1002, "completed"),
                   "terminator": ("terminator", 4, "completed")}
    steps = {s: r for s, r in nodes.items() if re.fullmatch(r"step_\d", s)}
    assert {s: (r["node_type"], r["order_index"], short_of[r["parent_node_id"]], r["status"], r["agent"])
            for s, r in steps.items()} == {
        "step_1": ("agent", 1, "control", "completed", "engineer"),
        "step_2": ("agent", 2, "control", "completed", "researcher"),
        "step_3": ("agent", 3, "control", "completed", "engineer"),
    }
    subs = [r for r in nodes.values() if r["node_type"] == "sub_agent"]
    assert subs and all(r["agent"] not in (TOOL_RUNNER, *MANAGERS) for r in subs)
    assert all(short_of[r["parent_node_id"]] in steps for r in subs)
    children: dict[str, list[int]] = defaultdict(list)
    for r in nodes.values():
        children[short_of.get(r["parent_node_id"], "")].append(r["order_index"])
    for parent, orders in children.items():
        assert len(orders) == len(set(orders)), parent

    events = _rows(dag_db, "execution_events")
    by_node: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_node[short_of.get(e["node_id"], "")].append(e)
    step1 = sorted(by_node["step_1"], key=lambda e: e["execution_order"])
    assert [e["status"] for e in step1 if e["event_type"] not in ("handoff", "agent_call", "tool_call")] == ["failed"]
    assert {e["event_type"] for e in step1} >= {"handoff", "agent_call", "tool_call"}
    failed_code = [e for e in events if e["event_type"] == "code_exec" and e["status"] == "failed"]
    assert [short_of[e["node_id"]] for e in failed_code] == ["step_1_engineer_nest"]
    handoffs = [e for e in events if e["event_type"] == "handoff"]
    assert handoffs and all(e["status"] == "completed" for e in handoffs)  # the chat's end is no failure


def test_planning_and_control_dag_contract_of_the_dag_side(dag_db: str) -> None:
    """Integer meta.tokens, every node connected, handoffs named after the agent handing off."""
    nodes = {r["id"]: r for r in _rows(dag_db, "dag_nodes")}
    events = _rows(dag_db, "execution_events")
    llm = [e for e in events if e["event_subtype"] == "llm"]
    assert llm and all(type(e["meta"]["tokens"]) is int for e in llm)
    edges = {(e["from_node_id"], e["to_node_id"]) for e in _rows(dag_db, "dag_edges")}
    linked = {a for a, _ in edges} | {b for _, b in edges}
    assert set(nodes) <= linked
    handoffs = [e for e in events if e["event_type"] == "handoff"]
    assert all(e["agent_name"] for e in handoffs)  # from cmbagent.handoff.from


# --- context carryover and one_shot ------------------------------------------------------------------
def test_context_carryover_steps(runner: Any) -> None:
    run = runner("carryover")
    _check_common_shape(run)
    by_id = _by_id(run)
    control = _one(run, "phase control")
    steps = [_one(run, f"step {n}") for n in (1, 2, 3)]
    for number, (span, planned) in enumerate(zip(steps, DEFAULT_PLAN, strict=True), 1):
        assert span.parent.span_id == control.context.span_id
        assert (span.attributes[sc.STEP_GOAL], span.attributes[sc.STEP_AGENT]) == (planned.task, planned.agent)
        assert span.attributes[sc.STEP_ATTEMPTS] == 0 and span.attributes[sc.STEP_MAX_ATTEMPTS] == 3
        assert span.attributes[sc.STEP_SUMMARY]
        chats = [s for s in _named(run, "invoke_agent main_cmbagent_chat") if span in _ancestors(s, by_id)]
        assert len(chats) == 1, "one group chat per step"
        subs = [s for s in _step_members(run, span) if s.attributes.get(sc.DAG_NODE_TYPE) == sc.NODE_SUB_AGENT]
        assert subs and all(s.attributes[sc.DAG_ORDER_INDEX] // 1000 == number for s in subs)
        # no second, derived step inside a step the carryover loop opened
        assert not [s for s in _step_members(run, span) if _kind(s) == sc.KIND_STEP]
    assert len(_named(run, "phase control")) == 1


def test_one_shot_is_init_execute_terminator(runner: Any) -> None:
    run = runner("one_shot")
    _check_common_shape(run)
    root = _one(run, "workflow one_shot")
    execute = _one(run, "phase one_shot")
    assert execute.parent.span_id == root.context.span_id
    a = execute.attributes
    assert (a[sc.DAG_NODE], a[sc.DAG_NODE_TYPE], a[sc.DAG_ORDER_INDEX]) == ("execute", "agent", 1)
    subs = sorted((s for s in run.spans if s.attributes.get(sc.DAG_PARENT_NODE) == "execute"),
                  key=lambda s: s.attributes[sc.DAG_ORDER_INDEX])
    assert [s.attributes[sc.GEN_AI_AGENT_NAME] for s in subs] == [
        "engineer", "engineer_nest", "executor_response_formatter", "control", "terminator"]
    assert [s.attributes[sc.DAG_ORDER_INDEX] for s in subs] == [1001, 1002, 1003, 1004, 1005]
    assert not [s for s in run.spans if _kind(s) == sc.KIND_STEP]


# --- every public entry point, read back the way cmbagent's backend reads it ---------------------------
def _backend_rows(run: Run, tmp_path: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The run's spans through the DAG exporter into SQLite, checked against the contract (every
    endpoint of cmbagent's backend answers, order_index rules, edges, tokens); nodes by short id,
    events, and the run row."""
    url = _exported(run, tmp_path)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            (row,) = conn.execute(select(T["workflow_runs"])).mappings()
            nodes = check_contract(conn, row["id"])
    finally:
        engine.dispose()
    return nodes, _rows(url, "execution_events"), dict(row)


def _children(nodes: dict[str, dict[str, Any]], parent: str) -> list[str]:
    db_id = nodes[parent]["id"]
    return [short for short, n in sorted(nodes.items(), key=lambda kv: kv[1]["order_index"])
            if n["parent_node_id"] == db_id]


ENTRY_POINTS: list[tuple[str, bool, dict[str, Any]]] = [
    ("planning_and_control", False, {}), ("planning_and_control", True, {}),
    ("planning_and_control", False, {"n_plan_reviews": 0}), ("planning_and_control", False, {"n_plan_reviews": 2}),
    ("carryover", False, {}), ("carryover", True, {}), ("one_shot", False, {}), ("one_shot_researcher", False, {}),
    ("one_shot_camb", False, {}), ("one_shot_classy", False, {}), ("one_shot_plots", False, {}),
    ("control", False, {}), ("control_ideas", False, {}), ("deep_research", False, {}),
    ("human_in_the_loop", False, {}), ("get_keywords", False, {}), ("get_keywords_aas", False, {}),
    ("get_keywords_unesco", False, {}), ("summarize_document", False, {})]
KEYWORDS = ("get_keywords", "get_keywords_aas", "get_keywords_unesco")


def _ids(cases: list[tuple[str, bool, dict[str, Any]]]) -> list[str]:
    return [f"{k}{'-fail' * f}" + "".join(f"-{name}={value}" for name, value in o.items()) for k, f, o in cases]


@pytest.mark.parametrize(("kind", "fail", "options"), ENTRY_POINTS, ids=_ids(ENTRY_POINTS))
def test_every_entry_point_passes_the_backend_contract(runner: Any, tmp_path: Path, kind: str, fail: bool,
                                                      options: dict[str, Any]) -> None:
    run = runner(kind, fail=fail, **options)
    assert run.error is None and run.warnings == []
    # human_in_the_loop ends when the human types exit, get_keywords (aaai, unesco) on its max_rounds=2
    _check_common_shape(run, ends_by_handoff=kind not in ("human_in_the_loop", "get_keywords", "get_keywords_unesco"))
    nodes, events, row = _backend_rows(run, tmp_path)
    assert row["status"] == "completed"
    assert row["meta"]["name"] == {"carryover": "planning_and_control_context_carryover", "control_ideas": "control",
                                   "get_keywords_aas": "get_keywords", "get_keywords_unesco": "get_keywords",
                                   "one_shot_researcher": "one_shot", "one_shot_camb": "one_shot",
                                   "one_shot_classy": "one_shot", "one_shot_plots": "one_shot"}.get(kind, kind)
    first = min(nodes.values(), key=lambda n: n["order_index"])
    assert first["order_index"] == 0 and first["node_type"] == "planning"
    assert all(e["status"] in ("completed", "failed") for e in events)
    short_of = {n["id"]: s for s, n in nodes.items()}
    # every code run on the sub-agent node that ran it
    code_nodes = [re.sub(r"_\d+$", "", short_of[e["node_id"]]) for e in events if e["event_type"] == "code_exec"]
    assert bool(code_nodes) is (kind not in ("control_ideas", "summarize_document", *KEYWORDS))  # no code run
    assert all(n.endswith(("_engineer_nest", "_researcher_executor")) for n in code_nodes), code_nodes
    # one LLM event per model call, on its agent's node (a nested chat's on the nest; a phase's or step's own)
    llm = [(e["agent_name"], nodes[short_of[e["node_id"]]]) for e in events if e["event_subtype"] == "llm"]
    assert len(llm) == len(run.sequence)
    assert all(node["agent"] == agent or node["agent"].endswith("_nest") or node["node_type"] != "sub_agent"
               for agent, node in llm)
    costs = _rows(f"sqlite:///{tmp_path / 'cmbagent.db'}", "cost_records")
    assert sum(c["total_tokens"] for c in costs) == sum(e["meta"]["tokens"] for e in events if "tokens" in e["meta"])
    assert {c["agent_name"] for c in costs} == {agent for agent, _ in llm}


def test_control_with_a_plan_file(runner: Any, tmp_path: Path) -> None:
    """cmbagent.control runs a stored plan without planning: init -> step_1..3 -> terminator."""
    run = runner("control")
    assert run.results["final_context"]["current_plan_step_number"] == 3
    root = _one(run, "workflow control")
    assert root.attributes[sc.WORKFLOW_MODE] == "planning-control"
    assert not _named(run, "phase planning")
    nodes, _, _ = _backend_rows(run, tmp_path)
    top = sorted((n["order_index"], s, n["node_type"]) for s, n in nodes.items() if n["parent_node_id"] is None)
    assert top == [(0, "init", "planning"), (4, "terminator", "terminator"), (1001, "control", "control")]
    assert _children(nodes, "control") == ["step_1", "step_2", "step_3"]
    assert [nodes[f"step_{k}"]["agent"] for k in (1, 2, 3)] == [p.agent for p in DEFAULT_PLAN]
    assert _children(nodes, "step_2") == ["step_2_researcher", "step_2_researcher_response_formatter",
                                          "step_2_researcher_executor", "step_2_control"]
    for k in (1, 3):
        assert _children(nodes, f"step_{k}") == [f"step_{k}_{a}" for a in (
            "engineer", "engineer_nest", "executor_response_formatter", "control")]


def test_control_with_its_default_idea_plan(runner: Any, tmp_path: Path) -> None:
    """cmbagent.control's default plan: six idea_maker/idea_hater steps; idea_maker's nested chat
    (formatter, idea_saver's record_ideas) stays inside its idea_maker_nest node."""
    run = runner("control_ideas")
    assert run.results["final_context"]["current_plan_step_number"] == 6
    nodes, events, _ = _backend_rows(run, tmp_path)
    assert _children(nodes, "control") == [f"step_{k}" for k in range(1, 7)]
    plan = [nodes[f"step_{k}"]["agent"] for k in range(1, 7)]
    assert plan == ["idea_maker", "idea_hater", "idea_maker", "idea_hater", "idea_maker", "idea_maker"]
    for k, agent in enumerate(plan, 1):
        turn = ["idea_maker", "idea_maker_nest"] if agent == "idea_maker" else [
            "idea_hater", "idea_hater_response_formatter"]
        assert _children(nodes, f"step_{k}") == [f"step_{k}_{a}" for a in [*turn, "control"]]
    short_of = {n["id"]: s for s, n in nodes.items()}
    saved = [short_of[e["node_id"]] for e in events if e["event_type"] == "tool_call"
             and e["agent_name"] == "idea_saver"]
    assert saved == [f"step_{k}_idea_maker_nest" for k in (1, 3, 5, 6)]


def test_deep_research_is_named_as_called(runner: Any) -> None:
    """cmbagent.deep_research is planning_and_control_context_carryover under another name."""
    run = runner("deep_research")
    root = _one(run, "workflow deep_research")
    assert root.attributes[sc.WORKFLOW_MODE] == "planning-control"
    assert [_one(run, f"step {n}").attributes[sc.STEP_AGENT] for n in (1, 2, 3)] == [p.agent for p in DEFAULT_PLAN]
    assert not _named(run, "workflow planning_and_control_context_carryover")
    # uninstrumented: both names are the original function again
    assert cmbagent.deep_research is cmbagent.planning_and_control_context_carryover
    assert not hasattr(cmbagent.deep_research, "__wrapped__")


def test_human_in_the_loop_turns_are_step_one_sub_agents(runner: Any, tmp_path: Path) -> None:
    """Chat mode: the engineer works, control reports, the human admin answers (scripted stdin) --
    each turn a sub-agent node of the chat's one step, the admin's answers human-input events."""
    run = runner("human_in_the_loop")
    root = _one(run, "workflow human_in_the_loop")
    assert root.attributes[sc.WORKFLOW_MODE] == "hitl-interactive"
    chat = _one(run, "phase chat")
    step1 = _one(run, "step 1")
    assert step1.parent.span_id == chat.context.span_id
    assert (step1.attributes[sc.STEP_GOAL], step1.attributes[sc.STEP_AGENT]) == (TASK, "engineer")
    assert step1.status.status_code is StatusCode.UNSET
    humans = [s for s in run.spans if _kind(s) == sc.KIND_HUMAN_INPUT]
    assert len(humans) == 2 and all(step1 in _ancestors(h, _by_id(run)) for h in humans)
    nodes, events, row = _backend_rows(run, tmp_path)
    assert row["mode"] == "hitl-interactive"
    turn = ["engineer", "engineer_nest", "executor_response_formatter", "control", "admin"]
    assert _children(nodes, "step_1") == [f"step_1_{a}" for a in turn] + [f"step_1_{a}_2" for a in turn]
    short_of = {n["id"]: s for s, n in nodes.items()}
    asked = [short_of[e["node_id"]] for e in events if e["event_subtype"] == "human_input"]
    assert asked == ["step_1_admin", "step_1_admin_2"]


def test_get_keywords_is_a_one_shot_run(runner: Any) -> None:
    """get_keywords(kw_type="aaai"): one one-shot solve of the keyword finder; its answer is what the
    function returns."""
    run = runner("get_keywords")
    assert run.results["keywords"] == ["Machine Learning", "Cosmology"]
    root = _one(run, "workflow get_keywords")
    assert root.attributes[sc.WORKFLOW_MODE] == "one-shot"
    subs = [s for s in run.spans if s.attributes.get(sc.DAG_PARENT_NODE) == "execute"]
    assert [s.attributes[sc.DAG_NODE] for s in subs] == ["execute_aaai_keywords_finder"]


def test_get_keywords_aas_records_its_keywords_by_tool_call(runner: Any, tmp_path: Path) -> None:
    """get_keywords(kw_type="aas"): one one-shot solve; the finder's record_aas_keywords tool call (on its
    sub-agent node) stores the keywords with their URLs, which the function returns; control, then the
    terminator end the chat."""
    from cmbagent.utils import AAS_keywords_dict

    run = runner("get_keywords_aas")
    chosen = sorted(AAS_keywords_dict)[:2]
    assert run.results["keywords"] == {k: AAS_keywords_dict[k] for k in chosen}
    assert _one(run, "workflow get_keywords").attributes[sc.WORKFLOW_MODE] == "one-shot"
    nodes, events, _ = _backend_rows(run, tmp_path)
    assert _children(nodes, "execute") == ["execute_aas_keyword_finder", "execute_control", "execute_terminator"]
    short_of = {n["id"]: s for s, n in nodes.items()}
    tools = [(short_of[e["node_id"]], e["meta"]["span_name"]) for e in events if e["event_type"] == "tool_call"]
    # the tool runs in AG2's tool runner's turn, which is no sub-agent: on the phase's node
    assert tools == [("execute", f"execute_tool {t}") for t in ("record_aas_keywords", "record_status",
                                                                 "terminate_session")]


def test_get_keywords_unesco_is_one_run_of_one_shot_solves(runner: Any, tmp_path: Path) -> None:
    """get_keywords(kw_type="unesco"): a one-shot solve per level of cmbagent's UNESCO taxonomy, all in
    ONE run, each the same shape: an ``execute`` node (the first cmbagent's own at order 1, the later
    ``execute_2``, ``execute_3``... at non-step orders) whose finder's turn is its sub-agent node, holding
    that solve's model call."""
    run = runner("get_keywords_unesco")
    assert run.results["keywords"] and set(run.sequence) == {"list_keywords_finder"}
    assert len(_named(run, "workflow get_keywords")) == 1 and len(run.sequence) > 2
    nodes, events, _ = _backend_rows(run, tmp_path)
    solves = ["execute", *(f"execute_{k}" for k in range(2, len(run.sequence) + 1))]
    top = sorted((n["order_index"], s) for s, n in nodes.items() if n["parent_node_id"] is None)
    assert [s for _, s in top] == ["init", *solves, "terminator"]
    assert {nodes[s]["node_type"] for s in solves} == {"agent"}
    assert not [s for s in nodes if s.startswith("one_shot")]
    for solve in solves:
        assert _children(nodes, solve) == [f"{solve}_list_keywords_finder"]
    short_of = {n["id"]: s for s, n in nodes.items()}
    llm = sorted(short_of[e["node_id"]] for e in events if e["event_subtype"] == "llm")
    assert llm == sorted(f"{solve}_list_keywords_finder" for solve in solves)


def test_summarize_document_is_a_one_shot_run(runner: Any, tmp_path: Path) -> None:
    """summarize_document: one solve of a fixed pipeline (summarizer, its structured formatter, terminator)
    with no ``mode``: its own run ``workflow summarize_document`` in cmbagent's one-shot layout, the agents
    its ``execute`` node's sub-agents (not a ``control`` phase holding every turn); the summary it returns
    is parsed from the formatter's answer."""
    from .scripted_cmbagent import CmbagentScript

    run = runner("summarize_document")
    summary = run.results["summary"]  # parsed back by cmbagent from the formatted text (lists may shift)
    assert (summary["title"], summary["key_findings"]) == (CmbagentScript.SUMMARY["title"],
                                                          CmbagentScript.SUMMARY["key_findings"])
    root = _one(run, "workflow summarize_document")
    assert (root.attributes[sc.WORKFLOW_MODE], root.attributes[sc.WORKFLOW_AGENT]) == ("one-shot", "summarizer")
    nodes, _, row = _backend_rows(run, tmp_path)
    assert row["mode"] == "one-shot" and "control" not in nodes
    assert _children(nodes, "execute") == ["execute_summarizer", "execute_summarizer_response_formatter",
                                           "execute_terminator"]


def test_summarize_documents_is_one_run_of_parallel_solves(runner: Any, tmp_path: Path) -> None:
    """summarize_documents: cmbagent summarizes each document in a worker thread (summarize_document per
    file); with instrument()'s default threading instrumentation the threads carry the run's context, so it
    is ONE run: each solve an execute node with the pipeline's agents as its sub-agents (``execute``, then
    ``execute_2``, as get_keywords unesco). Which document comes first depends on the threads: the app's
    outputs are compared unordered."""
    plain = runner("summarize_documents", instrumented=False)
    run = runner("summarize_documents", threads=True)  # instrument()'s default
    assert run.error is None and plain.error is None and run.warnings == []
    assert (run.results["processed_files"], run.results["failed_files"]) == (2, 0)
    assert sorted(run.sequence) == sorted(plain.sequence) and run.unexpected == []
    assert len(_named(run, "workflow summarize_documents")) == 1 and not _named(run, "workflow summarize_document")
    nodes, events, row = _backend_rows(run, tmp_path)
    assert row["status"] == "completed" and row["mode"] == "one-shot"
    for solve in ("execute", "execute_2"):
        assert nodes[solve]["node_type"] == "agent"
        turns = ("summarizer", "summarizer_response_formatter", "terminator")
        assert _children(nodes, solve) == [f"{solve}_{a}" for a in turns]
    assert not [s for s in nodes if s.startswith("one_shot")]
    llm = [e for e in events if e["event_subtype"] == "llm"]
    assert len(llm) == len(run.sequence)
    costs = _rows(f"sqlite:///{tmp_path / 'cmbagent.db'}", "cost_records")
    assert sum(c["total_tokens"] for c in costs) == sum(e["meta"]["tokens"] for e in events if "tokens" in e["meta"])


def test_preprocess_task_is_one_enhance_input_run(runner: Any, tmp_path: Path) -> None:
    """preprocess_task (its arXiv download and OCR skipped, their output seeded): the summarize_documents it
    calls joins its run -- ONE ``workflow preprocess_task`` run of mode enhance-input in cmbagent's
    fixed-pipeline layout, each paper's summary an execute node with the pipeline's agents as sub-agents
    (the solves have no ``mode``: without the fixed-pipeline rule they would be ``control`` phases). The
    papers' order in the returned text follows the threads: compared unordered with the plain run's."""
    plain = runner("preprocess_task", instrumented=False)
    run = runner("preprocess_task", threads=True)
    assert run.error is None and plain.error is None and run.warnings == [] and run.unexpected == []
    assert "## Contextual Information and References" in run.results["text"]
    assert sorted(run.results["text"].splitlines()) == sorted(plain.results["text"].splitlines())
    assert sorted(run.sequence) == sorted(plain.sequence)
    assert len({s.context.trace_id for s in run.spans}) == 1
    assert len(_named(run, "workflow preprocess_task")) == 1 and not _named(run, "workflow summarize_documents")
    nodes, events, row = _backend_rows(run, tmp_path)
    assert (row["status"], row["mode"]) == ("completed", "enhance-input")
    assert not [s for s in nodes if s.startswith(("control", "one_shot"))]
    top = sorted((n["order_index"], s) for s, n in nodes.items() if n["parent_node_id"] is None)
    assert [s for _, s in top] == ["init", "execute", "execute_2", "terminator"]
    for solve in ("execute", "execute_2"):
        turns = ("summarizer", "summarizer_response_formatter", "terminator")
        assert _children(nodes, solve) == [f"{solve}_{a}" for a in turns]
    short_of = {n["id"]: s for s, n in nodes.items()}
    llm = [(e["agent_name"], short_of[e["node_id"]]) for e in events if e["event_subtype"] == "llm"]
    assert len(llm) == len(run.sequence) and all(node.endswith(agent) for agent, node in llm)
    costs = _rows(f"sqlite:///{tmp_path / 'cmbagent.db'}", "cost_records")
    assert sum(c["total_tokens"] for c in costs) == sum(e["meta"]["tokens"] for e in events if "tokens" in e["meta"])


def test_one_shot_researcher(runner: Any) -> None:
    run = runner("one_shot_researcher")
    subs = sorted((s for s in run.spans if s.attributes.get(sc.DAG_PARENT_NODE) == "execute"),
                  key=lambda s: s.attributes[sc.DAG_ORDER_INDEX])
    assert [s.attributes[sc.GEN_AI_AGENT_NAME] for s in subs] == [
        "researcher", "researcher_response_formatter", "researcher_executor", "control", "terminator"]
    codes = [s for s in run.spans if _kind(s) == sc.KIND_CODE]
    assert [c.attributes[sc.CODE_LANGUAGE] for c in codes] == ["markdown"]
    assert codes[0].attributes[sc.DAG_NODE] == "execute_researcher_executor"


@pytest.mark.parametrize("package", ["camb", "classy"])
def test_one_shot_camb_or_classy_context(runner: Any, tmp_path: Path, package: str) -> None:
    """one_shot(agent="camb_context" / "classy_context"): cmbagent downloads the package's documentation
    (served from loopback) into the agent's prompt; the context agent, its structured formatter, then the
    engineer whose code runs: every turn a sub-agent of ``execute``, the code run on the engineer's nested
    chat, the download itself no node."""
    from .scripted_cmbagent import CONTEXT_DOCS

    run = runner(f"one_shot_{package}")
    assert run.results["final_context"][f"{package}_context"] == CONTEXT_DOCS
    answer = next(m["content"] for m in run.results["chat_history"] if m.get("name") == f"{package}_context")
    assert answer.endswith("Documentation read: True")
    nodes, events, _ = _backend_rows(run, tmp_path)
    assert _children(nodes, "execute") == [f"execute_{a}" for a in (
        f"{package}_context", f"{package}_response_formatter", "engineer", "engineer_nest",
        "executor_response_formatter", "control", "terminator")]
    short_of = {n["id"]: s for s, n in nodes.items()}
    assert [short_of[e["node_id"]] for e in events if e["event_type"] == "code_exec"] == ["execute_engineer_nest"]


def test_one_shot_evaluate_plots_model_calls_outside_ag2(runner: Any, tmp_path: Path) -> None:
    """one_shot(evaluate_plots=True): the engineer's program saves a plot, plot_judge's call_vlm_judge asks
    cmbagent's criteria model (openai.OpenAI directly) and the VLM (google.genai, loopback Gemini), then
    plot_debugger routes the verdict. The two model calls outside AG2 are LLM events too, of plot_judge,
    siblings in call order, with the usage they returned: cost records count their tokens."""
    run = runner("one_shot_plots")
    assert run.results["final_context"]["vlm_verdict"] == "continue"
    assert run.sequence == ["engineer", "engineer_response_formatter", "executor_response_formatter", "plot_judge",
                            "plot_criteria", "plot_judge_vlm", "plot_debugger", "control", "terminator"]
    calls = [s for s in run.spans if _kind(s) == sc.KIND_LLM and s.attributes.get(sc.GEN_AI_AGENT_NAME) == "plot_judge"]
    outside = calls[1:]  # after plot_judge's own (AG2) model call, in start order
    assert [(s.name, s.attributes[sc.GEN_AI_PROVIDER_NAME]) for s in outside] == [
        ("chat gpt-4o", "openai"), ("chat gemini-2.5-pro", "gcp.gemini")]
    criteria, vlm = outside
    assert (vlm.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS], vlm.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS]) == (300, 40)
    assert criteria.parent.span_id == vlm.parent.span_id and criteria.end_time <= vlm.start_time
    tool = _by_id(run)[vlm.parent.span_id]
    assert tool.name == "execute_tool call_vlm_judge"
    nodes, events, _ = _backend_rows(run, tmp_path)
    assert _children(nodes, "execute") == [f"execute_{a}" for a in (
        "engineer", "engineer_nest", "executor_response_formatter", "plot_judge", "plot_debugger", "control",
        "terminator")]
    llm = [(e["agent_name"], e["meta"].get("tokens")) for e in events if e["event_subtype"] == "llm"]
    assert ("plot_judge", 340) in llm and len(llm) == len(run.sequence)


def test_one_shot_evaluate_plots_retry_verdict_asks_the_plot_debugger(runner: Any, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The VLM's first verdict is "retry": plot_debugger's route_plot_judge_verdict asks Gemini for fixes
    (cmbagent's third model call outside AG2, which returns the fixes, not a completion), the engineer
    runs again, then the judge accepts. Each of the three calls outside AG2 is an LLM span with the GenAI
    client metrics AG2's own calls have and, content capture on, its prompt and answer (before: neither)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from cmbagent_otel import metrics as m

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    script = script_for("one_shot_plots_retry")
    with FakeOpenAIServer(request_responder=script) as server, GeminiServer(script) as gemini:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", gemini)
        monkeypatch.setenv("GEMINI_API_KEY", API_KEYS["GEMINI"])
        monkeypatch.setenv("OPENAI_API_KEY", API_KEYS["OPENAI"])
        cmbagent_otel.instrument(tracer_provider=provider, meter_provider=meters, set_global=False,
                                 instrument_threading=False, capture_content=True)
        try:
            results = call_workflow("one_shot_plots_retry", tmp_path)
        finally:
            cmbagent_otel.uninstrument()
    plain = runner("one_shot_plots_retry", instrumented=False)
    assert list(script.sequence) == plain.sequence and script.unexpected == []
    assert script.sequence == ["engineer", "engineer_response_formatter", "executor_response_formatter", "plot_judge",
                               "plot_criteria", "plot_judge_vlm", "plot_debugger", "plot_debugger_fixes", "engineer",
                               "engineer_response_formatter", "executor_response_formatter", "control", "terminator"]
    assert results["final_context"]["plot_fixes"] == script.PLOT_FIXES["fixes"]
    spans = list(memory.get_finished_spans())
    by_id = {s.context.span_id: s for s in spans}
    outside = [s for s in spans if _kind(s) == sc.KIND_LLM and s.name in ("chat gpt-4o", "chat gemini-2.5-pro")]
    assert [(s.name, s.attributes[sc.GEN_AI_AGENT_NAME]) for s in outside] == [
        ("chat gpt-4o", "plot_judge"), ("chat gemini-2.5-pro", "plot_judge"), ("chat gemini-2.5-pro", "plot_debugger")]
    criteria, vlm, fixes = outside
    assert by_id[fixes.parent.span_id].name == "execute_tool route_plot_judge_verdict"
    assert "the axes have no labels" in fixes.attributes[sc.GEN_AI_INPUT_MESSAGES]
    assert "plt.xlabel" in fixes.attributes[sc.GEN_AI_OUTPUT_MESSAGES]
    assert '"verdict\\": \\"retry' in vlm.attributes[sc.GEN_AI_OUTPUT_MESSAGES]
    assert "base_64_img" not in vlm.attributes[sc.GEN_AI_INPUT_MESSAGES]  # the image is no prompt text
    assert "acoustic peak" in criteria.attributes[sc.GEN_AI_OUTPUT_MESSAGES]
    found = {metric.name: list(metric.data.data_points) for resource in reader.get_metrics_data().resource_metrics
             for scope in resource.scope_metrics for metric in scope.metrics}
    durations = {p.attributes.get(sc.GEN_AI_REQUEST_MODEL): p.count for p in found[m.GEN_AI_CLIENT_OPERATION_DURATION]}
    assert durations["gpt-4o"] == 1 and durations["gemini-2.5-pro"] == 2
    assert sum(durations.values()) == len(script.sequence)  # every model call, AG2's and the three outside it
    tokens = {(p.attributes.get(sc.GEN_AI_REQUEST_MODEL), p.attributes.get(m.GEN_AI_TOKEN_TYPE)): p.sum
              for p in found[m.GEN_AI_CLIENT_TOKEN_USAGE]}
    assert tokens[("gemini-2.5-pro", m.TOKEN_INPUT)] == 300  # the VLM's usage; the fixes call returns none
    meters.shutdown()


@pytest.mark.parametrize("kind", ["planning_and_control", "one_shot"])
def test_attempts_running_out_fail_the_step(runner: Any, tmp_path: Path, kind: str) -> None:
    """max_n_attempts=1 and a failing first program: cmbagent hands over to the terminator after the
    retry; the step (one_shot: its execute node) is failed, the failed code run stays visible."""
    run = runner(kind, fail=True, max_n_attempts=1)
    assert run.results["final_context"]["n_attempts"] == 1
    _check_common_shape(run)
    node = _one(run, "step 1") if kind == "planning_and_control" else _one(run, "phase one_shot")
    assert node.status.status_code is StatusCode.ERROR
    assert "max_n_attempts 1" in (node.status.description or "")
    nodes, events, _ = _backend_rows(run, tmp_path)
    short = "step_1" if kind == "planning_and_control" else "execute"
    assert nodes[short]["status"] == "failed"
    short_of = {n["id"]: s for s, n in nodes.items()}
    assert [(short_of[e["node_id"]], e["status"]) for e in events if e["event_type"] == "code_exec"] == [
        (f"{short}_engineer_nest", "failed"), (f"{short}_engineer_nest_2", "completed")]
    if kind == "planning_and_control":
        # the plan stopped at step 1: steps 2 and 3 never ran, pending nodes of the plan (goal, agent)
        plan = run.results["final_context"]["final_plan"]
        for n in (2, 3):
            node, planned = nodes[f"step_{n}"], plan_steps(plan)[n - 1]
            assert (node["status"], node["meta"]["status"], node["agent"]) == ("pending", "pending",
                                                                                 planned["sub_task_agent"])
            assert node["meta"]["goal"] == planned["sub_task"] and node["meta"]["started_at"] is None
            assert node["parent_node_id"] == nodes["control"]["id"] and node["order_index"] == n
            assert not [e for e in events if e["node_id"] == node["id"]]
        assert _named(run, "step 2")[0].attributes[sc.STEP_STATUS] == sc.STEP_NOT_STARTED
    # the run stopped there: failed, as cmbagent's own tracking records it (the call returned normally)
    root = _one(run, f"workflow {kind}")
    stopped = "plan stopped: step 1" if kind == "planning_and_control" else "one_shot stopped: its execution"
    assert root.status.status_code is StatusCode.ERROR
    assert f"{stopped} ran out of attempts (n_attempts 1 >= max_n_attempts 1)" == root.status.description
    if kind == "planning_and_control":
        # and its control phase, as cmbagent's control phase fails the step, then itself
        control = _one(run, "phase control")
        assert (control.status.status_code, control.status.description) == (StatusCode.ERROR,
                                                                            root.status.description)
        assert nodes["control"]["status"] == "failed" and nodes["planning"]["status"] == "completed"


def test_plan_stopped_by_a_step_out_of_attempts_is_a_failed_run(runner: Any, tmp_path: Path) -> None:
    """planning_and_control returns normally after step 1 ran out of attempts (its plan stops there);
    cmbagent's own tracking fails such a run (its control phase fails the step, then the phase, and
    the workflow raises): the workflow span and the run row are failed, naming the step. The call's
    result is cmbagent's own (test_identical_app_outputs_with_and_without_instrumentation)."""
    run = runner("planning_and_control", fail=True, max_n_attempts=1)
    assert run.error is None and run.results["final_context"]["n_attempts"] == 1
    root = _one(run, "workflow planning_and_control")
    assert root.status.status_code is StatusCode.ERROR
    assert "step 1 ran out of attempts" in (root.status.description or "")
    _, _, row = _backend_rows(run, tmp_path)
    assert row["status"] == "failed" and "step 1 ran out of attempts" in row["meta"]["error"]


def test_carryover_out_of_attempts(runner: Any, tmp_path: Path) -> None:
    """max_n_attempts=1 in the carryover loop: step 1 fails, the loop stops, and cmbagent then raises
    its own FileNotFoundError (it cleans up the planning context's folders): the same exception as
    without telemetry, the run failed with it, the failed attempt named after the step's agent."""
    plain = runner("carryover", instrumented=False, fail=True, max_n_attempts=1)
    run = runner("carryover", fail=True, max_n_attempts=1)
    assert type(run.error) is type(plain.error) is FileNotFoundError
    assert str(run.error).replace(str(run.work_dir), "<wd>") == str(plain.error).replace(str(plain.work_dir), "<wd>")
    assert run.sequence == plain.sequence
    step1 = _one(run, "step 1")
    assert step1.status.status_code is StatusCode.ERROR
    assert [s.attributes[sc.STEP_STATUS] for n in (2, 3) for s in _named(run, f"step {n}")] == [
        sc.STEP_NOT_STARTED] * 2  # the loop stopped: steps 2 and 3 never ran
    (attempt,) = [s for s in run.spans if _kind(s) == sc.KIND_ATTEMPT]
    assert attempt.attributes[sc.GEN_AI_AGENT_NAME] == "engineer"
    nodes, events, row = _backend_rows(run, tmp_path)
    assert row["status"] == "failed" and "FileNotFoundError" in row["meta"]["error"]
    assert nodes["step_1"]["status"] == "failed"
    for n in (2, 3):
        node, planned = nodes[f"step_{n}"], DEFAULT_PLAN[n - 1]
        assert (node["status"], node["agent"], node["parent_node_id"]) == (
            "pending", planned.agent, nodes["control"]["id"])
        assert node["meta"]["goal"] == planned.task
        assert not [e for e in events if e["node_id"] == node["id"]]


def test_carryover_restart_at_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """restart_at_step=2 on a finished carryover run's work_dir: a second run without planning, steps 2
    and 3 from the stored context, laid out from the derived init node."""
    capture = SpanCapture()
    script = script_for("carryover")
    with FakeOpenAIServer(request_responder=script) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False, instrument_threading=False)
        try:
            call_workflow("carryover", tmp_path / "work")
            results = call_workflow("carryover", tmp_path / "work", restart_at_step=2)
        finally:
            cmbagent_otel.uninstrument()
    assert results["final_context"]["current_plan_step_number"] == 3 and script.unexpected == []
    spans = capture.spans  # in start order: the first run's root comes first
    assert len({s.context.trace_id for s in spans}) == 2
    restarted = [s for s in spans if s.context.trace_id != spans[0].context.trace_id]
    run = Run(results, list(script.sequence), [], tmp_path / "work", restarted)
    assert [s.name for s in restarted if _kind(s) == sc.KIND_STEP] == ["step 2", "step 3"]
    assert [_one(run, f"step {n}").attributes[sc.STEP_GOAL] for n in (2, 3)] == [p.task for p in DEFAULT_PLAN[1:]]
    assert not _named(run, "phase planning")
    nodes, _, row = _backend_rows(run, tmp_path)
    assert row["status"] == "completed"
    top = sorted((n["order_index"], s) for s, n in nodes.items() if n["parent_node_id"] is None)
    assert top == [(0, "init"), (4, "terminator"), (1001, "control")]
    assert _children(nodes, "control") == ["step_2", "step_3"]


# --- telemetry never changes the app -------------------------------------------------------------------
_STAMP = re.compile(r"\d{8}_\d{6}")
_CONTEXT_KEYS = ("current_plan_step_number", "current_status", "n_attempts", "number_of_steps_in_plan",
                 "agent_for_sub_task", "final_plan", "previous_steps_execution_summary", "current_sub_task")


def _normalized(run: Run) -> dict[str, Any]:
    wd = str(run.work_dir)

    def clean(value: Any) -> Any:
        text = json.dumps(value, sort_keys=True, default=repr).replace(wd, "<work_dir>")
        text = re.sub(r"call_\d+", "call_<id>", _STAMP.sub("<stamp>", text))
        return json.loads(text)

    # distinct names: files named by the second they were written in (idea_saver's ideas_<stamp>.json)
    # collide or not depending on timing alone
    files = sorted({_STAMP.sub("<stamp>", str(p.relative_to(run.work_dir))) for p in run.work_dir.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts})
    if run.error is not None:
        return {"error": [type(run.error).__name__, clean(str(run.error))], "files": files, "llm_calls": run.sequence}
    history = [
        {k: clean(m.get(k)) for k in ("name", "role", "content")} | {
            "tools": [c["function"]["name"] for c in m.get("tool_calls") or []]}
        for m in run.results.get("chat_history", [])
    ]
    context = {k: clean(run.results.get("final_context", {}).get(k)) for k in _CONTEXT_KEYS}
    return {"history": history, "context": context, "files": files, "llm_calls": run.sequence,
            "keywords": run.results.get("keywords")}  # what get_keywords returns


IDENTICAL = [*ENTRY_POINTS, ("planning_and_control", True, {"max_n_attempts": 1}),
             ("one_shot", True, {"max_n_attempts": 1}), ("carryover", True, {"max_n_attempts": 1})]


@pytest.mark.parametrize(("kind", "fail", "options"), IDENTICAL,
                         ids=_ids(IDENTICAL))
def test_identical_app_outputs_with_and_without_instrumentation(runner: Any, kind: str, fail: bool,
                                                                options: dict[str, Any]) -> None:
    plain = runner(kind, instrumented=False, fail=fail, **options)
    traced = runner(kind, instrumented=True, fail=fail, **options)
    assert plain.spans == [] and traced.spans
    assert _normalized(traced) == _normalized(plain)


def test_unsampled_run_records_its_metrics_and_runs_the_same(runner: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """always_off: no span, yet the plan steps derived from record_status are timed and every model
    call counted, and the app does exactly what it does without telemetry."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from cmbagent_otel import metrics as m

    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    script = script_for("planning_and_control")
    with FakeOpenAIServer(request_responder=script) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        cmbagent_otel.instrument(tracer_provider=provider, meter_provider=meters, set_global=False,
                                 instrument_threading=False)
        try:
            results = call_workflow("planning_and_control", tmp_path)
        finally:
            cmbagent_otel.uninstrument()
    assert memory.get_finished_spans() == ()
    plain = runner("planning_and_control", instrumented=False)
    assert list(script.sequence) == plain.sequence and script.unexpected == []
    assert results["final_context"]["current_plan_step_number"] == 3
    found = {metric.name: list(metric.data.data_points) for resource in reader.get_metrics_data().resource_metrics
             for scope in resource.scope_metrics for metric in scope.metrics}
    steps = found[m.STEP_DURATION]
    assert sum(p.count for p in steps) == 3 and all(p.attributes[sc.PHASE] == "control" for p in steps)
    assert all(sc.ERROR_TYPE not in p.attributes for p in steps)
    assert sum(p.count for p in found[m.WORKFLOW_DURATION]) == 1
    assert sum(p.count for p in found[m.GEN_AI_CLIENT_OPERATION_DURATION]) == len(script.sequence)
    meters.shutdown()


# --- a workflow function bound before instrument() --------------------------------------------------------
@pytest.mark.parametrize("stopped", [False, True], ids=["completed", "plan_stopped"])
def test_entry_point_imported_before_instrument_is_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           stopped: bool) -> None:
    """plan_stopped: step 1 runs out of attempts (max_n_attempts=1): the run (ended by sys.monitoring
    when the call returns) is failed, as through the wrapper."""
    import cmbagent.cmbagent as module

    assert not CmbagentInstrumentor().is_instrumented_by_opentelemetry
    bound = module.planning_and_control  # what `from cmbagent import planning_and_control` binds now
    script = script_for("planning_and_control", fail_first_code=stopped)
    capture = SpanCapture()
    with FakeOpenAIServer(request_responder=script) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False, instrument_threading=False)
        try:
            assert module.planning_and_control is not bound
            options = {"max_n_attempts": 1} if stopped else {}
            call_workflow("planning_and_control", tmp_path, function=bound, **options)
        finally:
            cmbagent_otel.uninstrument()
    spans = capture.spans
    assert len({s.context.trace_id for s in spans}) == 1
    root = [s for s in spans if _kind(s) == sc.KIND_WORKFLOW]
    assert [s.name for s in root] == ["workflow planning_and_control"]
    assert root[0].attributes[sc.WORKFLOW_TASK] == TASK
    names = [s.name for s in spans if sc.DAG_NODE_TYPE in (s.attributes or {}) and _kind(s) != sc.KIND_AGENT]
    assert {"phase planning", "phase control", "step 1", "step 2", "step 3"} <= set(names)
    assert root[0].end_time >= max(s.end_time for s in spans)
    assert (root[0].status.status_code is StatusCode.ERROR) is stopped
    if stopped:
        assert "step 1 ran out of attempts" in (root[0].status.description or "")


# --- opentelemetry-instrument, without touching the app ------------------------------------------------
def _auto_instrumented(tmp_path: Path, kind: str) -> subprocess.CompletedProcess[str]:
    """auto_app.py running ``kind`` under opentelemetry-instrument (instrumented before cmbagent is imported)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "SSL_CERT_FILE"}
    env.update({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "cmbagent-auto",
                "OTEL_BSP_SCHEDULE_DELAY": "50", "CMBAGENT_DISABLE_DISPLAY": "true", "SSL_CERT_DIR": str(tmp_path)})
    # the app runs in tmp_path: the cmbagent_otel under test by absolute path, not a relative PYTHONPATH
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cmbagent_otel.__file__).parents[1]),
                                         *(str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                           if p)])
    app = Path(__file__).with_name("auto_app.py")
    proc = subprocess.run([str(Path(sys.executable).parent / "opentelemetry-instrument"), sys.executable, str(app),
                           kind], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STEPS DONE 3" in proc.stdout
    return proc


def test_opentelemetry_instrument_gives_workflow_phase_and_step_spans(tmp_path: Path) -> None:
    proc = _auto_instrumented(tmp_path, "planning_and_control")
    for name in ("workflow planning_and_control", "phase planning", "phase control", "step 1", "step 2", "step 3",
                 "invoke_agent engineer", "execute_tool record_status"):
        assert f'"name": "{name}"' in proc.stdout, name


def test_deep_research_imported_after_instrumenting_is_named_as_called(tmp_path: Path) -> None:
    """cmbagent's __init__ binds deep_research to the carryover function after the instrumentor patched
    cmbagent.cmbagent: the alias still names its run deep_research (one workflow span, not two)."""
    proc = _auto_instrumented(tmp_path, "deep_research")
    assert proc.stdout.count('"name": "workflow deep_research"') == 1
    assert '"name": "workflow planning_and_control_context_carryover"' not in proc.stdout
    for name in ("phase planning", "phase control", "step 1", "step 2", "step 3"):
        assert f'"name": "{name}"' in proc.stdout, name


def test_api_keys_given_to_an_entry_point_are_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cmbagent's ``api_keys`` are credentials, also the ones no agent is configured with (MISTRAL
    serves cmbagent's OCR only): after a run none of them can reach a span, a log or a DB row."""
    from cmbagent_otel import redaction

    unused = "mistral-0f3c9a7e51d24b6b8e1a"
    assert unused in redaction.redact(f"key {unused}")  # not a secret before the run
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    capture = SpanCapture()
    with FakeOpenAIServer(request_responder=script_for("one_shot")) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False, instrument_threading=False)
        try:
            call_workflow("one_shot", tmp_path / "work", api_keys={**API_KEYS, "MISTRAL": unused})
        finally:
            cmbagent_otel.uninstrument()
    assert capture.exporter.get_finished_spans()
    assert unused not in redaction.redact(f"key {unused}")


@pytest.mark.parametrize(("code", "failed"), [(0, False), (None, False), (3, True)])
def test_sys_exit_inside_an_entry_point_follows_its_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              code: Any, failed: bool) -> None:
    """An app whose solve ends the process with ``sys.exit(code)`` inside ``one_shot``: the exception reaches
    the caller unchanged; exit code 0/None ends the run and its phase like a return (a completed run),
    any other code fails them."""
    from cmbagent.cmbagent import CMBAgent

    def solve(self: Any, *args: Any, **kwargs: Any) -> None:  # the app's code, patched before instrument()
        sys.exit(code)

    monkeypatch.setattr(CMBAgent, "solve", solve)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # never called: the solve exits first
    capture = SpanCapture()
    cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False, instrument_threading=False)
    try:
        with pytest.raises(SystemExit) as exited:
            call_workflow("one_shot", tmp_path / "work")
    finally:
        cmbagent_otel.uninstrument()
    assert exited.value.code == code
    spans = {s.name: s for s in capture.spans}
    for name in ("workflow one_shot", "phase one_shot"):
        assert (spans[name].status.status_code is StatusCode.ERROR) is failed, name
        assert bool([e for e in spans[name].events if e.name == "exception"]) is failed, name
