"""What a user of the real cmbagent package sees, fifth audit (session 33).

Paths the earlier audits had not run: the carryover loop (``planning_and_control_context_carryover`` /
``deep_research``) with a step that raises, ``human_in_the_loop`` and ``control`` whose program fails with
``max_n_attempts=1``, ``one_shot`` and planning with the model API down, and a plan whose programs save
plots. Each is cmbagent's own run (offline, against the scripted backend), exported by the DAG exporter
into SQLite, read back as cmbagent's backend reads it (``test_real_audit._final_rows``) and, with
``CMBAGENT_OTEL_MARS_SRC`` / ``CMBAGENT_OTEL_MARS_PYTHON``, by cmbagent's own backend code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

import cmbagent_otel

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from cmbagent_otel import semconv as sc

from .scripted_cmbagent import API_KEYS, DEFAULT_PLAN, CmbagentScript
from .test_backend_rows import _mars_answers, _mars_python, _mars_source, run_interrupted
from .test_cmbagent_runs import _exported, _kind, _named, _one, _rows
from .test_real_audit import (  # noqa: F401 - run_cmbagent: the fixture (getfixturevalue)
    ApiDown,
    Responder,
    _final_rows,
    _nodes_of,
    _one_root_per_trace,
    run_cmbagent,
)

pytestmark = pytest.mark.cmbagent_autogen


def _researcher_down(script: CmbagentScript) -> ApiDown:
    return ApiDown(script, "researcher", 1)  # step 2 of the default plan is the researcher's


def _mars(tmp_path: Path, url: str) -> dict[str, Any] | None:
    mars, python = _mars_source(tmp_path), _mars_python()
    if mars is None or python is None:
        return None
    return _mars_answers(mars, python, url, tmp_path / "answers.json")


def test_carryover_step_that_raises_leaves_the_later_steps_pending(request: pytest.FixtureRequest,
                                                                   tmp_path: Path) -> None:
    """The carryover loop (``deep_research``), the model API down for good at step 2 (the researcher's):
    the openai client's error leaves the entry call unchanged and stops the loop. cmbagent's DAG has a
    node per plan step once planning is done (pending), and the step it never reaches stays so: step 3
    is a pending node (goal, agent from the plan, no events, not started), as when the single-chat plan
    raises or a carryover step runs out of attempts; step 2, the control phase and the run are failed
    with the error. cmbagent's own backend serves the same DAG."""
    plain = request.getfixturevalue("run_cmbagent")("carryover", instrumented=False, responder=_researcher_down)
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=_researcher_down)
    assert type(run.error) is type(plain.error) and type(run.error).__name__ == "InternalServerError"
    assert str(run.error) == str(plain.error) and run.sequence == plain.sequence
    _one_root_per_trace(run)
    step2 = _one(run, "step 2")
    assert step2.status.status_code is StatusCode.ERROR
    # what step 2 had reached when its solve raised, as a step that returned carries it (session 38; on
    # 8bacdca neither): no failed attempt of its limit 3, nothing reported (control_starter names no step)
    assert (step2.attributes[sc.STEP_ATTEMPTS], step2.attributes[sc.STEP_MAX_ATTEMPTS]) == (0, 3)
    assert sc.STEP_STATUS not in step2.attributes
    (step3,) = _named(run, "step 3")
    assert step3.attributes[sc.STEP_STATUS] == sc.STEP_NOT_STARTED
    assert step3.status.status_code is StatusCode.UNSET
    assert _one(run, "phase control").status.status_code is StatusCode.ERROR
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    assert row["status"] == "failed" and row["meta"]["error"].startswith("InternalServerError: ")
    nodes = _nodes_of(rows)
    assert [nodes[s]["status"] for s in ("planning", "step_1", "step_2", "step_3", "control", "terminator")] == [
        "completed", "completed", "failed", "pending", "failed", "failed"]
    pending, planned = nodes["step_3"], DEFAULT_PLAN[2]
    assert (pending["agent"], pending["meta"]["goal"], pending["parent_node_id"], pending["order_index"]) == (
        planned.agent, planned.task, nodes["control"]["id"], 3)
    assert pending["meta"]["started_at"] is None
    assert not [e for e in rows["events"] if e["node_id"] == pending["id"]]
    assert (rows["states"][0]["current_phase"], rows["states"][0]["current_step"]) == ("control", 2)
    answers = _mars(tmp_path, url)
    if answers is not None:  # cmbagent's own backend on these rows
        assert {k: v["EXC"] for k, v in answers.items() if isinstance(v, dict) and "EXC" in v} == {}
        dag = {n["id"]: n["status"] for n in answers[f"{row['id']} dag"]["nodes"]}
        assert dag == {s: n["status"] for s, n in nodes.items()}
        assert answers[f"{row['id']} events step_3"]["total_events"] == 0


