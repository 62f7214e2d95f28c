"""Session 39, carried-over limits: a joined MARS workflow whose phase failed (runs without cmbagent installed).

MARS's workflows (``idea_to_execution``, ``hitl_interactive_workflow``...) run their phases through its
``WorkflowExecutor``: each phase catches its own exception, calls its ``PhaseExecutionManager``'s ``fail``
and returns a failed result; the executor then raises an error of its own, ``RuntimeError("Phase planning
failed: ...")``, raised from nothing, between that phase and the next. Called inside the application's own
``with workflow(...)`` (a joined call) and caught there, that error was taken for a failure outside the call's
phases and given one more failed phase after the one that had failed (``planning`` then a failed ``control``;
``idea_generation`` then a failed ``idea_generation_2``): two failures for one. The MARS fork is not on PyPI
and its package does not import in this project's environments, so the executor and the phases here repeat
MARS's own control flow (cmbagent/workflows/composer.py ``WorkflowExecutor.run``, cmbagent/phases/*.py
``execute``); the manager's method names are MARS's, and the patching under test is the real one.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from cmbagent_otel.integrations import cmbagent as integration
from cmbagent_otel.workflow import workflow

from .test_phase_manager import PhaseExecutionManager, _Context

PHASES = ("idea_generation", "planning", "control")


class _Phase:
    def __init__(self, phase_type: str, fails: bool) -> None:
        self.phase_type = phase_type
        self.fails = fails

    def execute(self) -> tuple[bool, str | None]:
        """MARS's phase: its manager started, failed from the except clause, a failed result returned."""
        manager = PhaseExecutionManager(_Context(), self)
        manager.start()
        try:
            if self.fails:
                raise ValueError(f"{self.phase_type}: the model's answer has no plan")
            manager.complete({"ok": True})
            return True, None
        except Exception as e:
            manager.fail(str(e))
            return False, str(e)


class WorkflowExecutor:
    """MARS's cmbagent.workflows.composer.WorkflowExecutor: ``self.phases`` built in ``__init__``; ``run_sync``
    checks each phase's input before running it and raises its own error for a phase that failed."""

    def __init__(self, workflow: Any, task: str, work_dir: str, api_keys: Any = None) -> None:
        self.workflow = workflow
        self.phases = [_Phase(d["type"], d.get("fails", False)) for d in workflow["phases"]]

    def run_sync(self) -> None:
        for phase, definition in zip(self.phases, self.workflow["phases"], strict=True):
            refused = definition.get("refused")
            if refused:
                raise ValueError(f"Phase {phase.phase_type} validation failed: {refused}")
            succeeded, error = phase.execute()
            if not succeeded:
                raise RuntimeError(f"Phase {phase.phase_type} failed: {error}")


def idea_to_execution(task: str, work_dir: str, failing: str = "", refused: str = "") -> None:
    """MARS's idea_to_execution: its phases defined, run by its executor."""
    phases = [{"type": name, "fails": name == failing, "refused": "no idea selected" if name == refused else None}
              for name in PHASES]
    WorkflowExecutor({"phases": phases}, task, work_dir).run_sync()


@pytest.fixture
def mars_entry() -> Iterator[types.ModuleType]:
    """MARS's workflows module, its entry point patched by the integration as it patches MARS's."""
    integration.instrument_phase_manager(PhaseExecutionManager)
    module = types.ModuleType("cmbagent.workflows.idea_workflows")
    module.idea_to_execution = idea_to_execution  # type: ignore[attr-defined]
    module.idea_generation = idea_generation  # type: ignore[attr-defined]
    composer = types.ModuleType("cmbagent.workflows.composer")
    composer.WorkflowExecutor = WorkflowExecutor  # type: ignore[attr-defined]
    integration.CmbagentInstrumentor()._patch_module(module)
    integration.CmbagentInstrumentor()._patch_module(composer)
    try:
        assert all(integration._is_ours(vars(module)[name]) for name in ("idea_to_execution", "idea_generation"))
        yield module
    finally:
        integration.uninstrument_cmbagent()


@pytest.mark.parametrize("failing", ["idea_generation", "planning"])
def test_a_joined_mars_workflow_whose_phase_failed_has_that_one_failure(capture: Any, mars_entry: Any,
                                                                       failing: str) -> None:
    """The phase that failed is the call's one red phase span, with its error; no phase follows it. On d1ab575
    a second red phase followed (``['idea_generation', 'idea_generation']``, ``['planning', 'control']``)."""
    failed = f"Phase {failing} failed"
    with workflow("notebook cell", mode="planning-control"), pytest.raises(RuntimeError, match=failed):
        mars_entry.idea_to_execution("fit the spectrum", "/tmp/run", failing=failing)
    phases = [s for s in capture.spans if s.name.startswith("phase ")]
    ran = list(PHASES[:PHASES.index(failing) + 1])
    assert [s.name.removeprefix("phase ") for s in phases] == ran
    red = [s.name.removeprefix("phase ") for s in phases if s.status.status_code is StatusCode.ERROR]
    assert red == [failing]
    assert "the model's answer has no plan" in (phases[-1].status.description or "")
    assert capture.one("workflow notebook cell").status.status_code is not StatusCode.ERROR


@pytest.mark.parametrize("refused", ["planning", "control"])
def test_a_joined_mars_workflow_raising_before_its_next_phase_fails_that_phase(capture: Any, mars_entry: Any,
                                                                              refused: str) -> None:
    """The executor refused the next phase's input after the phases before it completed: that phase is the
    failed one (read from the executor's phases). On d1ab575 one more of the last phase run failed instead
    (``idea_generation``'s second node; after planning, its NEXT_PHASES guess happened to be right)."""
    with workflow("notebook cell", mode="planning-control"), pytest.raises(ValueError, match="validation failed"):
        mars_entry.idea_to_execution("fit the spectrum", "/tmp/run", refused=refused)
    phases = [s for s in capture.spans if s.name.startswith("phase ")]
    ran = list(PHASES[:PHASES.index(refused)])
    assert [(s.name.removeprefix("phase "), s.status.status_code is StatusCode.ERROR) for s in phases] == [
        *((name, False) for name in ran), (refused, True)]
    assert "no idea selected" in (phases[-1].status.description or "")


def idea_generation(task: str, work_dir: str) -> None:
    """A workflow run without MARS's executor that raises after a phase that completed."""
    _Phase(PHASES[0], False).execute()
    raise OSError("the approval file cannot be read")


def test_a_joined_mars_workflow_raising_after_a_completed_phase_still_gets_its_failed_node(
        capture: Any, mars_entry: Any) -> None:
    """What held before: a call that raises after a phase that completed gets a failed phase for it (without an
    executor telling its phases, one more of the last one's kind: see docs/cmbagent.md)."""
    with workflow("notebook cell", mode="planning-control"), pytest.raises(OSError):
        mars_entry.idea_generation("fit the spectrum", "/tmp/run")
    phases = [s for s in capture.spans if s.name.startswith("phase ")]
    assert [(s.name, s.status.status_code is StatusCode.ERROR) for s in phases] == [
        ("phase idea_generation", False), ("phase idea_generation", True)]
    assert "the approval file cannot be read" in (phases[1].status.description or "")
