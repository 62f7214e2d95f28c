"""What a user of the real cmbagent package sees, eighteenth audit (session 43).

MARS's own ``WorkflowExecutor`` and ``ControlPhase`` (``CMBAGENT_OTEL_MARS_SRC``, loaded next to the PyPI cmbagent
by conftest's ``mars_phases``) and the PyPI entry points run offline against the scripted backend; spans read back,
and the rows the DAG exporter writes into SQLite read as cmbagent's backend reads them
(``test_real_audit._final_rows``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

import cmbagent_otel
from cmbagent_otel import semconv as sc

from .conftest import MARS_CONTROL_CONFIG, pypi_cmbagent_for_mars
from .test_cmbagent_runs import _exported
from .test_cmbreal17_audit import assert_cancel_restated
from .test_real_audit import _final_rows, _nodes_of, _one_root_per_trace, run_cmbagent  # noqa: F401 - fixture

pytestmark = pytest.mark.cmbagent_autogen


def _executor_in_the_apps_run(cancelled: bool, caught_inside: bool = False) -> Any:
    """An entry function for ``run_cmbagent``: MARS's ``WorkflowExecutor`` running a one-phase workflow
    (``control`` on the preloaded plan) inside the application's own ``cmbagent_otel.workflow(...)`` block, with
    the callbacks of a user who cancels from the UI when step 1 completes when ``cancelled``; the executor's
    ``RuntimeError`` caught inside the block (which is then left normally) when ``caught_inside``, else outside
    it. Returns what the executor raised (``None``: nothing) and the phases' results."""

    def run(task: str, work_dir: str, api_keys: dict[str, str], **_: Any) -> dict[str, Any]:
        from cmbagent.phases.control import ControlPhase
        from cmbagent.phases.registry import PhaseRegistry
        from cmbagent.workflows.composer import WorkflowDefinition, WorkflowExecutor

        from .test_cmbreal16_audit import _cancelled_after_step_1

        PhaseRegistry.register_class("control", ControlPhase)  # as MARS's cmbagent.phases package does
        definition = WorkflowDefinition(id="preloaded_control", name="Preloaded control", description="",
                                        phases=[{"type": "control", "config": MARS_CONTROL_CONFIG}])
        executor = WorkflowExecutor(definition, task, str(work_dir), api_keys,
                                    callbacks=_cancelled_after_step_1() if cancelled else None)
        caught: list[str] = []
        with pypi_cmbagent_for_mars():
            try:
                with cmbagent_otel.workflow("preloaded control", mode="planning-control", task=task):
                    try:
                        executor.run_sync()
                    except RuntimeError as exc:
                        if not caught_inside:
                            raise
                        caught.append(str(exc))
            except RuntimeError as exc:
                caught.append(str(exc))
        return {"error": caught[0] if caught else None, "phases": [r.status.value for r in executor.results]}

    return run