@pytest.mark.parametrize("kind", ["deep_research", "human_in_the_loop"])
def test_steps_of_their_own_solve_carry_the_reported_status(request: pytest.FixtureRequest, kind: str) -> None:
    """A carryover step (one solve per step) and human_in_the_loop's one step carry
    ``cmbagent.step.status``, the status cmbagent's ``record_status`` last reported for it, as the steps
    of one group chat do (a trace UI's tag search for completed steps finds them all)."""
    run = request.getfixturevalue("run_cmbagent")(kind)
    assert run.error is None
    steps = [s for s in run.spans if _kind(s) == sc.KIND_STEP]
    assert len(steps) == (3 if kind == "deep_research" else 1)
    assert [s.attributes.get(sc.STEP_STATUS) for s in steps] == ["completed"] * len(steps)


def test_carryover_step_out_of_attempts_reports_its_status(request: pytest.FixtureRequest) -> None:
    """The carryover step that ran out of attempts never reported completion: its status is the last one
    record_status reported (``in progress``), the later steps ``not started``."""
    run = request.getfixturevalue("run_cmbagent")("carryover", fail=True, max_n_attempts=1)
    assert [s.attributes.get(sc.STEP_STATUS) for s in run.spans if _kind(s) == sc.KIND_STEP] == [
        "in progress", sc.STEP_NOT_STARTED, sc.STEP_NOT_STARTED]


