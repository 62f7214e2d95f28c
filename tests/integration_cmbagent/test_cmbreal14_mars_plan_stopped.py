"""MARS control phases stopped between two plan steps leave the later steps pending (fourteenth real
cmbagent audit, session 40; runs without cmbagent installed).

MARS's ``ControlPhase.execute`` (1f77da3) drives its ``PhaseExecutionManager`` as ``start()``, then per plan step
``start_step(n)``, a carryover solve, ``complete_step(n)``, the step's reports (context pickle, chat history,
``display_cost``), and catches whatever raises in that loop with ``manager.fail(str(e), traceback)``; a step
out of attempts is ``fail_step(n)`` then ``fail()``; ``HITLControlPhase`` fails the phase when a human rejects
or aborts a step. The plan's later steps never start; cmbagent's DAG has a pending node for each (its tracker
adds the step nodes when planning is done), ours had none. The manager here is ``test_phase_manager``'s
(MARS's method names and call order); the patching is the real one.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from cmbagent_otel import semconv
from cmbagent_otel.workflow import workflow

from .test_phase_manager import PhaseExecutionManager, patched  # noqa: F401 - patched: the fixture

PLAN = [{"sub_task": "Generate the mock power spectrum", "sub_task_agent": "engineer"},
        {"sub_task": "Interpret the spectrum", "sub_task_agent": "researcher"},
        {"sub_task": "Fit the acoustic peak", "sub_task_agent": "engineer"}]


class _ControlPhase:
    phase_type = "control"

    class config:  # MARS's ControlPhaseConfig: ``params`` may hold a preloaded plan
        params: dict[str, Any] = {}


class _Context:
    """MARS's PhaseContext as ControlPhase reads it: the plan in ``input_data`` (or ``shared_state``)."""

    task = "fit the spectrum"
    work_dir = "/tmp/run"

    def __init__(self, where: str) -> None:
        self.input_data: dict[str, Any] = {"final_plan": PLAN} if where == "input_data" else {}
        self.shared_state: dict[str, Any] = {"mode": "planning-control"}
        if where == "shared_state":
            self.shared_state["plan_steps"] = {"sub_tasks": PLAN}


def _control_phase(manager: PhaseExecutionManager, how: str) -> Any:
    """ControlPhase.execute's calls (1f77da3), stopped after step 1 as ``how`` says."""
    manager.start()
    try:
        manager.start_step(1, PLAN[0]["sub_task"])
        if how == "out_of_attempts":
            manager.fail_step(1, "Max attempts (3) exceeded")
            return manager.fail("Step 1 failed after 3 attempts")
        manager.complete_step(1, "### Step 1\nspectrum generated")
        raise OSError(28, "No space left on device")  # cmbagent.display_cost(name_append="step_1")
    except Exception as e:
        return manager.fail(str(e), "Traceback ...")


def _pending(capture: Any) -> list[tuple[str, Any, Any, Any]]:
    return [(s.name, s.attributes.get(semconv.STEP_GOAL), s.attributes.get(semconv.STEP_AGENT),
             s.parent.span_id if s.parent else None)
            for s in capture.spans if s.attributes.get(semconv.STEP_STATUS) == semconv.STEP_NOT_STARTED]


@pytest.mark.parametrize(("how", "where"), [("between_steps", "input_data"), ("between_steps", "shared_state"),
                                            ("out_of_attempts", "input_data")])
def test_a_mars_control_phase_stopped_after_step_1_leaves_steps_2_and_3_pending(
        capture: Any, patched: None, how: str, where: str) -> None:  # noqa: F811
    """Step 1 ends (completed, then the loop raises writing its reports; or failed out of attempts) and the
    phase fails: steps 2 and 3 are pending nodes (goal and agent from the plan) under the failed phase; on
    main 86547de there were none."""
    manager = PhaseExecutionManager(_Context(where), _ControlPhase())
    with workflow("planning_and_control", mode="planning-control"):
        assert _control_phase(manager, how) == "failed"
    phase = capture.one("phase control")
    assert phase.status.status_code is StatusCode.ERROR
    assert capture.one("step 1").status.status_code is (
        StatusCode.ERROR if how == "out_of_attempts" else StatusCode.UNSET)
    assert _pending(capture) == [("step 2", "Interpret the spectrum", "researcher", phase.context.span_id),
                                 ("step 3", "Fit the acoustic peak", "engineer", phase.context.span_id)]


def test_a_mars_phase_left_by_an_exception_between_steps_leaves_the_later_steps_pending(
        capture: Any, patched: None) -> None:  # noqa: F811
    """The same through the manager's ``__exit__`` (an exception leaving a ``with manager:`` block after step
    1): steps 2 and 3 pending once, the exception reaching the caller unchanged."""
    manager = PhaseExecutionManager(_Context("input_data"), _ControlPhase())
    with pytest.raises(KeyboardInterrupt), workflow("planning_and_control", mode="planning-control"), manager:
        manager.start_step(1, PLAN[0]["sub_task"])
        manager.complete_step(1, "done")
        raise KeyboardInterrupt
    assert manager.calls[-1] == "fail"
    phase = capture.one("phase control")
    assert [name for name, *_ in _pending(capture)] == ["step 2", "step 3"]
    assert phase.status.status_code is StatusCode.ERROR


def test_a_failed_phase_that_runs_no_plan_gets_no_steps(capture: Any, patched: None) -> None:  # noqa: F811
    """A phase that is not a plan's execution (a planning phase failing with a plan in its shared state from an
    earlier round) gets no step nodes; a control phase without a plan none either."""

    class _Planning(_ControlPhase):
        phase_type = "hitl_planning"

    with workflow("hitl_interactive_workflow", mode="hitl-interactive"):
        planning = PhaseExecutionManager(_Context("shared_state"), _Planning())
        planning.start()
        planning.fail("Plan rejected by human")
        control = PhaseExecutionManager(_Context("none"), _ControlPhase())
        control.start()
        control.fail("No plan found in context. Run planning phase first.")
    assert [s.name for s in capture.spans if s.name.startswith("phase ")] == ["phase hitl_planning", "phase control"]
    assert [s.name for s in capture.spans if s.name.startswith("step ")] == []


@pytest.mark.parametrize("how", ["solve_raised", "aborted_by_human"])
def test_a_mars_phase_failed_during_a_step_fails_that_step(capture: Any, patched: None, how: str) -> None:  # noqa: F811
    """The phase fails while step 2 is open: ControlPhase's solve raising in step 2 (the model API down) caught
    by ``manager.fail(str(e), ...)``, or HITLControlPhase's "Aborted by human at step 2" after a failed attempt
    (MARS hands ``fail`` the open step as the failed one, ``invoke_workflow_failed(error, current_step)``).
    Step 2 ended completed (green) under the failed phase on main 86547de; it now fails with the phase's
    error, step 1 stays completed and step 3 is pending."""
    manager = PhaseExecutionManager(_Context("input_data"), _ControlPhase())
    error = "Connection error." if how == "solve_raised" else "Aborted by human at step 2"
    with workflow("planning_and_control", mode="planning-control"):
        manager.start()
        manager.start_step(1, PLAN[0]["sub_task"])
        manager.complete_step(1, "done")
        manager.start_step(2, PLAN[1]["sub_task"])
        assert manager.fail(error, None) == "failed"
    assert capture.one("step 1").status.status_code is StatusCode.UNSET
    step2 = capture.one("step 2")
    assert (step2.status.status_code, step2.status.description) == (StatusCode.ERROR, error)
    assert capture.one("phase control").status.description == error
    assert [name for name, *_ in _pending(capture)] == ["step 3"]