@pytest.mark.parametrize("cancelled", [False, True], ids=["completed", "cancelled"])
def test_a_mars_executor_inside_the_apps_run_ends_it_as_its_phases_ended(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path, cancelled: bool) -> None:
    """Session 42's Left. The executor inside the application's own ``workflow`` block: when its phases complete,
    the run completed; when the user cancels (the phase's ``raise_if_cancelled()`` raising
    ``WorkflowCancelledException`` into ``manager.fail()``, then the executor's own ``RuntimeError("Phase control
    failed: Workflow cancelled by user")`` through the application's block), the run is cancelled, as the same
    executor's own run is (session 42) and as cmbagent's cancel endpoint marks it: on 5d6278f it ended with the
    ``RuntimeError``, ``failed``. The application still gets the ``RuntimeError``; it is an exception event of
    the run."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_executor_in_the_apps_run(cancelled))
    assert run.error is None, run.error
    _one_root_per_trace(run)
    assert len({s.context.trace_id for s in run.spans}) == 1
    (root,) = [s for s in run.spans if s.parent is None]
    assert root.name == "workflow preloaded control"
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    nodes = _nodes_of(rows)
    if not cancelled:
        assert (run.results["error"], run.results["phases"]) == (None, ["completed"])
        assert root.status.status_code is StatusCode.UNSET, root.status.description
        assert row["status"] == "completed"
        assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == ["completed"] * 4
        return
    assert run.results["error"] == "Phase control failed: Workflow cancelled by user"
    assert "researcher" not in run.sequence  # step 2 never started
    assert_cancel_restated(run, root)
    assert row["status"] == "cancelled" and "Workflow cancelled by user" in row["meta"]["error"]
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == [
        "completed", "pending", "pending", "failed"]
    assert all(n["status"] != "running" for n in nodes.values())


@pytest.mark.parametrize("package", ["camb", "classy"])
def test_two_documentation_calls_at_once_each_read_the_served_docs_and_leave_the_url(tmp_path: Path,
                                                                                    package: str) -> None:
    """Session 42's Left (tests only). ``call_workflow("one_shot_<package>")`` points cmbagent's
    ``<package>_context_url`` at a loopback document server for the call. Two calls from two threads, ordered by
    events (no sleeps): A enters, B enters, A returns, then B reads the URL. Each saved and put back what it
    found, so on 5d6278f B read cmbagent's real (https) URL once A had left, and after both the module held A's
    stopped server's URL for the rest of the process. Now every read inside a call gets the documents, and the
    module's URL is cmbagent's own afterwards."""
    import sys
    import threading
    import urllib.request

    from .scripted_cmbagent import CONTEXT_DOCS, call_workflow

    module = sys.modules["cmbagent.cmbagent"]
    name = f"{package}_context_url"
    original = getattr(module, name)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    read: dict[str, str] = {}

    def served() -> str:
        with urllib.request.urlopen(getattr(module, name), timeout=30) as answer:
            return answer.read().decode("utf-8")

    def call_a(task: str, **_: Any) -> dict[str, Any]:
        a_in.set()
        assert b_in.wait(60)
        read["a"] = served()
        return {}

    def call_b(task: str, **_: Any) -> dict[str, Any]:
        b_in.set()
        assert a_out.wait(60)
        read["b"] = served() if getattr(module, name).startswith("http://127.0.0.1:") else getattr(module, name)
        return {}

    def a() -> None:
        try:
            call_workflow(f"one_shot_{package}", tmp_path / "a", function=call_a)
        finally:
            a_out.set()

    thread = threading.Thread(target=a, name="call A")
    thread.start()
    try:
        assert a_in.wait(60)
        call_workflow(f"one_shot_{package}", tmp_path / "b", function=call_b)
    finally:
        thread.join()
    assert read == {"a": CONTEXT_DOCS, "b": CONTEXT_DOCS}
    assert getattr(module, name) == original


def test_cmbagent_backend_reads_the_cancelled_run_of_an_executor_inside_the_apps_run(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path) -> None:
    """cmbagent's own backend (MARS's routers, unmodified, ``CMBAGENT_OTEL_MARS_PYTHON``) on the rows of the
    executor cancelled inside the application's run, written into SQLite and into PostgreSQL from the same spans:
    every endpoint answers, the same from both; the run's status ``cancelled`` (``failed`` on 5d6278f); its DAG
    ours node for node; the history every event; the session listed."""
    from .test_cmbreal9_audit import served_run

    *_, row, lite = served_run(request, mars_phases, tmp_path, _executor_in_the_apps_run(cancelled=True), "cancelled")
    dag = {n["id"]: n for n in lite[f"{row['id']} dag"]["nodes"]}
    assert [dag[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == [
        "completed", "pending", "pending", "failed"]


def test_two_executors_inside_two_apps_runs_in_two_threads_end_apart(request: pytest.FixtureRequest,
                                                                     mars_phases: Path, tmp_path: Path) -> None:
    """Two application runs at once in one process, each with MARS's executor inside its own ``workflow`` block, in
    two threads sharing the database: one cancelled by its user after step 1, the other completing. Each ends as
    its own phases did (``cancelled``, ``completed``): the restated cancel of one thread's executor marks only
    that thread's blocks."""
    import threading

    def both(task: str, work_dir: str, api_keys: dict[str, str], **_: Any) -> dict[str, Any]:
        results: dict[str, Any] = {}

        def one(name: str, cancelled: bool) -> None:
            folder = Path(work_dir) / name
            folder.mkdir()
            results[name] = _executor_in_the_apps_run(cancelled)(f"{task} ({name})", str(folder), api_keys)

        threads = [threading.Thread(target=one, args=(name, name == "cancelled"), name=name)
                   for name in ("cancelled", "completed")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script, function=both)
    assert run.error is None, run.error
    assert run.results["cancelled"] == {"error": "Phase control failed: Workflow cancelled by user",
                                        "phases": ["failed"]}
    assert run.results["completed"] == {"error": None, "phases": ["completed"]}
    _one_root_per_trace(run)
    rows = _final_rows(_exported(run, tmp_path))
    status = {r["task_description"].rpartition("(")[2].rstrip(")"): r["status"] for r in rows["runs"]}
    assert status == {"cancelled": "cancelled", "completed": "completed"}
    for row in rows["runs"]:
        nodes = {short: n["status"] for (run_id, short), n in rows["nodes"].items() if run_id == row["id"]}
        expected = (["completed", "pending", "pending", "failed"] if row["status"] == "cancelled"
                    else ["completed"] * 4)
        assert [nodes[s] for s in ("step_1", "step_2", "step_3", "control")] == expected, row["status"]


