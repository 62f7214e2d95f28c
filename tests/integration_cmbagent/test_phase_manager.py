"""MARS PhaseExecutionManager lifecycle -> phase/step/redo spans (runs without cmbagent installed).

The MARS fork is not on PyPI, so the class here reproduces the method names and call
order of its ``hitl_control`` phase (start, start_step, create_redo_branch,
complete_step/fail_step, complete/fail, __exit__); the patching under test is the real one.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

import pytest
from autogen import ConversableAgent
from opentelemetry import context as otel_context
from opentelemetry.trace import StatusCode

import cmbagent_otel
from cmbagent_otel import semconv
from cmbagent_otel.integrations import cmbagent as integration
from cmbagent_otel.integrations.cmbagent import CmbagentInstrumentor
from cmbagent_otel.testing import offline_agent
from cmbagent_otel.workflow import workflow


class _Phase:
    phase_type = "hitl_control"

    class config:  # mirrors MARS's phase.config attribute
        max_redos = 2


class _Context:
    task = "fit the spectrum"
    work_dir = "/tmp/run"
    shared_state: dict[str, Any] = {"mode": "hitl-interactive"}


class PhaseExecutionManager:
    """Same method names and signatures as MARS's cmbagent.phases.execution_manager."""

    def __init__(self, context: Any, phase: Any) -> None:
        self.context = context
        self.phase = phase
        self.calls: list[str] = []

    def __enter__(self) -> PhaseExecutionManager:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool:
        if exc_type is not None:
            self.fail(str(exc_val), None)
        return False

    def start(self) -> None:
        self.calls.append("start")

    def start_step(self, step_number: int, description: str = "") -> None:
        self.calls.append(f"start_step {step_number}")

    def create_redo_branch(self, step_number: int, redo_number: int, hypothesis: str | None = None) -> None:
        self.calls.append(f"redo {step_number}.{redo_number}")

    def complete_step(self, step_number: int, summary: str | None = None, result: Any = None) -> None:
        self.calls.append(f"complete_step {step_number}")

    def fail_step(self, step_number: int, error: str) -> None:
        self.calls.append(f"fail_step {step_number}")

    def complete(self, output_data: Any = None, chat_history: Any = None) -> str:
        self.calls.append("complete")
        return "result"

    def fail(self, error: str, traceback_str: str | None = None) -> str:
        self.calls.append("fail")
        return "failed"


ORIGINALS = {name: PhaseExecutionManager.__dict__[name] for name in (
    "__enter__", "start", "start_step", "create_redo_branch", "complete_step", "fail_step", "complete", "fail",
    "__exit__",
)}


@pytest.fixture
def patched() -> Iterator[None]:
    integration.instrument_phase_manager(PhaseExecutionManager)
    try:
        yield
    finally:
        integration.uninstrument_cmbagent()


def _run_hitl_control(manager: PhaseExecutionManager) -> Any:
    manager.start()
    manager.start_step(1, "load the data")
    manager.create_redo_branch(step_number=1, redo_number=1, hypothesis="use the other file")
    manager.complete_step(1, "### Step 1\nloaded")
    manager.start_step(2, "fit")
    manager.fail_step(2, "fit diverged")
    return manager.complete({"ok": True})


def test_lifecycle_maps_to_span_tree(capture: Any, patched: None) -> None:
    manager = PhaseExecutionManager(_Context(), _Phase())
    with workflow("deep_research", mode="hitl-interactive"):
        assert _run_hitl_control(manager) == "result"
    assert manager.calls == ["start", "start_step 1", "redo 1.1", "complete_step 1", "start_step 2",
                             "fail_step 2", "complete"]
    assert capture.tree() == [
        "workflow deep_research",
        "  phase hitl_control",
        "    step 1",
        "      redo step 1 attempt 1",
        "    step 2",
    ]
    step1 = capture.one("step 1")
    assert step1.attributes[semconv.STEP_GOAL] == "load the data"
    assert step1.attributes[semconv.STEP_SUMMARY] == "### Step 1\nloaded"
    assert capture.one("redo step 1 attempt 1").attributes[semconv.BRANCH_HYPOTHESIS] == "use the other file"
    step2 = capture.one("step 2")
    assert step2.status.status_code is StatusCode.ERROR
    assert step2.status.description == "fit diverged"
    assert capture.one("phase hitl_control").status.status_code is StatusCode.UNSET


