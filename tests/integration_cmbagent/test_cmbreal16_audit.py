"""What a user of the real cmbagent package sees, sixteenth audit (session 41).

Real cmbagent runs (PyPI cmbagent, Python 3.12) offline against the scripted backend, exported by the DAG
exporter into SQLite and read back as cmbagent's backend reads them (``test_real_audit._final_rows``); MARS's own
phases from ``CMBAGENT_OTEL_MARS_SRC`` next to the PyPI package, as ``test_cmbreal14_audit`` loads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")


import cmbagent_otel
from cmbagent_otel import semconv as sc

from .conftest import MARS_CONTROL_CONFIG, pypi_cmbagent_for_mars
from .scripted_cmbagent import DEFAULT_PLAN
from .test_cmbagent_runs import _exported, _one
from .test_cmbreal9_audit import served_run
from .test_cmbreal14_audit import assert_step_1_holds_its_work, mars_step_stopper
from .test_real_audit import _final_rows, _nodes_of, _one_root_per_trace, run_cmbagent  # noqa: F401 - fixture

pytestmark = pytest.mark.cmbagent_autogen


def _bare_control_phases(times: int, joined: bool = False, callbacks: Any = None) -> Any:
    """An entry function for ``run_cmbagent``: MARS's ``ControlPhase`` on the preloaded 3-step plan, awaited by
    hand outside any run and outside the executor (``await phase.execute(context)``, as MARS's
    ``PhaseOrchestrator.execute_phase`` and its deepresearch / newspulse routers do), ``times`` phases one after
    the other in one coroutine (the orchestrator's chain); ``joined``: inside the application's own ``workflow``
    block instead. Returns each phase's status and error."""

    def run(task: str, work_dir: str, api_keys: dict[str, str], **_: Any) -> dict[str, Any]:
        from cmbagent.phases.base import PhaseContext
        from cmbagent.phases.control import ControlPhase, ControlPhaseConfig

        async def chain() -> list[tuple[str, str | None]]:
            results = []
            for k in range(times):
                phase = ControlPhase(ControlPhaseConfig(**MARS_CONTROL_CONFIG))
                context = PhaseContext(workflow_id="orchestrator_1", run_id="r1", phase_id=f"control_{k}",
                                       task=task, work_dir=str(Path(work_dir) / f"phase_{k}"), api_keys=api_keys,
                                       callbacks=callbacks() if callbacks else None)
                result = await phase.execute(context)
                results.append((result.status.value, result.error))
            return results

        with pypi_cmbagent_for_mars(), (cmbagent_otel.workflow("mars control", mode="planning-control", task=task)
                                        if joined else contextlib.nullcontext()):
            return {"phases": asyncio.run(chain())}

    return run


@pytest.mark.parametrize("how", ["completed", "between_steps", "api_down_in_step_2"])
def test_a_mars_phase_awaited_by_hand_is_one_run(request: pytest.FixtureRequest, mars_phases: Path,
                                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str) -> None:
    """Session 40's Left. The phase manager's ``start()`` outside any run made a detached ``workflow control``
    (the phase, its steps, the pending ones) holding none of their work, and each step's ``CMBAgent.solve`` a
    ``workflow solve`` run of its own with another ``phase control`` and ``step n``: on 3c387d5, 4 traces for a
    completed 3-step plan (2 when the phase fails between steps 1 and 2, 3 when step 2's solve raises). The
    solves now join the open manager's run: one trace, each step's agents and code runs under its step."""
    responder = (lambda script: script) if how == "completed" else mars_step_stopper(how, monkeypatch)
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=responder, function=_bare_control_phases(1))
    assert run.error is None, run.error
    ((status, error),) = run.results["phases"]
    assert status == ("completed" if how == "completed" else "failed")
    _one_root_per_trace(run)
    assert len({s.context.trace_id for s in run.spans}) == 1
    (root,) = [s for s in run.spans if s.parent is None]
    assert root.name == "workflow control"
    assert not [s for s in run.spans if s.name == "workflow solve"]
    phase = _one(run, "phase control")
    assert phase.parent.span_id == root.context.span_id
    assert_step_1_holds_its_work(run)
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    nodes = _nodes_of(rows)
    by_id = {s.context.span_id: s for s in run.spans}
    # the run's agent and model as an entry call's (docs/cmbagent.md): the engineer and the phase's engineer_model
    # (ab5cd33: "unknown", "unknown")
    from cmbagent.utils import default_agents_llm_model

    assert (row["agent"], row["model"]) == ("engineer", default_agents_llm_model["engineer"])
    # each step's agent the plan's, as cmbagent's DAG names it (add_step_nodes): on 3c387d5 "unknown" for the
    # steps the phase started (only the pending ones had it)
    assert [nodes[f"step_{n}"]["agent"] for n in (1, 2, 3)] == [p.agent for p in DEFAULT_PLAN]
    if how == "completed":
        assert (root.status.status_code, phase.status.status_code) == (StatusCode.UNSET, StatusCode.UNSET)
        assert row["status"] == "completed"
        assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == ["completed"] * 4
        # every agent turn of the plan under the step its solve ran for
        for span in run.spans:
            if span.name.startswith("invoke_agent"):
                parent = span
                while parent.parent is not None and not parent.name.startswith("step "):
                    parent = by_id[parent.parent.span_id]
                assert parent.name.startswith("step "), span.name
        steps = {n: _one(run, f"step {n}") for n in (1, 2, 3)}
        assert {n: s.attributes[sc.STEP_AGENT] for n, s in steps.items()} == {
            n: p.agent for n, p in enumerate(DEFAULT_PLAN, start=1)}
        return
    assert error and (root.status.status_code, root.status.description) == (StatusCode.ERROR, error)
    assert (phase.status.status_code, phase.status.description) == (StatusCode.ERROR, error)
    assert row["status"] == "failed" and row["meta"]["error"] == error
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == [
        "completed", "pending" if how == "between_steps" else "failed", "pending", "failed"]
    assert all(n["status"] != "running" for n in nodes.values())


