"""Plan steps derived from record_status inside one AG2 group chat, without cmbagent (both AG2 lines).

A real AG2 group chat (``initiate_group_chat`` with a ``DefaultPattern``) whose control agent
moves between plan steps with a ``record_status`` tool of cmbagent's signature, run inside a
control phase; the model answers come from the loopback scripted server. The hostile variants
write values into the context variables that make our own code fail; the application must see
exactly the same thing with and without instrumentation.
"""

# no `from __future__ import annotations`: AG2 reads the tools' annotations at runtime

import json
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

import cmbagent_otel
from cmbagent_otel import semconv as sc
from cmbagent_otel.testing import offline_agent

group = pytest.importorskip("autogen.agentchat.group")
patterns = pytest.importorskip("autogen.agentchat.group.patterns")
from autogen.agentchat import initiate_group_chat  # noqa: E402
from autogen.agentchat.group import AgentTarget, ContextVariables, ReplyResult, TerminateTarget  # noqa: E402


class HostileInt(int):
    """An int our code cannot format (AG2 and the app never format it)."""

    def __format__(self, spec: str) -> str:
        raise RuntimeError("no format")

    def __str__(self) -> str:
        raise RuntimeError("no str")

    __repr__ = __str__


def _status(status: str, number: int, agent: str = "engineer") -> dict[str, Any]:
    return {"tool_calls": [{"name": "record_status", "arguments": {
        "current_status": status, "current_plan_step_number": number, "current_sub_task": f"sub-task {number}",
        "current_instructions": "do it", "agent_for_sub_task": agent}}]}


PLAN = "\n- Step 1:\n\t* sub-task: Load the data\n\t* agent in charge: engineer\n" \
       "\n- Step 2:\n\t* sub-task: Fit the peak\n\t* agent in charge: engineer\n"


def run_chat(work_dir: Any, *, hostile: bool = False, retry: bool = False) -> tuple[Any, Any]:
    steps = 2
    engineer = offline_agent("engineer", [f"work {i}" for i in range(6)])
    holder: dict[str, Any] = {}

    def record_status(current_status: str, current_plan_step_number: int, current_sub_task: str,
                      current_instructions: str, agent_for_sub_task: str,
                      context_variables: ContextVariables) -> ReplyResult:
        """Record the workflow status and hand over to the agent in charge."""
        context_variables["current_status"] = current_status
        context_variables["current_plan_step_number"] = (HostileInt(current_plan_step_number) if hostile
                                                         else current_plan_step_number)
        context_variables["current_sub_task"] = current_sub_task
        context_variables["agent_for_sub_task"] = agent_for_sub_task
        if retry and current_status == "failed":
            context_variables["n_attempts"] = context_variables.get("n_attempts", 0) + 1
        if current_status == "completed" and current_plan_step_number == steps:
            return ReplyResult(target=TerminateTarget(), message="all done",
                                     context_variables=context_variables)
        target = holder["control"] if current_status == "completed" else engineer
        return ReplyResult(target=AgentTarget(target), message=f"status {current_status}",
                                 context_variables=context_variables)

    script = [_status("in progress", 1)]
    if retry:
        script += [_status("failed", 1)]
    script += [_status("completed", 1), _status("in progress", 2), _status("completed", 2)]
    control = offline_agent("control", script, functions=[record_status])
    holder["control"] = control
    engineer.handoffs.set_after_work(AgentTarget(control))
    (work_dir / "chats").mkdir(parents=True, exist_ok=True)
    context = ContextVariables(data={"work_dir": str(work_dir), "final_plan": PLAN, "n_attempts": 0,
                                           "max_n_attempts": 3})
    pattern = patterns.DefaultPattern(initial_agent=control, agents=[control, engineer],
                                      context_variables=context, group_manager_args={"llm_config": False})
    result, final, _ = initiate_group_chat(pattern=pattern, messages="solve it", max_rounds=20)
    history = [(m.get("name"), m.get("content")) for m in result.chat_history]
    return history, json.dumps({k: int(v) if isinstance(v, int) else v for k, v in final.to_dict().items()
                                if k != "work_dir"}, sort_keys=True)


@pytest.fixture
def server_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # the pattern rebuilds the agents' model clients: the loopback server routes by API key, which survives that
    monkeypatch.setenv("CMBAGENT_OTEL_OFFLINE_BACKEND", "server")
    yield


