"""Failure paths of the real cmbagent package, audited the way a user reads the run (session 29).

The model API failing in the middle of a plan (the openai client's retries exhausted, the
exception raised out of ``planning_and_control``), one transient API error the client retries,
a control chat cut by ``max_rounds_control``, a plan stopped by a step out of attempts, and two
entry points called one after the other in one process. Each run is cmbagent's own (offline,
against the scripted backend), exported by the DAG exporter into SQLite and read back: the
rows must be complete and final (no node or event left running, every event inside its
parent, every reference resolvable), a failure must say why on every node it failed, and the
span tree must be one trace with one root and no orphans.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode
from sqlalchemy import create_engine, select

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

import cmbagent_otel
from cmbagent_otel.dag.writer import T
from cmbagent_otel.testing import FakeOpenAIServer
from tests.dag import cmbagent_backend as backend
from tests.dag.test_cmbagent_contract import check_contract

from .conftest import SharedRuns
from .scripted_cmbagent import API_KEYS, TASK, CmbagentScript, call_workflow, script_for
from .test_cmbagent_runs import Run, SpanCapture, _ancestors, _by_id, _exported, _one, _rows

pytestmark = pytest.mark.cmbagent_autogen


class ApiDown:
    """The scripted backend, except that ``agent``'s calls from its ``nth`` on fail with HTTP 500
    (``times`` of them; the openai client retries a 500 twice before it raises)."""

    def __init__(self, script: CmbagentScript, agent: str, nth: int, times: int = 10**6) -> None:
        self.script, self.agent, self.nth, self.times = script, agent, nth, times
        self.seen = self.failed = 0

    def __call__(self, body: dict[str, Any]) -> str | dict[str, Any]:
        if self.script.agent_of(body) == self.agent:
            self.seen += 1
            if self.seen >= self.nth and self.failed < self.times:
                self.failed += 1
                raise RuntimeError("model API down")  # FakeOpenAIServer answers 500
        return self.script(body)


Responder = Callable[[CmbagentScript], Callable[[dict[str, Any]], Any]]


@pytest.fixture
def run_cmbagent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 shared_runs: SharedRuns) -> Iterator[Callable[..., Run]]:
    """Runs cmbagent entry points (``kinds``, one after the other in this process) instrumented or plain.
    A run without a responder is shared with the tests that ask for the same one (conftest's
    ``SharedRuns``: same options, environment and working directory; each test gets a private copy)."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEYS["OPENAI"])
    captures: list[SpanCapture] = []

    def run(*kinds: str, instrumented: bool = True, fail: bool = False, responder: Responder | None = None,
            threads: bool = False, **options: Any) -> Run:
        name = "otel" if instrumented else "plain"
        key = None if responder else shared_runs.key(
            kinds, {"instrumented": instrumented, "fail": fail, "threads": threads, **options})
        if key is not None:
            shared = shared_runs.get(key)
            if shared is not None:
                return shared  # type: ignore[no-any-return]
        capture = SpanCapture()
        captures.append(capture)
        work = tmp_path / name if key is None else shared_runs.work_dir(name)
        results: dict[str, Any] = {}
        sequence: list[str] = []
        error = None
        if instrumented:
            cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False, instrument_threading=threads)
        try:
            for i, kind in enumerate(kinds):
                script = script_for(kind, fail_first_code=fail)
                with FakeOpenAIServer(request_responder=responder(script) if responder else script) as server:
                    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
                    work_dir = work / f"{i}-{kind}"
                    work_dir.mkdir(parents=True)
                    try:
                        results = call_workflow(kind, work_dir, **options)
                    except Exception as exc:  # cmbagent's own failure, compared with the plain run's
                        error = exc
                    finally:
                        sequence += script.sequence
                assert script.unexpected == []
        finally:
            if instrumented:
                cmbagent_otel.uninstrument()
        done = Run(results, sequence, [], work, capture.spans, error)
        if key is not None:
            shared_runs.put(key, done)
        return done

    yield run
    for capture in captures:
        capture.provider.shutdown()