def _researchers_formatter_answering_no_json(script: Any) -> Any:
    """A responder: the scripted backend, but the researcher's response formatter answers text that is not the
    JSON its schema asks for (the first time it is asked: step 2), so AG2's structured output raises pydantic's
    ``ValidationError`` inside the step, out of the entry point."""

    def answer(body: dict[str, Any]) -> Any:
        if script.agent_of(body) == "researcher_response_formatter":
            script.sequence.append("researcher_response_formatter")
            return "this is not json {"
        return script(body)

    return answer


@pytest.mark.parametrize("case", ["plan_reviewed_three_times", "step_2_formatter_raising"])
def test_new_planning_and_control_shapes_in_the_dag_and_cmbagents_backend(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path, case: str) -> None:
    """Two ``planning_and_control`` runs no audit had made, read back as rows, with ``cmbagent-otel dag latest``'s
    picture and by cmbagent's own backend (MARS's routers, ``CMBAGENT_OTEL_MARS_PYTHON``) from SQLite and
    PostgreSQL. ``n_plan_reviews=3``: the planner, its recorder and the reviewer go round three times, every
    model call one LLM event of the ``planning`` node, the run completed. A sub-agent raising inside a step (the
    researcher's formatter answering no JSON: pydantic's ``ValidationError`` out of cmbagent): step 2 and the
    formatter's node failed with it, step 3 pending, control and the run failed. The backend answers every route
    the same from both databases, its DAG ours node for node."""
    from tests.conftest import PG_ENV

    from .test_backend_rows import _mars_python
    from .test_cmbreal9_audit import _comparable, backend_answers

    reviewed = case == "plan_reviewed_three_times"
    options: dict[str, Any] = {"n_plan_reviews": 3} if reviewed else {}
    responder = (lambda script: script) if reviewed else _researchers_formatter_answering_no_json
    run = request.getfixturevalue("run_cmbagent")("planning_and_control", responder=responder, **options)
    sqlite = _exported(run, tmp_path)
    rows = _final_rows(sqlite)
    (row,) = rows["runs"]
    nodes = _nodes_of(rows)
    planning = nodes["planning"]["id"]
    planning_calls = [e for e in rows["events"] if e["event_subtype"] == "llm" and e["node_id"] == planning]
    if reviewed:
        assert run.error is None, run.error
        assert run.sequence.count("plan_reviewer") == 3 and run.sequence.count("planner") == 4
        assert len(planning_calls) == run.sequence.index("control")  # every model call before control's first
        assert row["status"] == "completed"
        assert all(n["status"] == "completed" for n in nodes.values())
    else:
        assert type(run.error).__name__ == "ValidationError"
        assert row["status"] == "failed" and row["meta"]["error"].startswith("ValidationError: ")
        assert [nodes[s]["status"] for s in ("planning", "step_1", "step_2", "step_3", "control", "terminator")] == [
            "completed", "completed", "failed", "pending", "failed", "failed"]
        assert nodes["step_2_researcher_response_formatter"]["status"] == "failed"
    # `cmbagent-otel dag latest`: the nodes in cmbagent's order, each with its status
    import contextlib
    import io

    from cmbagent_otel.cli import main as cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["--db", sqlite, "dag", "latest"]) == 0
    picture = out.getvalue().splitlines()
    assert f" planning-control {row['status']} " in picture[0]
    top = [line[4:].split(" (")[0] for line in picture[1:] if line[:4] in ("├── ", "└── ")]
    assert top == ["planning", "control", "terminator"]
    python = _mars_python()
    base = os.environ.get(PG_ENV)
    if python is None or not base:
        pytest.skip(f"set CMBAGENT_OTEL_MARS_PYTHON (fastapi, python-multipart, sqlalchemy, structlog, psycopg) and "
                    f"{PG_ENV}")
    lite, pgsql, statuses = backend_answers(mars_phases, python, run.spans, sqlite, base, tmp_path)
    assert statuses == [row["status"]]
    assert _comparable(pgsql) == _comparable(lite)
    dag = {n["id"]: n for n in lite[f"{row['id']} dag"]["nodes"]}
    assert {s: n["status"] for s, n in dag.items()} == {s: n["status"] for s, n in nodes.items()}
    assert len(lite[f"{row['id']} history"]["events"]) == len(rows["events"])