def test_steps_derived_from_record_status(instrumented: Any, server_backend: None, tmp_path: Any) -> None:
    with cmbagent_otel.workflow("control", mode="planning-control"), cmbagent_otel.phase("control"):
        run_chat(tmp_path, retry=True)
    spans = instrumented.spans
    manager = [s for s in spans if s.name.startswith("invoke_agent") and
               s.attributes[sc.GEN_AI_AGENT_NAME] not in ("control", "engineer", "_Group_Tool_Executor")]
    assert len(manager) == 1
    steps = [instrumented.one("step 1"), instrumented.one("step 2")]
    for number, span in enumerate(steps, 1):
        assert span.parent.span_id == manager[0].context.span_id
        assert (span.attributes[sc.DAG_NODE], span.attributes[sc.DAG_ORDER_INDEX]) == (f"step_{number}", number)
        assert span.attributes[sc.STEP_GOAL] == ("Load the data", "Fit the peak")[number - 1]
        assert span.attributes[sc.STEP_STATUS] == "completed"
        assert span.status.status_code is StatusCode.UNSET
    assert steps[0].attributes[sc.STEP_ATTEMPTS] == 1 and steps[1].attributes[sc.STEP_ATTEMPTS] == 0
    failed = [s for s in spans if s.attributes.get(sc.SPAN_KIND) == sc.KIND_ATTEMPT]
    assert sorted(s.name for s in failed) == ["step 1 attempt 1 failed", "step 1 reported failed"]
    assert all(s.parent.span_id == steps[0].context.span_id and s.status.status_code is StatusCode.ERROR
               for s in failed)
    engineer_turns = instrumented.named("invoke_agent engineer")
    assert [t.attributes[sc.DAG_NODE] for t in engineer_turns] == ["step_1_engineer", "step_1_engineer_2",
                                                                   "step_2_engineer"]
    runner = instrumented.named("invoke_agent _Group_Tool_Executor")
    assert runner and all(sc.DAG_NODE_TYPE not in r.attributes for r in runner)


def test_chat_ending_inside_a_step_completes_it(instrumented: Any, server_backend: None, tmp_path: Any) -> None:
    """The chat ends (here the engineer's handoff terminates it; in cmbagent, max_rounds) while step 1 is in
    progress: the step ends completed, as cmbagent's own tracking completes a step whose chat ended
    without running out of attempts; its summary and last reported status say how it ended."""
    def cut(work_dir: Any) -> None:
        engineer = offline_agent("engineer", ["working"])

        def record_status(current_status: str, current_plan_step_number: int,
                          context_variables: ContextVariables) -> ReplyResult:
            """Record the workflow status."""
            context_variables["current_status"] = current_status
            context_variables["current_plan_step_number"] = current_plan_step_number
            return ReplyResult(target=AgentTarget(engineer), context_variables=context_variables,
                                     message="go")

        control = offline_agent("control", [{"tool_calls": [{"name": "record_status", "arguments": {
            "current_status": "in progress", "current_plan_step_number": 1}}]}], functions=[record_status])
        engineer.handoffs.set_after_work(TerminateTarget())
        (work_dir / "chats").mkdir(parents=True, exist_ok=True)
        pattern = patterns.DefaultPattern(initial_agent=control, agents=[control, engineer],
                                          context_variables=ContextVariables(data={"work_dir": str(work_dir)}),
                                          group_manager_args={"llm_config": False})
        initiate_group_chat(pattern=pattern, messages="solve it", max_rounds=10)

    with cmbagent_otel.workflow("control", mode="planning-control"), cmbagent_otel.phase("control"):
        cut(tmp_path)
    step = instrumented.one("step 1")
    assert step.status.status_code is StatusCode.UNSET
    assert step.attributes[sc.STEP_SUMMARY] == "the chat ended while step 1 was in progress, before it reported " \
        "completion"
    assert step.attributes[sc.STEP_STATUS] == "in progress"
    assert instrumented.one("invoke_agent engineer").attributes[sc.DAG_NODE] == "step_1_engineer"


@pytest.mark.parametrize("hostile", [False, True], ids=["plain", "hostile-context"])
def test_same_outcome_with_and_without_instrumentation(capture: Any, server_backend: None, tmp_path: Any,
                                                       hostile: bool) -> None:
    def run(name: str) -> Any:
        with cmbagent_otel.workflow("control"), cmbagent_otel.phase("control"):
            return run_chat(tmp_path / name, hostile=hostile, retry=True)

    plain = run("plain")
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_threading=False, set_global=False)
    try:
        traced = run("traced")
    finally:
        cmbagent_otel.uninstrument()
    assert traced == plain
    assert capture.named("invoke_agent control")
    if hostile:  # the steps could not be described: the chat's turns stay in the control phase
        assert not capture.named("step 1")
