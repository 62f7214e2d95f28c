"""Rows of real cmbagent runs against what cmbagent's own backend writes and reads (session 30).

Each run is the real package's (offline, against the scripted backend), exported by the DAG
exporter into SQLite and read back. ``files``: cmbagent's backend registers the files of its output
folders in the run's work dir (its DAG tracker's ``track_files_in_work_dir``, on each step's
completion), so the UI's files tabs list them; the rows must be there, on the node that wrote each
file, with cmbagent's classification, paths only and redacted. The MARS backend test calls the
fork's own endpoint functions on our database (see ``mars_backend_probe.py``).
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

import cmbagent_otel
from cmbagent_otel.dag.writer import T
from cmbagent_otel.redaction import REDACTED
from cmbagent_otel.testing import FakeOpenAIServer
from tests.dag import cmbagent_backend as backend
from tests.dag.test_cmbagent_contract import check_contract

from .scripted_cmbagent import API_KEYS, call_workflow, script_for
from .test_cmbagent_runs import Run, SpanCapture, _exported, _rows
from .test_real_audit import _final_rows, _nodes_of, run_cmbagent  # noqa: F401 - the fixture (getfixturevalue)

pytestmark = pytest.mark.cmbagent_autogen


def _files_by_path(rows: list[dict[str, Any]], work: Path) -> dict[str, dict[str, Any]]:
    return {str(Path(f["file_path"]).relative_to(work)): f for f in rows}


def test_files_rows_of_planning_and_control(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Every file cmbagent left in its output folders is a ``files`` row (what the UI's files tabs list),
    on the node that wrote it: the plan and planning's reports on ``planning``, step 1's programs (the
    failed one and its retry) and nested-chat logs on ``step_1``, the researcher's report on ``step_2``,
    the control chat's log and reports written after its last step on ``control``; typed as cmbagent
    types them. A file named after the API key keeps no trace of it."""
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    run = runner("planning_and_control", fail=True,
                       responder=lambda script: _SecretNamedFile(script, tmp_path / "otel" / "0-planning_and_control"))
    assert run.error is None
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    work = run.work_dir / "0-planning_and_control"
    on_disk = {str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()}
    stored = _rows(url, "files")
    by_path = _files_by_path(stored, work)
    assert set(by_path) == on_disk - {f"data/{API_KEYS['OPENAI']}.csv"} | {f"data/{REDACTED}.csv"}
    assert API_KEYS["OPENAI"] not in json.dumps(stored, default=str)
    nodes = _nodes_of(rows)
    short_of = {n["id"]: short for short, n in nodes.items()}

    def where(rel: str) -> tuple[str | None, str, str | None, bool]:
        f = by_path[rel]
        return short_of.get(f["node_id"]), f["file_type"], f["workflow_phase"], f["is_final_output"]

    (plan_cost,) = [p for p in by_path if p.startswith("planning/cost/")]
    assert where("planning/final_plan.json") == ("planning", "plan", "planning", True)
    assert where(plan_cost) == ("planning", "report", "planning", False)
    assert where("control/codebase/step_code_1.py") == ("step_1", "code", "control", True)
    assert where("control/codebase/step_code_2.py") == ("step_1", "code", "control", True)  # the retry
    assert where("control/chats/nested_chat_output_engineer_step_1_attempt_2.json")[:2] == ("step_1", "chat")
    assert where("control/interpretation.md")[:2] == ("step_2", "report")
    assert where("control/codebase/step_code_3.py")[:2] == ("step_3", "code")
    (control_cost,) = [p for p in by_path if p.startswith("control/cost/")]
    assert where(control_cost)[:2] == ("control", "report")
    assert where("control/chats/chat_output.json")[:2] == ("control", "chat")
    assert by_path["control/codebase/step_code_1.py"]["generating_agent"] == "engineer"
    assert by_path["control/interpretation.md"]["generating_agent"] == "researcher"
    for rel, f in by_path.items():
        if REDACTED in rel:
            continue
        assert f["size_bytes"] == (work / rel).stat().st_size and f["session_id"] == rows["runs"][0]["session_id"]
        assert rows["runs"][0]["started_at"] <= f["created_at"] <= rows["runs"][0]["completed_at"], rel

    # what the backend's files endpoints return (the contract's reproduction of them)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            run_id = rows["runs"][0]["id"]
            listed = backend.run_files(conn, run_id)
            assert len(listed) == len(stored)
            step_1 = {Path(f["file_path"]).name for f in backend.node_files(conn, "step_1", run_id)}
            summary = backend.execution_summary(conn, "step_1", run_id)
            (run_meta,) = conn.execute(select(T["workflow_runs"].c.meta)).scalars()
    finally:
        engine.dispose()
    assert {"step_code_1.py", "step_code_2.py"} <= step_1
    assert summary["files_generated"] == len(step_1)
    assert API_KEYS["OPENAI"] not in json.dumps(run_meta)


