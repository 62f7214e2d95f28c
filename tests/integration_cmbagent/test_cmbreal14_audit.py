"""What a user of the real cmbagent package sees, fourteenth audit (session 40).

Real cmbagent runs, offline against the scripted backend, exported by the DAG exporter into SQLite and read
back as cmbagent's backend reads them (``test_real_audit._final_rows``).
"""

from __future__ import annotations

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
from .scripted_cmbagent import DEFAULT_PLAN, CmbagentScript, PlanStep
from .test_cmbagent_runs import _exported, _kind, _one
from .test_cmbreal12_audit import GiveUpOnStep1
from .test_real_audit import (  # noqa: F401 - run_cmbagent: the fixture (getfixturevalue)
    ApiDown,
    _final_rows,
    _nodes_of,
    _one_root_per_trace,
    run_cmbagent,
)

pytestmark = pytest.mark.cmbagent_autogen

ENGINEER_TWICE = (PlanStep("Generate the mock power spectrum", "engineer"),
                  PlanStep("Fit the acoustic peak", "engineer"),
                  PlanStep("Interpret the fit", "researcher"))


class GiveUpOnStep1ThenEngineer(GiveUpOnStep1):
    """cmbreal12's GiveUpOnStep1 (step 1's two programs fail, the second failure handed to control, which
    announces step 2 without reporting step 1: cmbagent keeps ``n_attempts`` 2) on a plan engineer /
    engineer / researcher."""

    def __init__(self, script: CmbagentScript) -> None:
        super().__init__(script)
        script.plan = ENGINEER_TWICE


def test_a_step_stopped_by_the_attempts_carried_over_from_the_step_before_says_so(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Control moves past step 1 out of attempts (the session 39 case) to step 2, an engineer's: cmbagent
    resets ``n_attempts`` only when a step is reported completed or failed, so step 2 starts at 2, and its
    first ``post_execution_transfer`` (after a program that ran fine) goes to the terminator: the plan stops
    there. cmbagent's rule, kept (step 2, control and the run failed). The record said "step 2 ran out of
    attempts (n_attempts 2 >= max_n_attempts 2)", over a step with no failed attempt and a successful
    program; it now says the count is step 1's."""
    run = request.getfixturevalue("run_cmbagent")("planning_and_control", responder=GiveUpOnStep1ThenEngineer,
                                                  max_n_attempts=2)
    assert run.error is None
    assert run.results["final_context"]["current_plan_step_number"] == 2
    assert run.sequence.count("engineer") == 3 and run.sequence[-1] == "terminator"
    _one_root_per_trace(run)
    codes = [s.status.status_code for s in run.spans if s.name.startswith("execute_code")]
    assert codes == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]  # step 2's program ran fine
    step2 = _one(run, "step 2")
    why = ("step 2 reached cmbagent's attempt limit with the attempts of step 1 carried over "
           "(n_attempts 2 >= max_n_attempts 2; 0 failed in step 2)")
    assert (step2.status.status_code, step2.status.description) == (StatusCode.ERROR, why)
    assert step2.attributes[sc.STEP_ATTEMPTS] == 0
    assert [s.name for s in run.spans if _kind(s) == sc.KIND_ATTEMPT] == [
        "step 1 attempt 1 failed", "step 1 attempt 2 failed"]
    for name in ("workflow planning_and_control", "phase control"):
        assert _one(run, name).status.description == f"plan stopped: {why}", name
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    nodes = _nodes_of(rows)
    assert (row["status"], row["meta"]["error"]) == ("failed", f"plan stopped: {why}")
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == [
        "completed", "failed", "pending", "failed"]
    assert nodes["step_2"]["meta"]["error"] == why