def test_human_in_the_loop_out_of_attempts(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """human_in_the_loop whose program fails with ``max_n_attempts=1``: cmbagent hands over to the
    terminator after the retry and returns normally; its one step ran out of attempts, so the step, the
    chat phase and the run are failed (as a plan step's), the failed code run stays visible, and
    cmbagent's backend serves the rows."""
    run = request.getfixturevalue("run_cmbagent")("human_in_the_loop", fail=True, max_n_attempts=1)
    assert run.error is None and run.results["final_context"]["n_attempts"] == 1
    _one_root_per_trace(run)
    stopped = "plan stopped: step 1 ran out of attempts (n_attempts 1 >= max_n_attempts 1)"
    for name in ("workflow human_in_the_loop", "phase chat"):
        span = _one(run, name)
        assert (span.status.status_code, span.status.description) == (StatusCode.ERROR, stopped), name
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    assert (row["status"], row["mode"], row["meta"]["error"]) == ("failed", "hitl-interactive", stopped)
    nodes = _nodes_of(rows)
    assert [nodes[s]["status"] for s in ("init", "chat", "step_1", "terminator")] == [
        "completed", "failed", "failed", "failed"]
    short_of = {n["id"]: s for s, n in nodes.items()}
    assert [(short_of[e["node_id"]], e["status"]) for e in rows["events"] if e["event_type"] == "code_exec"] == [
        ("step_1_engineer_nest", "failed"), ("step_1_engineer_nest_2", "completed")]
    answers = _mars(tmp_path, url)
    if answers is not None:
        assert {k: v["EXC"] for k, v in answers.items() if isinstance(v, dict) and "EXC" in v} == {}
        assert {n["id"]: n["status"] for n in answers[f"{row['id']} dag"]["nodes"]} == {
            s: n["status"] for s, n in nodes.items()}
        assert [(s["mode"], s["status"]) for s in answers["sessions"]["sessions"]] == [
            ("hitl-interactive", "suspended")]


def test_control_ignores_max_n_attempts(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """``control(..., max_n_attempts=1)``: cmbagent's ``control`` takes the argument but never puts it in
    the chat's context, so its default limit (3) applies and a failing first program is retried. We show
    what cmbagent did: the attempt marker says ``of max_n_attempts=3``, step 1 and the run completed."""
    run = request.getfixturevalue("run_cmbagent")("control", fail=True, max_n_attempts=1)
    assert run.error is None and run.results["final_context"]["max_n_attempts"] == 3
    (attempt,) = [s for s in run.spans if _kind(s) == sc.KIND_ATTEMPT]
    assert "of max_n_attempts=3" in (attempt.status.description or "")
    rows = _final_rows(_exported(run, tmp_path))
    assert rows["runs"][0]["status"] == "completed"
    assert {s: n["status"] for s, n in _nodes_of(rows).items() if n["parent_node_id"] is None} == {
        "init": "completed", "control": "completed", "terminator": "completed"}


@pytest.mark.parametrize(("kind", "agent", "failed"), [("one_shot", "engineer", "execute"),
                                                       ("planning_and_control", "planner", "planning")])
def test_model_api_down_in_the_first_phase(request: pytest.FixtureRequest, tmp_path: Path, kind: str, agent: str,
                                           failed: str) -> None:
    """The model API down from the first call of one_shot's engineer / the planner: the error leaves the
    entry call unchanged; the phase, the run and its end are failed with it, nothing else is left
    running, and planning_and_control has no step node (no plan was made)."""
    down: Responder = lambda script: ApiDown(script, agent, 1)  # noqa: E731
    run = request.getfixturevalue("run_cmbagent")(kind, responder=down)
    assert type(run.error).__name__ == "InternalServerError"
    _one_root_per_trace(run)
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    assert row["status"] == "failed"
    nodes = {s: n for s, n in _nodes_of(rows).items() if n["parent_node_id"] is None}
    assert {s: n["status"] for s, n in nodes.items()} == {
        **({"init": "completed"} if kind == "one_shot" else {}), failed: "failed", "terminator": "failed"}
    assert nodes[failed]["meta"]["error"] == row["meta"]["error"]
    assert rows["states"][0]["status"] == "suspended"


def test_plots_of_a_plan_are_plot_files_of_their_step(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """planning_and_control whose programs save a PNG in the control folder's ``data``: the plot is a
    ``files`` row typed ``plot`` (cmbagent's rule), a final output, on the step whose engineer wrote it
    last (step 3), generating agent ``engineer``; the programs on the steps that ran them."""

    def plots(script: CmbagentScript) -> CmbagentScript:
        script.plots = True
        return script

    run = request.getfixturevalue("run_cmbagent")("planning_and_control", responder=plots)
    assert run.error is None
    url = _exported(run, tmp_path)
    nodes = _nodes_of(_final_rows(url))
    short_of = {n["id"]: s for s, n in nodes.items()}
    work = run.work_dir / "0-planning_and_control"
    files = {str(Path(f["file_path"]).relative_to(work)): f for f in _rows(url, "files")}
    plot = files["control/data/spectrum.png"]
    assert (plot["file_type"], plot["is_final_output"], short_of[plot["node_id"]], plot["generating_agent"]) == (
        "plot", True, "step_3", "engineer")
    assert {p: short_of[f["node_id"]] for p, f in files.items() if f["file_type"] == "code"} == {
        "control/codebase/step_code_1.py": "step_1", "control/codebase/step_code_2.py": "step_3"}
    assert API_KEYS["OPENAI"] not in repr(list(files.values()))


def test_carryover_files_written_between_steps(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The carryover loop writes each step's chat history, cost and time reports and context
    (``chat_history_step_<n>.json``, ``context_step_<n>.pkl``, ...) after that step's solve has returned,
    just before the next step starts; cmbagent's own tracker registers them on the next step (its scan at
    step n's completion runs before they exist; the first scan to see a file keeps it), and so do we
    (by modification time): those of step 1 on ``step_2``, those of the last step on ``control``."""
    run = request.getfixturevalue("run_cmbagent")("deep_research")
    assert run.error is None
    url = _exported(run, tmp_path)
    nodes = _nodes_of(_final_rows(url))
    short_of = {n["id"]: s for s, n in nodes.items()}
    work = run.work_dir / "0-deep_research"
    on = {str(Path(f["file_path"]).relative_to(work)): short_of.get(f["node_id"]) for f in _rows(url, "files")}
    assert on["control/chats/chat_history_step_1.json"] == "step_2"
    assert on["context/context_step_1.pkl"] == "step_2"
    assert on["control/chats/chat_history_step_3.json"] == "control"
    assert on["control/chats/chat_output_engineer_step_1.json"] == "step_1"


def _reports_failed(times: int, step: int = 1) -> Responder:
    """The scripted backend whose control reports plan step ``step`` failed ``times`` times before it
    reports it completed (cmbagent hands an engineer step back to the engineer)."""

    def responder(script: CmbagentScript) -> CmbagentScript:
        script.failed_reports, script.failed_step = times, step
        return script

    return responder


def test_step_reported_failed_then_completed(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """control reports step 1 failed once: cmbagent hands it back to the engineer, whose program runs
    again, and control then completes it. A red ``step 1 reported failed`` marker under the step (an
    ``info/attempt`` failed event on ``step_1``), the step, the plan and the run completed."""
    run = request.getfixturevalue("run_cmbagent")("planning_and_control", responder=_reports_failed(1))
    assert run.error is None and run.sequence.count("engineer") == 3
    (marker,) = [s for s in run.spans if _kind(s) == sc.KIND_ATTEMPT]
    assert marker.name == "step 1 reported failed" and marker.status.status_code is StatusCode.ERROR
    step1 = _one(run, "step 1")
    assert marker.parent is not None and marker.parent.span_id == step1.context.span_id
    assert (step1.status.status_code, step1.attributes[sc.STEP_STATUS]) == (StatusCode.UNSET, "completed")
    rows = _final_rows(_exported(run, tmp_path))
    nodes = _nodes_of(rows)
    assert rows["runs"][0]["status"] == "completed"
    assert {n["status"] for n in nodes.values()} == {"completed"}
    (event,) = [e for e in rows["events"] if e["event_subtype"] == "attempt"]
    assert (event["status"], event["node_id"]) == ("failed", nodes["step_1"]["id"])


@pytest.mark.parametrize("kind", ["planning_and_control", "carryover"])
def test_chat_ending_on_a_step_reported_failed_completes_it(request: pytest.FixtureRequest, tmp_path: Path,
                                                            kind: str) -> None:
    """control reports step 1 failed every time and ``max_rounds_control`` ends the chat there (no
    attempt counted: every program ran). cmbagent returns normally, and its own tracking completes a step
    whose chat ended without running out of attempts (MARS ``ControlPhase``: ``complete_step`` unless
    ``n_attempts >= max_n_attempts``), as we do for a step cut while in progress and for the carryover
    loop's steps: step 1 is completed, its summary says how the chat ended, ``cmbagent.step.status``
    keeps ``failed`` and the red ``step 1 reported failed`` markers stay; no failed step under the
    completed phase and run."""
    run = request.getfixturevalue("run_cmbagent")(kind, responder=_reports_failed(1000), max_rounds_control=14)
    assert run.error is None
    step1 = _one(run, "step 1")
    assert (step1.status.status_code, step1.attributes[sc.STEP_STATUS]) == (StatusCode.UNSET, "failed")
    rows = _final_rows(_exported(run, tmp_path))
    nodes = _nodes_of(rows)
    assert rows["runs"][0]["status"] == "completed"
    assert (nodes["step_1"]["status"], nodes["control"]["status"]) == ("completed", "completed")
    if kind == "carryover":
        # steps 2 and 3 start from step 1's final context ("failed"); nothing reported for them claims so
        assert [s.attributes.get(sc.STEP_STATUS) for n in (2, 3) for s in _named(run, f"step {n}")] == [None, None]
    if kind == "planning_and_control":  # the single chat: the plan ends with that chat
        assert nodes["step_1"]["meta"]["summary"] == ("the chat ended while step 1 was reported failed, "
                                                      "before it reported completion")
        assert [nodes[f"step_{n}"]["status"] for n in (2, 3)] == ["pending", "pending"]
        assert [s.name for s in run.spans if _kind(s) == sc.KIND_ATTEMPT] == ["step 1 reported failed"]


def test_step_reported_failed_then_out_of_attempts_stops_the_plan(request: pytest.FixtureRequest,
                                                                 tmp_path: Path) -> None:
    """control reports step 1 failed, the engineer's second program then fails with ``max_n_attempts=1``:
    cmbagent hands over to the terminator (the plan stops there) and returns normally. The step ran out
    of attempts, so, as for any step out of attempts, cmbagent's tracking fails the step, the control
    phase and the run (``plan stopped: step 1 ran out of attempts ...``); steps 2 and 3 pending."""

    def responder(script: CmbagentScript) -> CmbagentScript:
        script.failed_reports, script.failed_step, script.fail_runs = 1, 1, frozenset({2})
        return script

    run = request.getfixturevalue("run_cmbagent")("planning_and_control", responder=responder, max_n_attempts=1)
    assert run.error is None and run.results["final_context"]["n_attempts"] == 1
    stopped = "plan stopped: step 1 ran out of attempts (n_attempts 1 >= max_n_attempts 1)"
    root = _one(run, "workflow planning_and_control")
    assert (root.status.status_code, root.status.description) == (StatusCode.ERROR, stopped)
    rows = _final_rows(_exported(run, tmp_path))
    nodes = _nodes_of(rows)
    assert (rows["runs"][0]["status"], rows["runs"][0]["meta"]["error"]) == ("failed", stopped)
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == [
        "failed", "pending", "pending", "failed"]
    assert nodes["step_1"]["meta"]["error"] == "step 1 ran out of attempts (n_attempts 1 >= max_n_attempts 1)"


def test_researcher_step_reported_failed_raises_inside_cmbagent(request: pytest.FixtureRequest,
                                                                tmp_path: Path) -> None:
    """control reports the researcher's step 2 failed: cmbagent hands it to ``researcher_response_formatter``
    with no message to answer, and AG2's function-call reply raises ``IndexError`` out of
    planning_and_control (cmbagent's own failure, the same without telemetry). The rows say so: step 2
    (its red ``reported failed`` marker under it), control and the run failed with the error, step 3
    pending, step 1 completed; no API key in the database."""
    runner = request.getfixturevalue("run_cmbagent")
    plain = runner("planning_and_control", instrumented=False, responder=_reports_failed(1, step=2))
    run = runner("planning_and_control", responder=_reports_failed(1, step=2))
    assert type(run.error) is type(plain.error) is IndexError and run.sequence == plain.sequence
    _one_root_per_trace(run)
    assert [s.name for s in run.spans if _kind(s) == sc.KIND_ATTEMPT] == ["step 2 reported failed"]
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    nodes = _nodes_of(rows)
    assert rows["runs"][0]["status"] == "failed" and rows["runs"][0]["meta"]["error"].startswith("IndexError")
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == [
        "completed", "failed", "pending", "failed"]
    assert nodes["step_2"]["meta"]["error"].startswith("IndexError")
    assert API_KEYS["OPENAI"].encode() not in (tmp_path / "cmbagent.db").read_bytes()


def test_ctrl_c_in_a_carryover_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during step 2 (the researcher's model call) of the carryover loop: KeyboardInterrupt leaves
    the entry call unchanged; the run is ``cancelled`` (cmbagent's stop), step 2 and the control phase
    failed with the reason, step 3 pending (never reached, as in the single-chat plan), nothing running."""
    run, capture = run_interrupted("carryover", "researcher", tmp_path, monkeypatch)
    _one_root_per_trace(run)
    rows = _final_rows(_exported(run, tmp_path))
    capture.provider.shutdown()
    (row,) = rows["runs"]
    assert row["status"] == "cancelled" and row["meta"]["error"].startswith("KeyboardInterrupt")
    nodes = _nodes_of(rows)
    assert [nodes[s]["status"] for s in ("planning", "step_1", "step_2", "step_3", "control")] == [
        "completed", "completed", "failed", "pending", "failed"]
    assert nodes["step_2"]["meta"]["error"].startswith("KeyboardInterrupt")


# the app process: deep_research against the scripted offline server, the model API down from step 2's
# researcher call on; the exception leaves the entry call (caught here, so the process exits normally)
JAEGER_DRIVER = """
import contextlib, io, os, tempfile
from pathlib import Path
os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
os.environ.pop("SSL_CERT_FILE", None)
os.environ["SSL_CERT_DIR"] = tempfile.mkdtemp()
import cmbagent_otel
from cmbagent_otel.testing import FakeOpenAIServer
from tests.integration_cmbagent.scripted_cmbagent import call_workflow, script_for
script = script_for("deep_research")
def responder(body):
    if script.agent_of(body) == "researcher":
        raise RuntimeError("model API down")  # FakeOpenAIServer answers 500
    return script(body)
with FakeOpenAIServer(request_responder=responder) as server:
    os.environ["OPENAI_BASE_URL"] = server.base_url
    cmbagent_otel.instrument()
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            call_workflow("deep_research", Path(tempfile.mkdtemp()))
        except Exception as exc:
            assert type(exc).__name__ == "InternalServerError", exc
        else:
            raise AssertionError("deep_research did not raise")
"""


@pytest.mark.jaeger
def test_carryover_step_that_raises_in_jaeger(tmp_path: Path) -> None:
    """The raising carryover run as Jaeger shows it: one trace, step 2, the control phase and the root red,
    step 3 a short span tagged ``cmbagent.step.status=not started`` (not red), and a tag search for
    ``cmbagent.step.status=completed`` finds the run by its completed step 1."""
    import json
    import subprocess
    import sys
    from urllib.parse import quote

    from tests.jaeger.support import JAEGER_CONFIG, http_get, run_jaeger

    root_dir = Path(__file__).resolve().parents[2]
    source = Path(cmbagent_otel.__file__).resolve().parents[1]  # the cmbagent_otel under test
    with run_jaeger(JAEGER_CONFIG, tmp_path, "jaeger") as jaeger:
        env = dict(os.environ, OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                   OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.otlp_http, OTEL_SERVICE_NAME="cmbagent-carryover-raise",
                   PYTHONPATH=os.pathsep.join([str(source), str(root_dir)]))
        proc = subprocess.run([sys.executable, "-c", JAEGER_DRIVER], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        _, found = http_get(f"{jaeger.query}/api/traces?service=cmbagent-carryover-raise&limit=20")
        tags = quote(json.dumps({"cmbagent.step.status": "completed"}))
        _, searched = http_get(f"{jaeger.query}/api/traces?service=cmbagent-carryover-raise&tags={tags}&limit=20")
    (trace,) = found["data"]
    assert [t["traceID"] for t in searched["data"]] == [trace["traceID"]]
    spans = trace["spans"]
    tags_of = {s["spanID"]: {t["key"]: t["value"] for t in s["tags"]} for s in spans}
    red = {s["operationName"] for s in spans if tags_of[s["spanID"]].get("error") is True}
    assert {"workflow deep_research", "phase control", "step 2"} <= red and "step 3" not in red
    steps = {s["operationName"]: tags_of[s["spanID"]].get("cmbagent.step.status") for s in spans
             if s["operationName"] in ("step 1", "step 2", "step 3")}
    assert steps == {"step 1": "completed", "step 2": None, "step 3": "not started"}


def test_step_reported_failed_then_moved_past_is_completed(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """control reports step 1 failed, the engineer runs again, then control announces step 2 without
    completing step 1: the plan went on past it, as past a completed step (cmbagent's tracking completes
    every step it leaves without running out of attempts). Step 1 is completed, its summary says it was
    left while reported failed, ``cmbagent.step.status`` keeps ``failed``, the red marker stays; the rest
    of the plan and the run completed."""

    def responder(script: CmbagentScript) -> CmbagentScript:
        script.failed_reports, script.failed_step, script.after_failed = 1, 1, "next"
        return script

    run = request.getfixturevalue("run_cmbagent")("planning_and_control", responder=responder)
    assert run.error is None and run.results["final_context"]["current_plan_step_number"] == 3
    step1 = _one(run, "step 1")
    assert (step1.status.status_code, step1.attributes[sc.STEP_STATUS]) == (StatusCode.UNSET, "failed")
    assert step1.attributes[sc.STEP_SUMMARY] == "the next step started while step 1 was reported failed"
    assert [s.name for s in run.spans if _kind(s) == sc.KIND_ATTEMPT] == ["step 1 reported failed"]
    rows = _final_rows(_exported(run, tmp_path))
    assert rows["runs"][0]["status"] == "completed"
    assert {s: n["status"] for s, n in _nodes_of(rows).items() if n["node_type"] != "sub_agent"} == {
        "planning": "completed", "control": "completed", "step_1": "completed", "step_2": "completed",
        "step_3": "completed", "terminator": "completed"}