def test_mars_phases_awaited_one_after_the_other_are_a_run_each(request: pytest.FixtureRequest, mars_phases: Path,
                                                                tmp_path: Path) -> None:
    """Two phases awaited in one coroutine (MARS's orchestrator chaining phases by hand): each is its own run,
    whole; the second's solves do not join the first's run, ended when its manager completed."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_bare_control_phases(2))
    assert run.error is None, run.error
    assert [s for s, _ in run.results["phases"]] == ["completed", "completed"]
    _one_root_per_trace(run)
    roots = [s for s in run.spans if s.parent is None]
    assert [r.name for r in roots] == ["workflow control", "workflow control"]
    for root in roots:
        spans = [s for s in run.spans if s.context.trace_id == root.context.trace_id]
        assert [s.name for s in spans if s.name.startswith(("phase ", "step "))] == [
            "phase control", "step 1", "step 2", "step 3"]
        assert root.end_time >= max(s.end_time for s in spans)
    rows = _final_rows(_exported(run, tmp_path))
    assert [r["status"] for r in rows["runs"]] == ["completed", "completed"]


def test_a_mars_control_phase_names_each_steps_agent(request: pytest.FixtureRequest, mars_phases: Path,
                                                    tmp_path: Path) -> None:
    """MARS's ControlPhase inside the application's run: each step it starts (``manager.start_step(n,
    description)``, no agent) runs with the plan's ``sub_task_agent``, which cmbagent's DAG shows as the step
    node's agent. On 3c387d5 the started steps' nodes read agent "unknown" (the span had no
    ``cmbagent.step.agent``); now the plan's, as the pending steps of a stopped phase already had it."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_bare_control_phases(1, joined=True))
    assert run.error is None, run.error
    assert [_one(run, f"step {n}").attributes.get(sc.STEP_AGENT) for n in (1, 2, 3)] == [
        p.agent for p in DEFAULT_PLAN]
    nodes = _nodes_of(_final_rows(_exported(run, tmp_path)))
    assert [(nodes[f"step_{n}"]["agent"], nodes[f"step_{n}"]["meta"]["agent"]) for n in (1, 2, 3)] == [
        (p.agent, p.agent) for p in DEFAULT_PLAN]