def _mars_control_phase(task: str, work_dir: str, api_keys: dict[str, str], **_: Any) -> dict[str, Any]:
    """MARS's ControlPhase run on a preloaded 3-step plan inside the application's run, as its
    ``WorkflowExecutor`` runs it."""
    import asyncio

    from cmbagent.phases.base import PhaseContext
    from cmbagent.phases.control import ControlPhase, ControlPhaseConfig

    phase = ControlPhase(ControlPhaseConfig(**MARS_CONTROL_CONFIG))
    context = PhaseContext(workflow_id="w", run_id="r", phase_id="control", task=task, work_dir=work_dir,
                           api_keys=api_keys)
    with pypi_cmbagent_for_mars(), cmbagent_otel.workflow("planning_and_control", mode="planning-control",
                                                          task=task, work_dir=work_dir):
        result = asyncio.run(phase.execute(context))
    return {"status": result.status.value, "error": result.error}


def assert_step_1_holds_its_work(run: Any) -> None:
    """Step 1's agents, tool calls and code runs (all that started before it ended) are under it."""
    by_id = {s.context.span_id: s for s in run.spans}
    step1 = _one(run, "step 1")
    for span in run.spans:
        if span.name.startswith(("invoke_agent", "execute_code")) and span.start_time < step1.end_time:
            parent = span
            while parent.parent is not None and parent is not step1:
                parent = by_id[parent.parent.span_id]
            assert parent is step1, span.name


def mars_step_stopper(how: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """What stops a MARS control phase after step 1 (``how``): ``between_steps``, step 1's cost report cannot
    be written (a full disk); ``api_down_in_step_2``, step 2's researcher gets HTTP 500s. The responder to run
    the scripted backend with."""
    import cmbagent.cmbagent as module

    if how == "api_down_in_step_2":
        return lambda script: ApiDown(script, "researcher", 1)
    original = module.CMBAgent.display_cost

    def display_cost(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("name_append") == "step_1":
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(module.CMBAgent, "display_cost", display_cost)
    return lambda script: script


@pytest.mark.parametrize("how", ["between_steps", "api_down_in_step_2"])
def test_mars_control_phase_stopped_after_step_1_leaves_the_later_steps_pending(
        request: pytest.FixtureRequest, mars_phases: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        how: str) -> None:
    """MARS's own ControlPhase and PhaseExecutionManager (from ``CMBAGENT_OTEL_MARS_SRC``) on the real PyPI
    ``CMBAgent``: step 1 runs and completes (``complete_step``), then (``between_steps``) writing its cost report
    fails (a full disk; Ctrl-C or pause/cancel there take the same path), or (``api_down_in_step_2``) step 2's
    researcher gets HTTP 500s and its solve raises. The phase catches the exception and calls
    ``manager.fail(str(e), ...)``. On main 86547de the later steps had no node, and step 2, whose solve raised,
    ended completed under the failed phase: now step 2 fails with the error (the step MARS names as the failed
    one) and the steps not reached are pending, as in cmbagent's DAG."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=mars_step_stopper(how, monkeypatch),
                                                  function=_mars_control_phase)
    assert run.results["status"] == "failed"
    error = run.results["error"]
    if how == "between_steps":
        assert error == "[Errno 28] No space left on device"
        assert "researcher" not in run.sequence  # step 2 never started
    else:
        assert error.startswith("Error code: 500") and "engineer" not in run.sequence[-3:]
    _one_root_per_trace(run)
    phase = _one(run, "phase control")
    assert (phase.status.status_code, phase.status.description) == (StatusCode.ERROR, error)
    assert_step_1_holds_its_work(run)
    later = [s for s in run.spans if s.attributes.get(sc.STEP_STATUS) == sc.STEP_NOT_STARTED]
    first = 2 if how == "between_steps" else 3
    assert [(s.name, s.attributes[sc.STEP_GOAL], s.attributes[sc.STEP_AGENT], s.parent.span_id) for s in later] == [
        (f"step {n}", p.task, p.agent, phase.context.span_id)
        for n, p in enumerate(DEFAULT_PLAN[first - 1:], start=first)]
    rows = _final_rows(_exported(run, tmp_path))
    nodes = _nodes_of(rows)
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == [
        "completed", "pending" if how == "between_steps" else "failed", "pending", "failed"]
    if how != "between_steps":
        assert nodes["step_2"]["meta"]["error"] == error