def _mars_one_shot_workflow(cancelled: bool, joined: bool = False) -> Any:
    """An entry function for ``run_cmbagent``: MARS's own ``one_shot`` workflow function
    (``cmbagent.workflows.one_shot``: its ``OneShotPhase`` run by its ``WorkflowExecutor``), called as MARS's
    backend's task executor calls it in one-shot mode, with ``callbacks``; the user's cancel already set when
    ``cancelled`` (the phase's ``raise_if_cancelled()`` stops it before its first model call); inside the
    application's own ``workflow(...)`` block when ``joined``. Returns what it raised (``None``: nothing)."""

    def run(task: str, work_dir: str, api_keys: dict[str, str], **_: Any) -> dict[str, Any]:
        from cmbagent.callbacks import WorkflowCallbacks
        from cmbagent.phases.one_shot import OneShotPhase
        from cmbagent.phases.registry import PhaseRegistry
        from cmbagent.workflows import one_shot as workflows

        PhaseRegistry.register_class("one_shot", OneShotPhase)  # as MARS's cmbagent.phases package does
        callbacks = WorkflowCallbacks(should_continue=lambda: not cancelled)
        with pypi_cmbagent_for_mars():
            try:
                with (cmbagent_otel.workflow("one shot", mode="one-shot", task=task) if joined
                      else contextlib.nullcontext()):
                    workflows.one_shot(task, work_dir=str(work_dir), api_keys=api_keys, callbacks=callbacks)
            except RuntimeError as exc:
                return {"error": str(exc)}
        return {"error": None}

    return run


@pytest.mark.parametrize(("cancelled", "joined"), [(False, False), (True, False), (True, True)],
                         ids=["completed", "cancelled", "cancelled_in_the_apps_run"])
def test_a_mars_workflow_function_whose_phase_is_cancelled_is_a_cancelled_run(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path, cancelled: bool, joined: bool) -> None:
    """The same restated cancel inside an entry call's run: MARS's ``one_shot`` workflow function (an entry point
    of ours: its call is the run) runs its executor, whose ``RuntimeError("Phase one_shot failed: Workflow
    cancelled by user")`` restates the phase's cancel; MARS's backend calls it so for a one-shot task the user
    cancels. On 5d6278f the run was ``failed`` with the ``RuntimeError`` (the terminator node saying so); now
    ``cancelled``, the ``execute`` node failed with the cancel's message. Uncancelled, the run completed. The
    call inside the application's own ``workflow`` block (it joins that run): the same."""
    run = request.getfixturevalue("run_cmbagent")("one_shot", responder=lambda script: script,
                                                  function=_mars_one_shot_workflow(cancelled, joined))
    assert run.error is None, run.error
    _one_root_per_trace(run)
    (root,) = [s for s in run.spans if s.parent is None]
    assert root.name == ("workflow one shot" if joined else "workflow one_shot")
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    nodes = _nodes_of(rows)
    if not cancelled:
        assert run.results["error"] is None
        assert row["status"] == "completed"
        assert [nodes[s]["status"] for s in ("init", "execute", "terminator")] == ["completed"] * 3
        return
    assert run.results["error"] == "Phase one_shot failed: Workflow cancelled by user"
    assert run.sequence == []  # stopped before its first model call
    message = "WorkflowCancelledException: Workflow cancelled by user"
    assert (root.status.description, root.attributes[sc.ERROR_TYPE]) == (message, "WorkflowCancelledException")
    assert (row["status"], row["meta"]["error"]) == ("cancelled", message)
    assert [nodes[s]["status"] for s in ("init", "execute", "terminator")] == ["completed", "failed", "failed"]
    assert nodes["execute"]["meta"]["error"] == "Workflow cancelled by user"