class _SecretNamedFile:
    """The scripted backend; on the first model call a data file named after the API key appears in
    the run's ``data`` folder (as if the user's program had named it so)."""

    def __init__(self, script: Callable[[dict[str, Any]], Any], work_dir: Path) -> None:
        self.script, self.work_dir = script, work_dir

    def __call__(self, body: dict[str, Any]) -> Any:
        data = self.work_dir / "data"
        if not data.exists():
            data.mkdir(parents=True)
            (data / f"{API_KEYS['OPENAI']}.csv").write_text("l,cl\n", encoding="utf-8")
        return self.script(body)


def test_files_rows_of_one_shot(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """one_shot writes into the work dir's own folders (no phase folder): its program and chat log are on
    ``execute``, the node that ran them."""
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    run = runner("one_shot")
    rows = _final_rows(_exported(run, tmp_path))
    work = run.work_dir / "0-one_shot"
    stored = _rows(f"sqlite:///{tmp_path / 'cmbagent.db'}", "files")
    by_path = _files_by_path(stored, work)
    assert set(by_path) == {str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()
                            and p.relative_to(work).parts[0] in ("codebase", "chats", "cost", "time", "data")}
    execute = _nodes_of(rows)["execute"]["id"]
    codes = [f for f in by_path.values() if f["file_type"] == "code"]
    assert codes and all(f["node_id"] == execute for f in codes)


# --- cmbagent's own backend (MARS fork) on our rows -------------------------------------------------
def _mars_source(tmp: Path) -> Path | None:
    """A MARS source tree: ``CMBAGENT_OTEL_MARS_SRC`` (a checkout, or a git directory whose HEAD is
    extracted here, never into this repository)."""
    src = os.environ.get("CMBAGENT_OTEL_MARS_SRC")
    if not src:
        return None
    path = Path(src)
    if (path / "backend" / "routers").is_dir():
        return path
    out = tmp / "mars"
    out.mkdir()
    archive = subprocess.run(["git", f"--git-dir={path}", "archive", "HEAD", "cmbagent", "backend"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def _mars_python() -> str | None:
    """An interpreter with what the fork's backend imports (SQLAlchemy, FastAPI, python-multipart,
    structlog): ``CMBAGENT_OTEL_MARS_PYTHON``, else this one."""
    python = os.environ.get("CMBAGENT_OTEL_MARS_PYTHON") or sys.executable
    probe = "import fastapi, multipart, sqlalchemy, structlog"
    return python if subprocess.run([python, "-c", probe], capture_output=True).returncode == 0 else None


def _mars_answers(mars: Path, python: str, url: str, out: Path, branch_from: str | None = None,
                  branches: bool = False) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CMBAGENT_"))}
    if branch_from:
        env["MARS_PROBE_BRANCH_FROM"] = branch_from
    if branches:
        env["MARS_PROBE_BRANCHES"] = "1"
    done = subprocess.run([python, str(Path(__file__).with_name("mars_backend_probe.py")), str(mars), url, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_mars_backend_serves_a_real_run(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """cmbagent's own backend code (the MARS fork's routers, repositories and branching, unmodified, read
    from a source tree at test time) on the rows of a real planning_and_control run whose first program
    fails: every endpoint answers, with the run's data. The DAG is ours node for node; each node's
    events are its rows; the execution summaries' token totals are the node's LLM usage; costs add up to
    the LLM events; the session is listed with its state; the resumable nodes start at order 0; the files
    endpoints list the work dir's files; a branch made from step 2 by cmbagent's BranchManager appears
    in its branch tree, and play-from-node prepares the run from step 2."""
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    mars = _mars_source(tmp_path)
    python = _mars_python()
    if mars is None or python is None:
        pytest.skip("set CMBAGENT_OTEL_MARS_SRC (a MARS checkout or git dir) and CMBAGENT_OTEL_MARS_PYTHON (with "
                    "fastapi, python-multipart, sqlalchemy, structlog) to run cmbagent's own backend")
    run = runner("planning_and_control", fail=True)
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    run_id = row["id"]
    nodes = _nodes_of(rows)
    events = [e for e in rows["events"] if e["event_subtype"] != "start"]
    files = _rows(url, "files")
    edges = _rows(url, "dag_edges")  # read before cmbagent's branching adds the branch's copies
    answers = _mars_answers(mars, python, url, tmp_path / "answers.json", branch_from="step_2")

    failed = {k: v["EXC"] for k, v in answers.items() if isinstance(v, dict) and "EXC" in v}
    # BranchComparator._compare_steps reads WorkflowStep.agent, a column cmbagent renamed (contract §11.12):
    # comparing any run that has a workflow_steps row fails in cmbagent itself (the branch made one)
    assert failed == {"compare": "HTTPException: Error comparing branches: 'WorkflowStep' object has no attribute "
                                 "'agent'"}

    dag = answers[f"{run_id} dag"]
    assert {n["id"]: n["status"] for n in dag["nodes"]} == {s: n["status"] for s, n in nodes.items()}
    assert dag["nodes"][0]["id"] == "planning" and dag["nodes"][0]["task"] == row["task_description"]
    assert len(dag["edges"]) == len(edges)
    for short, node in nodes.items():
        mine = [e for e in events if e["node_id"] == node["id"]]
        theirs = answers[f"{run_id} events {short}"]
        assert theirs["total_events"] == len(mine), short
        summary = answers[f"{run_id} summary {short}"]["execution_summary"]
        assert summary["cost_summary"].get("total_tokens", 0) == sum(e["meta"].get("tokens", 0) for e in mine), short
        mine_files = [f for f in files if f["node_id"] == node["id"]]
        assert answers[f"{run_id} files {short}"]["total_files"] == len(mine_files), short
    llm_tokens = sum(e["meta"].get("tokens", 0) for e in events if e["event_subtype"] == "llm")
    assert answers[f"{run_id} costs"]["total_tokens"] == llm_tokens > 0
    assert answers[f"{run_id} files"]["total_files"] == len(files) > 0
    assert len(answers[f"{run_id} history"]["events"]) == len(events)
    (listed,) = [s for s in answers["sessions"]["sessions"] if s["session_id"] == row["session_id"]]
    assert (listed["mode"], listed["status"], listed["current_phase"]) == ("planning-control", "completed", "control")
    assert answers[f"{run_id} session"]["current_step"] == 3
    assert [r["id"] for r in answers[f"{run_id} session runs"]["runs"]] == [run_id]
    resumable = answers[f"{run_id} resumable"]["nodes"]
    assert resumable[0]["node_id"] == "planning" and resumable[0]["can_resume"]
    child = answers["branch"]["branch_run_id"]
    (branch,) = answers["branch tree"]["tree"]["children"]
    assert (branch["run_id"], branch["name"], branch["hypothesis"]) == (child, "smaller step", "a smaller step size")
    assert {n["id"] for n in answers["branch dag"]["nodes"]} == set(nodes)
    assert answers["play from node"]["result"]["node_id"] == "step_2"


def test_mars_backend_serves_a_failed_run(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """cmbagent's own backend on a failed real run (step 1 out of attempts, the plan stopped): every
    endpoint answers; the DAG shows step 1 and the terminator failed, steps 2-3 pending; the session is
    listed suspended; a branch can be made from the failed step."""
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    mars = _mars_source(tmp_path)
    python = _mars_python()
    if mars is None or python is None:
        pytest.skip("set CMBAGENT_OTEL_MARS_SRC and CMBAGENT_OTEL_MARS_PYTHON to run cmbagent's own backend")
    run = runner("planning_and_control", fail=True, max_n_attempts=1)
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    nodes = _nodes_of(rows)
    answers = _mars_answers(mars, python, url, tmp_path / "answers.json", branch_from="step_1")
    assert [k for k, v in answers.items() if isinstance(v, dict) and "EXC" in v] == ["compare"]
    dag = {n["id"]: n["status"] for n in answers[f"{row['id']} dag"]["nodes"]}
    assert dag == {s: n["status"] for s, n in nodes.items()}
    assert [dag[s] for s in ("planning", "step_1", "step_2", "step_3", "terminator")] == [
        "completed", "failed", "pending", "pending", "failed"]
    assert [(s["mode"], s["status"]) for s in answers["sessions"]["sessions"]] == [("planning-control", "suspended")]
    assert answers["branch tree"]["tree"]["children"][0]["run_id"] == answers["branch"]["branch_run_id"]


# --- Ctrl-C -------------------------------------------------------------------------------------------
class CtrlCAt:
    """The scripted backend; while answering ``agent``'s first call it presses Ctrl-C: the main thread
    (waiting for that answer in the openai client) gets KeyboardInterrupt once the answer is back."""

    def __init__(self, script: Any, agent: str) -> None:
        self.script, self.agent, self.pressed = script, agent, False

    def __call__(self, body: dict[str, Any]) -> Any:
        if not self.pressed and self.script.agent_of(body) == self.agent:
            self.pressed = True
            _thread.interrupt_main(signal.SIGINT)
        return self.script(body)


def run_interrupted(workflow: str, agent: str, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> tuple[Run, SpanCapture]:
    """Run cmbagent's ``workflow`` (scripted backend, instrumented) with Ctrl-C pressed during ``agent``'s
    first model call; the KeyboardInterrupt reaches the caller unchanged. The run's spans, and the
    capture (the caller shuts its provider down once it has exported them)."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEYS["OPENAI"])
    # the handler an interactive `python app.py` has (a test run in the background may ignore SIGINT)
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    capture = SpanCapture()
    press = CtrlCAt(script_for(workflow), agent)
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False, instrument_threading=False)
    try:
        with FakeOpenAIServer(request_responder=press) as server:
            monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
            with pytest.raises(KeyboardInterrupt):
                call_workflow(workflow, work_dir)
    finally:
        cmbagent_otel.uninstrument()
        signal.signal(signal.SIGINT, saved)
    assert press.pressed
    return Run({}, [], [], work_dir, capture.spans), capture


def test_ctrl_c_in_a_step_is_a_cancelled_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during step 1's model call: KeyboardInterrupt leaves planning_and_control unchanged, and the run
    row is ``cancelled``, the status cmbagent's own tracking gives a run the user stopped (its backend's stop
    (WorkflowController.cancel_workflow) moves the run to WorkflowState.CANCELLED; the contract has no such
    status for nodes). The nodes the interrupt cut are failed with the reason, the plan's later steps pending,
    the terminator failed with the reason, nothing left running."""
    run, capture = run_interrupted("planning_and_control", "engineer", tmp_path, monkeypatch)
    url = _exported(run, tmp_path)
    capture.provider.shutdown()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            (row,) = [dict(r) for r in conn.execute(select(T["workflow_runs"])).mappings()]
            check_contract(conn, row["id"])
    finally:
        engine.dispose()
    assert row["status"] == "cancelled" and row["meta"]["error"].startswith("KeyboardInterrupt")
    nodes = {n["meta"]["id"]: n for n in _rows(url, "dag_nodes")}
    assert [nodes[s]["status"] for s in ("planning", "step_1", "step_2", "step_3")] == [
        "completed", "failed", "pending", "pending"]
    assert nodes["step_1"]["meta"]["error"].startswith("KeyboardInterrupt")
    assert nodes["terminator"]["status"] == "failed" and nodes["terminator"]["meta"]["error"] == row["meta"]["error"]
    assert not [s for s, n in nodes.items() if n["status"] == "running"]
    assert not [e for e in _rows(url, "execution_events") if e["status"] == "running"]


@pytest.mark.parametrize(("kind", "short", "label", "description"), [
    ("planning_and_control", "planning", "Planning Phase", "Analyzing task and creating execution plan"),
    ("one_shot", "execute", "Execute (engineer)", "Execute task"),
])
def test_phase_labels_as_cmbagent_writes_them(request: pytest.FixtureRequest, tmp_path: Path, kind: str, short: str,
                                             label: str, description: str) -> None:
    """``GET /api/runs/{id}/dag``'s label and description (what the UI prints on a node) of the planning
    phase and of one_shot's ``execute`` node are those of cmbagent's DAG tracker (its templates and
    create_dag_for_mode's overrides), not our span's phase name ("planning", "one_shot")."""
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    run = runner(kind)
    url = _exported(run, tmp_path)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            (run_id,) = conn.execute(select(T["workflow_runs"].c.id)).scalars()
            nodes = {n["id"]: n for n in backend.run_dag(conn, run_id)["nodes"]}
    finally:
        engine.dispose()
    assert (nodes[short]["label"], nodes[short]["description"]) == (label, description)


def test_failed_run_suspends_its_session(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A failed run's session state is ``suspended``, as cmbagent's backend leaves the session of a run that
    failed (``suspend_session``; its UI offers to resume it), not ``completed``: here step 1 runs out of
    attempts and the plan stops (cmbagent returns normally, the run is failed). A completed run's stays
    ``completed``."""
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    run = runner("planning_and_control", fail=True, max_n_attempts=1)
    rows = _final_rows(_exported(run, tmp_path))
    assert rows["runs"][0]["status"] == "failed"
    (state,) = rows["states"]
    assert (state["status"], state["current_phase"], state["current_step"]) == ("suspended", "control", 1)
    engine = create_engine(f"sqlite:///{tmp_path / 'cmbagent.db'}")
    try:
        with engine.connect() as conn:
            assert [(s["mode"], s["status"]) for s in backend.sessions(conn)] == [("planning-control", "suspended")]
    finally:
        engine.dispose()