def test_manager_outside_workflow_opens_one(capture: Any, patched: None) -> None:
    manager = PhaseExecutionManager(_Context(), _Phase())
    with manager:
        manager.start_step(1, "only step")
        manager.complete_step(1, "done")
    assert capture.tree() == ["workflow hitl_control", "  phase hitl_control", "    step 1"]
    root = capture.one("workflow hitl_control")
    assert root.attributes[semconv.WORKFLOW_MODE] == "hitl-interactive"
    assert root.attributes[semconv.WORKFLOW_TASK] == "fit the spectrum"
    assert root.attributes[semconv.WORKFLOW_WORK_DIR] == "/tmp/run"


def test_exception_in_phase_fails_phase_and_reaches_caller(capture: Any, patched: None) -> None:
    manager = PhaseExecutionManager(_Context(), _Phase())
    with pytest.raises(RuntimeError, match="boom"), workflow("w", mode="planning-control"), manager:
        manager.start_step(1, "x")
        raise RuntimeError("boom")
    assert manager.calls[-1] == "fail"
    phase_span = capture.one("phase hitl_control")
    assert phase_span.status.status_code is StatusCode.ERROR
    assert capture.one("step 1").end_time is not None
    assert capture.one("workflow w").status.status_code is StatusCode.ERROR


def test_redo_above_max_redos_is_skipped_not_raised(capture: Any, patched: None) -> None:
    manager = PhaseExecutionManager(_Context(), _Phase())
    with workflow("w", mode="hitl-interactive", max_redos=1):
        manager.start()
        manager.start_step(1, "x")
        manager.create_redo_branch(1, 1)
        manager.create_redo_branch(1, 2)  # above max_redos: no span, no error
        manager.complete_step(1)
        manager.complete()
    assert [s.name for s in capture.named("redo")] == ["redo step 1 attempt 1"]


def test_uninstrument_restores_methods_by_identity(capture: Any) -> None:
    integration.instrument_phase_manager(PhaseExecutionManager)
    assert PhaseExecutionManager.__dict__["start"] is not ORIGINALS["start"]
    integration.uninstrument_cmbagent()
    for name, original in ORIGINALS.items():
        assert PhaseExecutionManager.__dict__[name] is original, name
    manager = PhaseExecutionManager(_Context(), _Phase())
    with workflow("w"):
        _run_hitl_control(manager)
    assert capture.tree() == ["workflow w"]


def test_manager_attaches_nothing_and_parents_the_work_by_explicit_context(instrumented: Any, patched: None) -> None:
    alice = offline_agent("alice", ["pong", "pong again"])
    bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
    manager = PhaseExecutionManager(_Context(), _Phase())
    with workflow("deep_research", mode="hitl-interactive"):
        before = otel_context.get_current()
        manager.start()
        manager.start_step(1, "ask")
        assert otel_context.get_current() is before  # phase and step spans are not attached
        bob.initiate_chat(alice, message="ping", max_turns=1, silent=True)
        manager.complete_step(1, "asked")
        manager.start_step(2, "ask again")
        bob.initiate_chat(alice, message="ping", max_turns=1, silent=True)
        manager.complete_step(2)
        manager.complete()
        assert otel_context.get_current() is before
    tree = instrumented.tree()
    assert tree[:5] == ["workflow deep_research", "  phase hitl_control", "    step 1", "      conversation alice",
                        "        invoke_agent alice"]
    assert "    step 2" in tree and tree.index("    step 2") > tree.index("      conversation alice")
    turns = instrumented.named("invoke_agent alice")
    assert [t.attributes[semconv.DAG_NODE] for t in turns] == ["step_1_alice", "step_2_alice"]
    assert [t.attributes[semconv.DAG_ORDER_INDEX] for t in turns] == [1001, 2001]
    assert instrumented.one("phase hitl_control").attributes[semconv.DAG_ORDER_INDEX] == 1001