def _final_rows(url: str) -> dict[str, Any]:
    """Every run in the database read back as cmbagent's backend reads it (the contract's checks), plus
    what a finished run owes its reader: nodes and events final, a failed node saying why, events inside
    their parents (time, depth, order) and in their run, costs equal to the events' usage. Returns the
    rows: runs, nodes by (run id, short id), events, costs, session states."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            runs = [dict(r) for r in conn.execute(select(T["workflow_runs"])).mappings()]
            for run in runs:
                check_contract(conn, run["id"])
    finally:
        engine.dispose()
    nodes = _rows(url, "dag_nodes")
    events = {e["id"]: e for e in _rows(url, "execution_events")}
    costs = _rows(url, "cost_records")
    by_run = {r["id"]: r for r in runs}
    node_run = {n["id"]: n["run_id"] for n in nodes}
    for run in runs:
        assert run["status"] in ("completed", "failed", "cancelled") and run["completed_at"] >= run["started_at"]
        run_events = [e for e in events.values() if e["run_id"] == run["id"]]
        tokens = sum(e["meta"].get("tokens", 0) for e in run_events)
        assert sum(c["total_tokens"] for c in costs if c["run_id"] == run["id"]) == tokens
    for n in nodes:
        short = n["meta"]["id"]
        assert n["status"] in ("completed", "failed", "pending") and n["meta"]["status"] == n["status"], short
        if n["status"] == "failed":
            assert isinstance(n["meta"].get("error"), str) and n["meta"]["error"], f"{short} failed without a reason"
        if n["parent_node_id"] is not None:
            assert node_run[n["parent_node_id"]] == n["run_id"], short
    for e in events.values():
        what = f"{e['event_type']}/{e['event_subtype']} of {e['agent_name']}"
        assert e["status"] in ("completed", "failed") and e["event_subtype"] != "start", what
        assert e["node_id"] is None or node_run[e["node_id"]] == e["run_id"], what
        assert e["completed_at"] >= e["started_at"] >= by_run[e["run_id"]]["started_at"], what
        assert e["completed_at"] <= by_run[e["run_id"]]["completed_at"], what
        if e["status"] == "failed":
            assert e["error_message"], what
        if e["parent_event_id"] is not None:
            parent = events[e["parent_event_id"]]
            assert parent["run_id"] == e["run_id"] and e["depth"] == parent["depth"] + 1, what
            assert e["execution_order"] > parent["execution_order"], what
            assert parent["started_at"] <= e["started_at"] and e["completed_at"] <= parent["completed_at"], what
    return {"runs": runs, "nodes": {(n["run_id"], n["meta"]["id"]): n for n in nodes},
            "events": list(events.values()), "costs": costs, "states": _rows(url, "session_states")}


def _one_root_per_trace(run: Run) -> None:
    """The span tree as Jaeger draws it: one root per trace, every other span's parent in the trace."""
    by_id = _by_id(run)
    for trace_id in {s.context.trace_id for s in run.spans}:
        spans = [s for s in run.spans if s.context.trace_id == trace_id]
        assert len([s for s in spans if s.parent is None]) == 1
        assert all(s.parent is None or s.parent.span_id in by_id for s in spans)


