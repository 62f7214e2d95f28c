"""What a user of MARS's ``WorkflowExecutor`` reads when its control phase fails, fifteenth audit (session 40).

MARS's own ``cmbagent.workflows.composer.WorkflowExecutor`` and ``ControlPhase`` (``CMBAGENT_OTEL_MARS_SRC``,
loaded next to the installed PyPI cmbagent as ``test_cmbreal14_audit`` loads them) run a preloaded 3-step plan
offline against the scripted backend; the phase fails after step 1 and the executor raises its own
``RuntimeError("Phase control failed: ...")``. Read back as spans and as the DAG rows cmbagent's backend reads.
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
from .scripted_cmbagent import DEFAULT_PLAN
from .test_cmbagent_runs import _exported, _one
from .test_cmbreal14_audit import assert_step_1_holds_its_work, mars_step_stopper
from .test_real_audit import _final_rows, _nodes_of, _one_root_per_trace, run_cmbagent  # noqa: F401 - fixture

pytestmark = pytest.mark.cmbagent_autogen


def _executor(joined: bool) -> Any:
    """An entry function for ``run_cmbagent``: MARS's executor running a one-phase workflow (``control`` on the
    preloaded plan), inside the application's own ``workflow(...)`` block when ``joined``, else bare as MARS's
    backend calls it (``task_executor.py``: ``executor.run_sync()``). Returns what it raised."""

    def run(task: str, work_dir: str, api_keys: dict[str, str], **_: Any) -> dict[str, Any]:
        from cmbagent.phases.control import ControlPhase
        from cmbagent.phases.registry import PhaseRegistry
        from cmbagent.workflows.composer import WorkflowDefinition, WorkflowExecutor

        PhaseRegistry.register_class("control", ControlPhase)  # as MARS's cmbagent.phases package does
        definition = WorkflowDefinition(id="preloaded_control", name="Preloaded control", description="",
                                        phases=[{"type": "control", "config": MARS_CONTROL_CONFIG}])
        executor = WorkflowExecutor(definition, task, str(work_dir), api_keys)
        with pypi_cmbagent_for_mars(), pytest.raises(RuntimeError) as raised:
            if joined:
                with cmbagent_otel.workflow("preloaded control", mode="planning-control", task=task):
                    executor.run_sync()
            else:
                executor.run_sync()
        return {"error": str(raised.value)}

    return run


@pytest.mark.parametrize("joined", [True, False], ids=["joined", "bare"])
@pytest.mark.parametrize("how", ["between_steps", "api_down_in_step_2"])
def test_mars_executor_around_a_failed_control_phase(request: pytest.FixtureRequest, mars_phases: Path,
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     how: str, joined: bool) -> None:
    """The executor's "Phase control failed: <error>" after the phase's ``manager.fail``: the phase failed with
    the phase's error, the step MARS names as failed (step 2 whose solve raised) failed, the steps not reached
    pending under the phase, step 1 completed with its agents; the run failed; nothing left running. Bare, as
    MARS's backend runs it, on ad3b5cf the phase manager's ``start()`` (attaching nothing) made a detached
    ``workflow control`` holding the phase and its steps but none of their work, and each step's solve a run of
    its own (``workflow solve`` with another ``phase control`` and ``step 1``): 2 traces (3 with step 2 run).
    The executor's ``run`` is now the run."""
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=mars_step_stopper(how, monkeypatch),
                                                  function=_executor(joined))
    assert run.error is None, run.error
    raised = run.results["error"]
    phase_error = raised.removeprefix("Phase control failed: ")
    assert phase_error != raised
    assert phase_error.startswith("[Errno 28] No space left" if how == "between_steps" else "Error code: 500")
    _one_root_per_trace(run)
    assert len({s.context.trace_id for s in run.spans}) == 1
    (root,) = [s for s in run.spans if s.parent is None]
    assert root.name == ("workflow preloaded control" if joined else "workflow preloaded_control")
    assert (root.status.status_code, root.status.description) == (StatusCode.ERROR, f"RuntimeError: {raised}")
    assert_step_1_holds_its_work(run)
    phase = _one(run, "phase control")
    assert (phase.status.status_code, phase.status.description) == (StatusCode.ERROR, phase_error)
    first = 2 if how == "between_steps" else 3
    later = [s for s in run.spans if s.attributes.get(sc.STEP_STATUS) == sc.STEP_NOT_STARTED]
    assert [(s.name, s.attributes[sc.STEP_AGENT], s.parent.span_id) for s in later] == [
        (f"step {n}", p.agent, phase.context.span_id) for n, p in enumerate(DEFAULT_PLAN[first - 1:], start=first)]
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    nodes = _nodes_of(rows)
    assert [nodes[s]["status"] for s in ("step_1", "step_2", "step_3", "control")] == [
        "completed", "pending" if how == "between_steps" else "failed", "pending", "failed"]
    assert nodes["control"]["meta"]["error"] == phase_error
    assert row["status"] == "failed", row
    if not joined:  # the run's agent and model from its first phase's config (session 41; before: "unknown")
        from cmbagent.utils import default_agents_llm_model

        assert (row["agent"], row["model"]) == ("engineer", default_agents_llm_model["engineer"])
    assert all(n["status"] != "running" for n in nodes.values())
