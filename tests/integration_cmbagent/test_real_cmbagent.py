"""The integration against the real cmbagent package (PyPI), offline.

cmbagent's workflow functions, CMBAgent construction, solve, plan saving and the step
loop all run for real; only AG2's ``initiate_group_chat`` (the LLM conversation, imported
into ``cmbagent.cmbagent``) is replaced by a scripted conversation that updates the
context variables the way cmbagent's agents do, since no model can be reached offline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
cmbagent = pytest.importorskip(
    "cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)"
)
cmbagent_module = pytest.importorskip("cmbagent.cmbagent")

from cmbagent_otel import semconv  # noqa: E402
from cmbagent_otel.integrations import cmbagent as integration  # noqa: E402
from cmbagent_otel.workflow import workflow  # noqa: E402

API_KEYS = {"OPENAI": "sk-offline", "ANTHROPIC": "offline", "GEMINI": "offline", "MISTRAL": "offline"}
PLAN = """
**PLAN**

- Step 1:
\t* sub-task: Load the Planck spectrum
\t* agent in charge: engineer

- Step 2:
\t* sub-task: Write up the findings
\t* agent in charge: researcher
"""


class ScriptedChat:
    """Stands in for the LLM group chat: plans, or completes the requested step."""

    def __init__(self, fail_steps: frozenset[int] = frozenset(), raise_at_step: int | None = None) -> None:
        self.fail_steps = fail_steps
        self.raise_at_step = raise_at_step
        self.calls: list[tuple[str, int | None]] = []

    def __call__(self, pattern: Any, messages: Any, max_rounds: int = 10, **_: Any) -> Any:
        ctx = pattern.context_variables
        starter = pattern.initial_agent.name
        # what the cmbagent_autogen client records per call; cmbagent's display_cost reads it
        pattern.initial_agent.cost_dict = {"Agent": [starter], "Cost": [0.0], "Prompt Tokens": [0],
                                           "Completion Tokens": [0], "Total Tokens": [0], "Model": ["offline"]}
        if starter == "plan_setter":
            self.calls.append((starter, None))
            ctx["final_plan"] = PLAN
            ctx["number_of_steps_in_plan"] = 2
            history = [{"name": "planner", "content": PLAN}]
        elif ctx.get("mode") == "one_shot" or starter in ("engineer", "researcher"):
            self.calls.append((starter, None))
            history = [{"name": f"{starter}_response_formatter", "content": "one shot answer"}]
        else:
            number = ctx.get("current_plan_step_number")
            self.calls.append((starter, number))
            agent = ctx.get("agent_for_sub_task")
            if number == self.raise_at_step:
                raise RuntimeError("model endpoint went away")
            if number in self.fail_steps:
                ctx["n_attempts"] = ctx.get("max_n_attempts", 3)
            else:
                ctx["current_status"] = "completed"
                ctx["agent_for_sub_task"] = "researcher" if number == 1 else agent
            history = [{"name": f"{agent}_response_formatter", "content": f"  step {number} done  "}]
        return SimpleNamespace(chat_history=history, cost={}), ctx, pattern.initial_agent


ENTRY_NAMES = ("one_shot", "planning_and_control", "planning_and_control_context_carryover", "control",
               "human_in_the_loop", "get_keywords")


@pytest.fixture
def chat(monkeypatch: pytest.MonkeyPatch) -> ScriptedChat:
    scripted = ScriptedChat()
    monkeypatch.setattr(cmbagent_module, "initiate_group_chat", scripted)
    return scripted


@pytest.fixture
def patched(capture: Any) -> Iterator[None]:
    assert integration.instrument_cmbagent() is True
    try:
        yield
    finally:
        integration.uninstrument_cmbagent()


def test_context_carryover_run_maps_to_workflow_phase_step(capture: Any, patched: None, chat: ScriptedChat,
                                                          tmp_path: Path) -> None:
    results = cmbagent.planning_and_control_context_carryover(
        "Measure the spectrum", work_dir=str(tmp_path), api_keys=API_KEYS, engineer_model="gpt-4.1-2025-04-14",
    )
    assert chat.calls == [("plan_setter", None), ("control", 1), ("control_starter", 2)]
    assert "final_context" in results
    assert capture.tree() == [
        "workflow planning_and_control_context_carryover",
        "  phase planning",
        "  phase control",
        "    step 1",
        "    step 2",
    ]
    root = capture.one("workflow planning_and_control_context_carryover")
    assert root.attributes[semconv.WORKFLOW_MODE] == "planning-control"
    assert root.attributes[semconv.WORKFLOW_TASK] == "Measure the spectrum"
    assert root.attributes[semconv.WORKFLOW_WORK_DIR] == str(tmp_path)
    assert root.attributes[semconv.WORKFLOW_AGENT] == "engineer"
    assert root.attributes[semconv.WORKFLOW_MODEL] == "gpt-4.1-2025-04-14"
    step1, step2 = capture.one("step 1"), capture.one("step 2")
    assert step1.attributes[semconv.STEP_GOAL] == "Load the Planck spectrum"
    assert step1.attributes[semconv.STEP_AGENT] == "engineer"
    assert step1.attributes[semconv.STEP_SUMMARY] == "step 1 done"
    assert step2.attributes[semconv.STEP_GOAL] == "Write up the findings"
    assert step2.attributes[semconv.STEP_AGENT] == "researcher"
    assert step2.attributes[semconv.STEP_SUMMARY] == "step 2 done"
    assert {s.context.trace_id for s in capture.spans} == {root.context.trace_id}


def test_step_out_of_attempts_is_failed(capture: Any, patched: None, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    scripted = ScriptedChat(fail_steps=frozenset({2}))
    monkeypatch.setattr(cmbagent_module, "initiate_group_chat", scripted)
    cmbagent.planning_and_control_context_carryover("t", work_dir=str(tmp_path), api_keys=API_KEYS)
    assert capture.one("step 1").status.status_code is StatusCode.UNSET
    step2 = capture.one("step 2")
    assert step2.status.status_code is StatusCode.ERROR
    assert "max_n_attempts" in (step2.status.description or "")


def test_exception_in_step_fails_step_phase_and_run(capture: Any, patched: None, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setattr(cmbagent_module, "initiate_group_chat", ScriptedChat(raise_at_step=2))
    with pytest.raises(RuntimeError, match="endpoint went away"):
        cmbagent.planning_and_control_context_carryover("t", work_dir=str(tmp_path), api_keys=API_KEYS)
    assert capture.tree() == [
        "workflow planning_and_control_context_carryover",
        "  phase planning",
        "  phase control",
        "    step 1",
        "    step 2",
    ]
    for name in ("step 2", "phase control", "workflow planning_and_control_context_carryover"):
        assert capture.one(name).status.status_code is StatusCode.ERROR, name
    assert capture.one("step 1").status.status_code is StatusCode.UNSET


def test_one_shot_and_nested_workflow_join(capture: Any, patched: None, chat: ScriptedChat,
                                           tmp_path: Path) -> None:
    with workflow("outer", mode="one-shot"):
        cmbagent.one_shot("Plot a spectrum", work_dir=str(tmp_path), api_keys=API_KEYS, agent="researcher")
    assert capture.tree() == ["workflow outer", "  phase one_shot"]


def test_carryover_inside_user_workflow_keeps_one_control_phase(capture: Any, patched: None, chat: ScriptedChat,
                                                                 tmp_path: Path) -> None:
    with workflow("campaign", mode="planning-control"):
        cmbagent.deep_research("Measure the spectrum", work_dir=str(tmp_path), api_keys=API_KEYS)
    assert capture.tree() == [
        "workflow campaign",
        "  phase planning",
        "  phase control",
        "    step 1",
        "    step 2",
    ]


def test_one_shot_workflow_attributes(capture: Any, patched: None, chat: ScriptedChat, tmp_path: Path) -> None:
    cmbagent.one_shot("Plot a spectrum", work_dir=str(tmp_path), api_keys=API_KEYS, agent="researcher",
                      researcher_model="gpt-4o-mini")
    assert capture.tree() == ["workflow one_shot", "  phase one_shot"]
    root = capture.one("workflow one_shot")
    assert root.attributes[semconv.WORKFLOW_MODE] == "one-shot"
    assert root.attributes[semconv.WORKFLOW_AGENT] == "researcher"
    assert root.attributes[semconv.WORKFLOW_MODEL] == "gpt-4o-mini"


def test_direct_solve_is_its_own_run(capture: Any, patched: None, chat: ScriptedChat, tmp_path: Path) -> None:
    agent = cmbagent.CMBAgent(work_dir=tmp_path / "solo", api_keys=API_KEYS)
    agent.solve("Plan it", initial_agent="plan_setter", max_rounds=5)
    assert capture.tree() == ["workflow solve", "  phase planning"]
    assert capture.one("workflow solve").attributes[semconv.WORKFLOW_AGENT] == "plan_setter"


def test_uninstrument_restores_identity(capture: Any, chat: ScriptedChat, tmp_path: Path) -> None:
    names = [n for n in ENTRY_NAMES if hasattr(cmbagent_module, n)]
    originals = {n: getattr(cmbagent_module, n) for n in names}
    package = {n: getattr(cmbagent, n) for n in (*names, "deep_research") if hasattr(cmbagent, n)}
    solve = cmbagent_module.CMBAgent.__dict__["solve"]
    assert integration.instrument_cmbagent() is True
    try:
        assert all(getattr(cmbagent_module, n) is not originals[n] for n in names)
        assert all(getattr(cmbagent, n) is not package[n] for n in package)
        assert cmbagent_module.CMBAgent.__dict__["solve"] is not solve
    finally:
        integration.uninstrument_cmbagent()
    assert all(getattr(cmbagent_module, n) is originals[n] for n in names)
    assert all(getattr(cmbagent, n) is package[n] for n in package)
    assert cmbagent_module.CMBAgent.__dict__["solve"] is solve
    cmbagent.one_shot("t", work_dir=str(tmp_path), api_keys=API_KEYS)
    assert capture.spans == []


def test_instrument_enables_the_integration(capture: Any, chat: ScriptedChat, tmp_path: Path) -> None:
    import cmbagent_otel

    original = cmbagent.one_shot
    cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False, instrument_threading=False)
    try:
        assert integration.is_instrumented()
        cmbagent.one_shot("t", work_dir=str(tmp_path), api_keys=API_KEYS)
    finally:
        cmbagent_otel.uninstrument()
    assert not integration.is_instrumented()
    assert cmbagent.one_shot is original
    assert capture.tree() == ["workflow one_shot", "  phase one_shot"]


IMPORT_LATER = """
import sys
from cmbagent_otel.integrations import cmbagent as integration
assert "cmbagent" not in sys.modules
assert integration.instrument_cmbagent() is True
assert "cmbagent" not in sys.modules  # instrumenting does not import cmbagent
import cmbagent, cmbagent.cmbagent as m
wrapped = {n: getattr(cmbagent, n) for n in ("one_shot", "deep_research", "planning_and_control")}
assert all(hasattr(f, "__wrapped__") for f in wrapped.values()), wrapped
assert hasattr(m.CMBAgent.__dict__["solve"], "__wrapped__")
integration.uninstrument_cmbagent()
assert cmbagent.one_shot is m.one_shot and not hasattr(m.one_shot, "__wrapped__")
assert cmbagent.deep_research is m.planning_and_control_context_carryover
assert not hasattr(m.CMBAgent.__dict__["solve"], "__wrapped__")
print("ok")
"""


def test_instrument_before_cmbagent_is_imported(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "CMBAGENT_DISABLE_DISPLAY": "true"}
    done = subprocess.run([sys.executable, "-c", IMPORT_LATER], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