def _nodes_of(rows: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (run,) = rows["runs"]
    return {short: n for (run_id, short), n in rows["nodes"].items() if run_id == run["id"]}


def test_model_api_down_mid_plan(run_cmbagent: Callable[..., Run], tmp_path: Path) -> None:
    """The model API fails for good at step 3's engineer call: the openai client raises out of
    planning_and_control, unchanged. The run, control phase, step 3 and its engineer turn are failed with
    that error, the failed model call is a failed LLM event, steps 1 and 2 and planning stay completed,
    and the run's end (the terminator node, failed with the run) says why too."""
    down: Responder = lambda script: ApiDown(script, "engineer", 2)  # noqa: E731
    plain = run_cmbagent("planning_and_control", instrumented=False, responder=down)
    run = run_cmbagent("planning_and_control", responder=down)
    assert type(run.error) is type(plain.error) and type(run.error).__name__ == "InternalServerError"
    assert str(run.error) == str(plain.error) and run.sequence == plain.sequence
    _one_root_per_trace(run)
    by_id = _by_id(run)
    (failed_chat,) = [s for s in run.spans if s.name.startswith("chat ") and s.status.status_code is StatusCode.ERROR]
    assert [s.name for s in _ancestors(failed_chat, by_id)][:3] == ["invoke_agent engineer", "step 3",
                                                                   "invoke_agent main_cmbagent_chat"]
    assert _one(run, "workflow planning_and_control").status.status_code is StatusCode.ERROR

    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    error = row["meta"]["error"]
    assert row["status"] == "failed" and error.startswith("InternalServerError: ") and "model API down" in error
    nodes = _nodes_of(rows)
    main = ("planning", "control", "step_1", "step_2", "step_3", "terminator")
    assert [nodes[short]["status"] for short in main] == ["completed", "failed", "completed", "completed",
                                                          "failed", "failed"]
    for short in ("control", "step_3", "step_3_engineer", "terminator"):
        assert nodes[short]["meta"]["error"] == error, short
    (llm,) = [e for e in rows["events"] if e["event_subtype"] == "llm" and e["status"] == "failed"]
    assert llm["node_id"] == nodes["step_3_engineer"]["id"] and "model API down" in llm["error_message"]
    assert llm["meta"]["tokens"] == 0  # no usage came back


def test_model_api_error_retried_by_the_client(run_cmbagent: Callable[..., Run], tmp_path: Path) -> None:
    """One HTTP 500 on the engineer's first call: the openai client retries it and the run goes on. The
    call is one LLM event (completed, with the usage of the answer that came back), nothing failed."""
    blip: Responder = lambda script: ApiDown(script, "engineer", 1, times=1)  # noqa: E731
    run = run_cmbagent("planning_and_control", responder=blip)
    assert run.error is None
    _one_root_per_trace(run)
    assert not [s.name for s in run.spans if s.status.status_code is StatusCode.ERROR]
    rows = _final_rows(_exported(run, tmp_path))
    assert rows["runs"][0]["status"] == "completed"
    llm = [e for e in rows["events"] if e["event_subtype"] == "llm"]
    assert len(llm) == len(run.sequence) and all(e["status"] == "completed" and e["meta"]["tokens"] > 0 for e in llm)
    assert {n["status"] for n in _nodes_of(rows).values()} == {"completed"}


def test_plan_stopped_session_state_names_the_step_reached(run_cmbagent: Callable[..., Run],
                                                           tmp_path: Path) -> None:
    """Step 1 runs out of attempts and the plan stops there: the session state's ``current_step`` is 1,
    the step the run reached, not the plan's last (never started) step; the failed run's end says why."""
    run = run_cmbagent("planning_and_control", fail=True, max_n_attempts=1)
    assert run.error is None
    rows = _final_rows(_exported(run, tmp_path))
    nodes = _nodes_of(rows)
    assert [nodes[f"step_{n}"]["status"] for n in (1, 2, 3)] == ["failed", "pending", "pending"]
    (state,) = rows["states"]
    assert (state["current_phase"], state["current_step"]) == ("control", 1)
    assert nodes["terminator"]["meta"]["error"] == rows["runs"][0]["meta"]["error"]


def test_control_chat_cut_by_max_rounds(run_cmbagent: Callable[..., Run], tmp_path: Path) -> None:
    """max_rounds_control=6 ends the control chat inside step 1: cmbagent returns normally (a completed
    run, as its own tracking has it), step 1 is completed as cmbagent's tracking completes a step whose
    chat ended without running out of attempts (its summary says the chat ended while it was in progress),
    so no failed step sits under the completed control phase; steps 2 and 3 are pending (never started),
    the session state names step 1."""
    run = run_cmbagent("planning_and_control", max_rounds_control=6)
    assert run.error is None and run.results["final_context"]["current_plan_step_number"] == 1
    _one_root_per_trace(run)
    rows = _final_rows(_exported(run, tmp_path))
    assert rows["runs"][0]["status"] == "completed"
    nodes = _nodes_of(rows)
    assert [nodes[f"step_{n}"]["status"] for n in (1, 2, 3)] == ["completed", "pending", "pending"]
    assert nodes["step_1"]["meta"]["summary"] == "the chat ended while step 1 was in progress, before it " \
        "reported completion"
    assert nodes["control"]["status"] == "completed"
    assert rows["states"][0]["current_step"] == 1


def test_two_entry_points_one_after_the_other(run_cmbagent: Callable[..., Run], tmp_path: Path) -> None:
    """one_shot, then planning_and_control, in one process: two traces, two runs of their own (no node,
    event or cost shared), each laid out as when called alone."""
    run = run_cmbagent("one_shot", "planning_and_control")
    assert run.error is None
    _one_root_per_trace(run)
    assert len({s.context.trace_id for s in run.spans}) == 2
    rows = _final_rows(_exported(run, tmp_path))
    assert sorted((r["meta"]["name"], r["mode"], r["status"]) for r in rows["runs"]) == [
        ("one_shot", "one-shot", "completed"), ("planning_and_control", "planning-control", "completed")]
    shorts = {r["meta"]["name"]: sorted(s for (run_id, s) in rows["nodes"] if run_id == r["id"]
                                        and rows["nodes"][(run_id, s)]["parent_node_id"] is None)
              for r in rows["runs"]}
    assert shorts == {"one_shot": ["execute", "init", "terminator"],
                      "planning_and_control": ["control", "planning", "terminator"]}
    llm = [e for e in rows["events"] if e["event_subtype"] == "llm"]
    assert len(llm) == len(run.sequence)


def test_summarize_documents_run_names_its_work_dir(run_cmbagent: Callable[..., Run], tmp_path: Path) -> None:
    """summarize_documents' output folder is its ``work_dir_base``: the run row's ``meta.work_dir`` (what
    cmbagent's branching and run comparison read), as for the entry points that call it ``work_dir``."""
    run = run_cmbagent("summarize_documents", threads=True)  # instrument()'s default: one run
    assert run.error is None and run.results["processed_files"] == 2
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    assert row["meta"]["name"] == "summarize_documents"
    assert row["meta"]["work_dir"] == str(run.work_dir / "0-summarize_documents")


def test_cost_rows_against_cmbagent_cost_report(run_cmbagent: Callable[..., Run], tmp_path: Path) -> None:
    """cmbagent's cost report is not a per-call sum: each model call appends its OpenAIWrapper's running
    usage total (``return_usage_summary``) to the agent's ``cost_dict``, and ``display_cost`` sums those, so
    an agent whose client persists across calls (planning's planner, its formatter, plan_recorder) is
    counted 2x+ for a second call. Our rows hold each call's own usage: the planning phase's report is
    reproduced exactly as running totals of our LLM events, and each agent's cost row is the last total."""
    run = run_cmbagent("planning_and_control")
    rows = _final_rows(_exported(run, tmp_path))
    (report,) = sorted((run.work_dir / "0-planning_and_control" / "planning" / "cost").glob("cost_report_*.json"))
    reported = {r["Agent"]: (r["Prompt Tokens"], r["Completion Tokens"])
                for r in json.loads(report.read_text(encoding="utf-8")) if r["Agent"] != "Total"}
    nodes = _nodes_of(rows)
    planning = nodes["planning"]["id"]
    calls = sorted((e for e in rows["events"] if e["event_subtype"] == "llm" and e["node_id"] == planning),
                   key=lambda e: e["execution_order"])
    running: dict[str, list[int]] = {}
    reconstructed: dict[str, list[int]] = {}
    for e in calls:
        total = running.setdefault(e["agent_name"], [0, 0])
        total[0] += e["meta"]["prompt_tokens"]
        total[1] += e["meta"]["completion_tokens"]
        summed = reconstructed.setdefault(e["agent_name"].replace("_", " "), [0, 0])
        summed[0] += total[0]
        summed[1] += total[1]
    assert {a: tuple(v) for a, v in reconstructed.items()} == reported
    assert reported["planner"][0] > running["planner"][0]  # a second planner call: the report counts the first twice
    planners = set(running) - {"terminator"}  # the terminator speaks in control too: a second cost row
    costs = {c["agent_name"]: (c["prompt_tokens"], c["completion_tokens"]) for c in rows["costs"]
             if c["agent_name"] in planners}
    assert costs == {a: tuple(running[a]) for a in planners}


@pytest.mark.parametrize("kind", ["planning_and_control", "one_shot", "deep_research"])
def test_first_node_shows_the_task(run_cmbagent: Callable[..., Run], tmp_path: Path, kind: str) -> None:
    """``GET /api/runs/{id}/dag``: the run's first node carries the task (cmbagent's tracker puts it on
    its first node, ≤ 100 characters then "..."), whether that is a planning phase or the derived init."""
    run = run_cmbagent(kind)
    assert run.error is None
    url = _exported(run, tmp_path)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            (run_id,) = conn.execute(select(T["workflow_runs"].c.id)).scalars()
            first = backend.run_dag(conn, run_id)["nodes"][0]
    finally:
        engine.dispose()
    assert (first["id"], first["stepNumber"]) == ("init" if kind == "one_shot" else "planning", 1)
    assert first["task"] == TASK