def _mars_planning_and_control(cancelled: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An entry function for ``run_cmbagent``: MARS's own ``planning_and_control_context_carryover`` workflow
    function (``cmbagent.workflows.planning_control``: its ``PlanningPhase`` then ``ControlPhase`` run by its
    ``WorkflowExecutor``), called as MARS's backend's task executor calls it for a planning-control task, with
    ``callbacks``: those of a user who cancels from the UI when step 1 completes when ``cancelled``. MARS's
    planning phase hands the PyPI ``save_final_plan`` its planning folder as a ``str``, which the PyPI function
    joins with ``/``: given as a ``Path`` here. Returns what it raised (``None``: nothing)."""

    def run(task: str, work_dir: str, api_keys: dict[str, str], **_: Any) -> dict[str, Any]:
        from cmbagent.agents.planner_response_formatter import planner_response_formatter
        from cmbagent.phases.control import ControlPhase
        from cmbagent.phases.planning import PlanningPhase
        from cmbagent.phases.registry import PhaseRegistry
        from cmbagent.workflows import planning_control

        from .test_cmbreal16_audit import _cancelled_after_step_1

        PhaseRegistry.register_class("planning", PlanningPhase)  # as MARS's cmbagent.phases package does
        PhaseRegistry.register_class("control", ControlPhase)
        save = planner_response_formatter.save_final_plan
        monkeypatch.setattr(planner_response_formatter, "save_final_plan",
                            lambda context, folder: save(context, Path(folder)))
        with pypi_cmbagent_for_mars():
            try:
                planning_control.planning_and_control_context_carryover(
                    task, work_dir=str(work_dir), api_keys=api_keys, max_rounds_control=30,
                    callbacks=_cancelled_after_step_1() if cancelled else None)
            except RuntimeError as exc:
                return {"error": str(exc)}
        return {"error": None}

    return run


@pytest.mark.parametrize("cancelled", [False, True], ids=["completed", "cancelled"])
def test_mars_planning_and_control_workflow_function_cancelled_after_step_1(
        request: pytest.FixtureRequest, mars_phases: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        cancelled: bool) -> None:
    """MARS's planning-control path as its backend runs it (no earlier audit ran MARS's ``PlanningPhase``): the
    planning phase, then control's 3 steps. Uncancelled: ``planning``, ``control`` and its steps completed, the run
    completed. The user cancelling after step 1: ``planning`` completed, ``control`` failed with the cancel, step 1
    completed, steps 2-3 pending, the run ``cancelled`` (``failed`` with the executor's ``RuntimeError`` on
    5d6278f)."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_mars_planning_and_control(cancelled, monkeypatch))
    assert run.error is None, run.error
    _one_root_per_trace(run)
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    nodes = _nodes_of(rows)
    if not cancelled:
        assert run.results["error"] is None
        assert row["status"] == "completed"
        assert [nodes[s]["status"] for s in ("planning", "control", "step_1", "step_2", "step_3", "terminator")] == [
            "completed"] * 6
        return
    assert run.results["error"] == "Phase control failed: Workflow cancelled by user"
    assert "researcher" not in run.sequence  # step 2 never started
    message = "WorkflowCancelledException: Workflow cancelled by user"
    assert (row["status"], row["meta"]["error"]) == ("cancelled", message)
    assert [nodes[s]["status"] for s in ("planning", "control", "step_1", "step_2", "step_3", "terminator")] == [
        "completed", "failed", "completed", "pending", "pending", "failed"]
    assert nodes["control"]["meta"]["error"] == "Workflow cancelled by user"