def test_the_offline_example_runs_planning_and_control_and_prints_its_dag(tmp_path: Path) -> None:
    """``examples/cmbagent_offline/run.py`` (docs/cmbagent.md's one command): the real planning_and_control,
    offline, into the SQLite file given, then its DAG as ``cmbagent-otel dag latest`` prints it."""
    db = tmp_path / "run.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CMBAGENT_OTEL_"))}
    env["PYTHONPATH"] = str(Path(cmbagent_otel.__file__).parents[1])  # the cmbagent_otel under test
    done = subprocess.run([sys.executable, str(Path(__file__).parents[2] / "examples" / "cmbagent_offline" / "run.py"),
                           "--db", str(db), "--work-dir", str(tmp_path / "work")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    dag = done.stdout.split(" dag latest):\n", 1)[1].splitlines()
    assert dag[0].startswith("run ") and " planning-control completed " in dag[0]
    tops = [line.split(" (")[0] for line in dag[1:] if line[:4] in ("├── ", "└── ")]
    assert tops == ["├── planning", "├── control", "└── terminator"]
    assert [line.split()[2] for line in dag if line.startswith("│   ├── ") or line.startswith("│   └── ")] == [
        "step_1", "step_2", "step_3"]
    rows = _final_rows(f"sqlite:///{db}")
    assert [r["status"] for r in rows["runs"]] == ["completed"]


def _cancelled_after_step_1() -> Any:
    """MARS's ``WorkflowCallbacks`` as its backend gives a phase: ``should_continue`` reads the task's cancel flag,
    which the UI's request thread sets (``ExecutionService.set_cancelled``); here that thread runs when step 1
    completes (``on_step_complete``), so the phase's ``raise_if_cancelled()`` before step 2 stops it."""
    from cmbagent.callbacks import WorkflowCallbacks

    cancelled = threading.Event()

    def on_step_complete(info: Any) -> None:
        if info.step_number == 1:
            ui = threading.Thread(target=cancelled.set, name="cancel request")
            ui.start()
            ui.join()

    return WorkflowCallbacks(should_continue=lambda: not cancelled.is_set(), on_step_complete=on_step_complete)


def test_a_mars_phase_cancelled_from_another_thread_is_a_cancelled_run(request: pytest.FixtureRequest,
                                                                      mars_phases: Path, tmp_path: Path) -> None:
    """The user cancels a MARS phase from the UI (another thread sets the task's cancel flag); before step 2
    the phase's ``raise_if_cancelled()`` raises ``WorkflowCancelledException("Workflow cancelled by user")``,
    which its step loop hands to ``manager.fail``. cmbagent's own tracking records the run ``cancelled``
    (``WorkflowController.cancel_workflow``); ours read ``failed`` (a83322c). Now the spans the manager fails
    handling that exception carry its type (``error.type``), and the run is ``cancelled``: the phase failed with
    the message, step 1 completed, steps 2 and 3 pending."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_bare_control_phases(1, callbacks=_cancelled_after_step_1))
    assert run.error is None, run.error
    assert run.results["phases"] == [("failed", "Workflow cancelled by user")]
    assert "researcher" not in run.sequence  # step 2 never started
    _one_root_per_trace(run)
    (root,) = [s for s in run.spans if s.parent is None]
    phase = _one(run, "phase control")
    for span in (root, phase):
        assert (span.status.description, span.attributes[sc.ERROR_TYPE]) == (
            "Workflow cancelled by user", "WorkflowCancelledException"), span.name
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    assert (row["status"], row["meta"]["error"]) == ("cancelled", "Workflow cancelled by user")
    nodes = _nodes_of(rows)
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == [
        "completed", "pending", "pending", "failed"]


def test_cmbagent_backend_reads_a_cancelled_mars_phase_run_from_sqlite_and_postgresql(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path) -> None:
    """cmbagent's own backend (MARS's routers, unmodified, from ``CMBAGENT_OTEL_MARS_SRC``, run by
    ``CMBAGENT_OTEL_MARS_PYTHON``) on the rows of the phase awaited by hand and cancelled after step 1, written
    into SQLite and into PostgreSQL from the same spans: every endpoint answers, the same from both; its DAG is
    ours node for node (step 1 completed, steps 2-3 pending, the phase failed with the cancel message), each
    step's agent the plan's; the run's session is listed; the run history holds every event."""
    *_, row, lite = served_run(request, mars_phases, tmp_path,
                               _bare_control_phases(1, callbacks=_cancelled_after_step_1), "cancelled")
    dag = {n["id"]: n for n in lite[f"{row['id']} dag"]["nodes"]}
    assert [(dag[f"step_{n}"]["status"], dag[f"step_{n}"]["agent"]) for n in (1, 2, 3)] == [
        ("completed", DEFAULT_PLAN[0].agent), ("pending", DEFAULT_PLAN[1].agent), ("pending", DEFAULT_PLAN[2].agent)]


def _bare_control_phases_in_threads(task: str, work_dir: str, api_keys: dict[str, str], **_: Any) -> dict[str, Any]:
    """Two MARS control phases awaited by hand at once, each in a thread of its own (``asyncio.run`` there, as
    two backend workers would), both started before either solves (a barrier after ``start()``)."""
    from cmbagent.phases.execution_manager import PhaseExecutionManager

    started = threading.Barrier(2, timeout=120)
    original = PhaseExecutionManager.start_step

    def start_step(self: Any, step_number: int, description: str = "") -> None:
        if step_number == 1:
            started.wait()  # both phases' runs are open before either one's first solve
        original(self, step_number, description)

    results: dict[int, Any] = {}

    def worker(k: int) -> None:
        results[k] = _bare_control_phases(1)(task, str(Path(work_dir) / f"worker_{k}"), api_keys)["phases"]

    PhaseExecutionManager.start_step = start_step  # type: ignore[method-assign]
    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        PhaseExecutionManager.start_step = original  # type: ignore[method-assign]
    return {"phases": [results[1], results[2]]}


def test_two_mars_phases_awaited_by_hand_at_once_in_two_threads_are_two_runs(
        request: pytest.FixtureRequest, mars_phases: Path, tmp_path: Path) -> None:
    """Held up: each thread's phase manager names its run in that thread's context only; each phase's solves
    join its own run (two traces, each root with its phase, its 3 steps and its agents), no span of one run in
    the other's trace, two completed runs in the DB."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script,
                                                  function=_bare_control_phases_in_threads)
    assert run.error is None, run.error
    assert [[s for s, _ in p] for p in run.results["phases"]] == [["completed"], ["completed"]]
    _one_root_per_trace(run)
    roots = [s for s in run.spans if s.parent is None]
    assert [r.name for r in roots] == ["workflow control", "workflow control"]
    turns = []
    for root in roots:
        spans = [s for s in run.spans if s.context.trace_id == root.context.trace_id]
        assert sorted(s.name for s in spans if s.name.startswith(("phase ", "step "))) == [
            "phase control", "step 1", "step 2", "step 3"]
        # each phase's solves in its own run: a solve joining the other thread's run would be in that trace
        turns.append((len([s for s in spans if s.name.startswith("invoke_agent")]),
                      len([s for s in spans if s.name.startswith("execute_code")])))
    assert turns[0] == turns[1] and turns[0][0] > 0 and turns[0][1] > 0, turns
    rows = _final_rows(_exported(run, tmp_path))
    assert [r["status"] for r in rows["runs"]] == ["completed", "completed"]