def test_complete_called_in_another_context_leaves_the_callers_context_alone(capture: Any, patched: None) -> None:
    manager = PhaseExecutionManager(_Context(), _Phase())
    with workflow("w", mode="hitl-interactive"):
        outer = otel_context.get_current()
        with workflow("nested joins"), cmbagent_otel.phase("other"):
            inner = otel_context.get_current()
            manager.start()  # opened inside a phase: joins it, opens nothing
            manager.start_step(1, "x")
            assert otel_context.get_current() is inner
        manager.complete_step(1)
        manager.complete()  # called outside the block start() ran in
        assert otel_context.get_current() is outer
    assert capture.tree() == ["workflow w", "  phase other", "    step 1"]


def test_instrumentor_is_registered_idempotent_and_keeps_no_state(capture: Any) -> None:
    registered = {e.name: e.value for e in entry_points(group="opentelemetry_instrumentor")}
    assert registered["cmbagent"] == "cmbagent_otel.integrations.cmbagent:CmbagentInstrumentor"
    instrumentor = CmbagentInstrumentor()
    instrumentor.instrument_phase_manager(PhaseExecutionManager)
    instrumentor.instrument_phase_manager(PhaseExecutionManager)  # idempotent: wrapped once
    wrapped = instrumentor.patched
    assert sorted(name for owner, name in wrapped if owner is PhaseExecutionManager) == sorted(ORIGINALS)
    assert not hasattr(PhaseExecutionManager.__dict__["start"].__wrapped__, "__wrapped__")
    manager = PhaseExecutionManager(_Context(), _Phase())
    with workflow("w"):
        manager.start()
        instrumentor.uninstrument()  # mid-phase: the wrappers go, and so does their state
        manager.complete()
    assert instrumentor._state is None and instrumentor.patched == []
    assert all(PhaseExecutionManager.__dict__[n] is f for n, f in ORIGINALS.items())
    instrumentor.uninstrument()  # idempotent
    assert not integration.is_instrumented()


class _AppManager(PhaseExecutionManager):
    """An application's adaptation of the manager that inherits every lifecycle method (defines none)."""


def test_a_manager_subclass_inheriting_the_methods_is_watched_and_restored(capture: Any) -> None:
    """``instrument_phase_manager`` on a subclass that defines none of the methods wraps them where they are
    defined (session 42, x-order42; on 0297505 nothing was wrapped: no span at all), and ``uninstrument()``
    puts the base's methods back by identity."""
    integration.instrument_phase_manager(_AppManager)
    try:
        with workflow("deep_research", mode="hitl-interactive"):
            assert _run_hitl_control(_AppManager(_Context(), _Phase())) == "result"
    finally:
        integration.uninstrument_cmbagent()
    assert capture.tree()[:3] == ["workflow deep_research", "  phase hitl_control", "    step 1"]
    assert {name: PhaseExecutionManager.__dict__[name] for name in ORIGINALS} == ORIGINALS
    assert not [name for name in ORIGINALS if name in vars(_AppManager)]


def test_an_executor_subclass_inheriting_run_is_watched_and_restored(capture: Any) -> None:
    """The executor's sibling: a ``cmbagent.workflows.composer`` whose ``WorkflowExecutor`` is a subclass
    inheriting ``__init__`` and the async ``run`` gets both wrapped where they are defined, its run is the run
    (session 42, x-order42; on 0297505 nothing was wrapped: no span), and ``uninstrument()`` restores them."""
    import asyncio
    from types import ModuleType, SimpleNamespace

    class Executor:  # MARS's WorkflowExecutor's shape: __init__ and an async run
        workflow = SimpleNamespace(id="preloaded_control")
        context = None

        def __init__(self, phases: int = 1) -> None:
            self.phases = phases

        async def run(self) -> str:
            await asyncio.sleep(0)
            return f"ran {self.phases}"

    class AppExecutor(Executor):
        """Defines neither."""

    originals = {name: vars(Executor)[name] for name in ("__init__", "run")}
    module = ModuleType(integration.WORKFLOW_EXECUTOR_MODULE)
    module.WorkflowExecutor = AppExecutor  # type: ignore[attr-defined]
    instrumentor = CmbagentInstrumentor()
    instrumentor.instrument(skip_dep_check=True)
    try:
        instrumentor._patch_module(module)
        assert asyncio.run(AppExecutor(2).run()) == "ran 2"
    finally:
        instrumentor.uninstrument()
    assert [s.name for s in capture.spans] == ["workflow preloaded_control"]
    assert {name: vars(Executor)[name] for name in originals} == originals
