"""Workflow hierarchy: phases, steps, redo branches, and context that never leaks."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from autogen import ConversableAgent
from opentelemetry.trace import StatusCode

import cmbagent_otel
from cmbagent_otel import RedoLimitExceeded, WorkflowNestingError, phase, redo, semconv, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.demo import run_demo
from cmbagent_otel.testing import offline_agent

STRUCTURE = ("workflow ", "phase ", "step ", "redo ", "execute_code", "execute_tool", "conversation")

EXPECTED_DEMO_STRUCTURE = [
    "workflow planning_and_control",
    "  phase planning",
    "    conversation planner",
    "  phase control",
    "    step 1",
    "      conversation chat_manager",
    "        execute_code python",
    "    step 2",
    "      conversation chat_manager",
    "        execute_code python",
    "      redo step 2 attempt 1",
    "        conversation chat_manager",
    "          execute_code python",
    "      redo step 2 attempt 2",
    "        conversation chat_manager",
    "          execute_tool peak_position",
    "          execute_code python",
    "    step 3",
    "      conversation chat_manager",
]


def structure(capture: Any) -> list[str]:
    """The tree restricted to structural spans, indented by structural depth."""
    spans = capture.spans
    by_id = {s.context.span_id: s for s in spans}
    lines = []
    for span in spans:
        if not span.name.startswith(STRUCTURE):
            continue
        depth, parent = 0, span.parent
        while parent is not None and parent.span_id in by_id:
            if by_id[parent.span_id].name.startswith(STRUCTURE):
                depth += 1
            parent = by_id[parent.span_id].parent
        lines.append("  " * depth + span.name)
    return lines


def test_scripted_planning_control_run_produces_the_expected_tree(instrumented, tmp_path):
    run_id = run_demo(str(tmp_path))
    assert structure(instrumented) == EXPECTED_DEMO_STRUCTURE
    spans = instrumented.spans
    assert len({s.context.trace_id for s in spans}) == 1
    assert run_id.replace("-", "") == format(spans[0].context.trace_id, "032x")

    root = instrumented.one("workflow planning_and_control")
    assert root.attributes[semconv.WORKFLOW_MODE] == "planning-control"
    assert root.status.status_code is StatusCode.UNSET
    planning = instrumented.one("phase planning")
    assert planning.attributes[semconv.GEN_AI_OPERATION_NAME] == "plan"
    assert planning.attributes[semconv.DAG_NODE_TYPE] == "planning"
    assert planning.attributes[semconv.DAG_ORDER_INDEX] == 0

    step2 = instrumented.one("step 2")
    assert step2.attributes[semconv.STEP_NUMBER] == 2
    assert step2.attributes[semconv.DAG_NODE] == "step_2"
    assert step2.attributes[semconv.DAG_PARENT_NODE] == "control"
    assert step2.attributes[semconv.STEP_GOAL] == "Fit the acoustic peak positions"
    redo1 = instrumented.one("redo step 2 attempt 1")
    redo2 = instrumented.one("redo step 2 attempt 2")
    assert redo1.attributes[semconv.BRANCH_NAME] == "redo_1"
    assert redo1.attributes[semconv.DAG_NODE] == "step_2_redo_1"
    assert redo1.attributes[semconv.DAG_PARENT_NODE] == "step_2"
    assert redo1.attributes[semconv.BRANCH_HYPOTHESIS] == "Use a smaller step size"
    assert redo1.status.status_code is StatusCode.ERROR
    assert redo2.status.status_code is StatusCode.UNSET
    codes = instrumented.named("execute_code python")
    assert [c.attributes[semconv.CODE_EXIT_CODE] for c in codes] == [0, 1, 3, 0]
    assert [c.status.status_code for c in codes] == [StatusCode.UNSET, StatusCode.ERROR, StatusCode.ERROR,
                                                     StatusCode.UNSET]
    # sub-agent calls are DAG nodes under their step; events inside them point at them
    engineer = next(s for s in spans if s.attributes.get(semconv.DAG_NODE) == "step_1_engineer")
    assert engineer.name == "invoke_agent engineer"
    assert engineer.attributes[semconv.DAG_NODE_TYPE] == "sub_agent"
    assert engineer.attributes[semconv.DAG_PARENT_NODE] == "step_1"
    assert engineer.attributes[semconv.DAG_DEPTH] == 2
    assert codes[0].attributes[semconv.DAG_NODE] == "step_1_executor"
    assert instrumented.one("step 3").attributes[semconv.STEP_SUMMARY] == "Acoustic scale fitted"
    # one gap-free execution order over the run's spans and its handoff events
    orders = [s.attributes[semconv.EXECUTION_ORDER] for s in spans]
    orders += [h[semconv.EXECUTION_ORDER] for h in instrumented.handoffs()
               if h["span"].attributes[semconv.SPAN_KIND] != semconv.KIND_SPEAKER_SELECTION]
    assert sorted(orders) == list(range(1, len(orders) + 1))


class StepFailure(Exception):
    pass


def test_exception_in_step_fails_step_phase_workflow_and_reraises_unchanged(capture):
    error = StepFailure("bad data", 42)
    with pytest.raises(StepFailure) as raised, workflow("w"), phase("control"), step(1, "goal"):
        raise error
    assert raised.value is error and raised.value.args == ("bad data", 42)
    for name in ("step 1", "phase control", "workflow w"):
        span = capture.one(name)
        assert span.status.status_code is StatusCode.ERROR, name
        assert span.attributes[semconv.ERROR_TYPE].endswith("StepFailure")
    assert capture.one("step 1").events[0].attributes["exception.message"] == "('bad data', 42)"


def test_nesting_is_checked(capture):
    with pytest.raises(WorkflowNestingError, match="inside a workflow"), phase("control"):
        pass
    with workflow("w"):
        with pytest.raises(WorkflowNestingError, match="inside a phase"), step(1, "x"):
            pass
        with phase("control"):
            with pytest.raises(WorkflowNestingError, match="directly inside step"), redo(1, 1):
                pass
            with pytest.raises(WorkflowNestingError, match="phases do not nest"), phase("inner"):
                pass
            with step(1, "x"):
                with pytest.raises(WorkflowNestingError, match="steps do not nest"), step(2, "y"):
                    pass
                with pytest.raises(WorkflowNestingError, match="current step is 1"), redo(2, 1):
                    pass
    with pytest.raises(ValueError, match="positive int"):
        step(0, "x")
    with pytest.raises(ValueError, match="non-empty"):
        phase("")
    # nothing was half-opened by the failed attempts
    assert [s.name for s in capture.spans] == ["workflow w", "phase control", "step 1"]


def test_redo_limit_from_max_redos(capture):
    with workflow("w", max_redos=2), phase("hitl_control"), step(3, "retry me"):
        with redo(3, 1, "first"):
            pass
        with redo(3, 2, "second"):
            pass
        with pytest.raises(RedoLimitExceeded, match="exceeds max_redos=2"), redo(3, 3):
            pass
    assert [s.name for s in capture.named("redo")] == ["redo step 3 attempt 1", "redo step 3 attempt 2"]


def test_nested_workflow_joins_the_parent_run(capture):
    with workflow("outer", mode="planning-control"), phase("control"), step(1, "spawn"):
        inner = workflow("inner", mode="one-shot")
        with inner, TracedSpan("inner work", "custom"):
            pass
        assert inner.joined
    assert [s.name for s in capture.named("workflow")] == ["workflow outer"]
    work = capture.one("inner work")
    assert capture.parent_of(work) is capture.one("step 1")
    assert work.attributes[semconv.DAG_NODE] == "step_1"


def test_repeated_phase_names_get_unique_node_ids(capture):
    with workflow("w"):
        for _ in range(2):
            with phase("control"):
                pass
    nodes = [s.attributes[semconv.DAG_NODE] for s in capture.named("phase")]
    assert nodes == ["control", "control_2"]


def test_every_one_shot_phase_is_an_execute_node_with_its_sub_agents(instrumented):
    """A run of several one_shot solves (cmbagent's get_keywords per UNESCO level): each is an execute
    node (type agent) whose agent turns are its sub-agent nodes, as the first; the first keeps
    cmbagent's order 1, the later ones a non-step order."""
    with workflow("keywords", mode="one-shot"):
        for label in ("a", "b", "c"):
            with phase("one_shot"):
                _chat_in_step(label)
    phases = instrumented.named("phase one_shot")
    assert [(s.attributes[semconv.DAG_NODE], s.attributes[semconv.DAG_NODE_TYPE], s.attributes[semconv.DAG_ORDER_INDEX])
            for s in phases] == [("execute", "agent", 1), ("execute_2", "agent", 1002), ("execute_3", "agent", 1003)]
    for node, label in (("execute", "a"), ("execute_2", "b"), ("execute_3", "c")):
        subs = [s.attributes[semconv.DAG_NODE] for s in instrumented.spans
                if s.attributes.get(semconv.DAG_PARENT_NODE) == node]
        assert subs == [f"{node}_alice_{label}"], (node, subs)


def test_decorators_sync_and_async(capture):
    @workflow("decorated", mode="one-shot")
    def run() -> str:
        with phase("one_shot"):
            return "done"

    @workflow("decorated-async")
    async def arun() -> str:
        async with phase("one_shot"):
            await asyncio.sleep(0)
            return "adone"

    @step(1, "decorated step")
    def do_step() -> int:
        return 7

    assert run() == "done" and run() == "done"
    assert asyncio.run(arun()) == "adone"
    with workflow("w"), phase("control"):
        assert do_step() == 7
    assert len(capture.named("workflow decorated")) == 3
    assert len({s.context.trace_id for s in capture.named("workflow decorated")}) == 3
    assert capture.one("step 1").attributes[semconv.STEP_GOAL] == "decorated step"


def _chat_in_step(label: str) -> None:
    alice = offline_agent(f"alice_{label}", [f"reply {label}"])
    bob = ConversableAgent(f"bob_{label}", llm_config=False, human_input_mode="NEVER")
    bob.initiate_chat(alice, message=f"hello {label}", max_turns=1, silent=True)


def _one_workflow(label: str) -> None:
    with workflow(f"wf-{label}", session_id=f"session-{label}"), phase("control"):
        for number in (1, 2):
            with step(number, f"{label} step {number}"):
                _chat_in_step(f"{label}{number}")


def test_eight_concurrent_workflows_get_disjoint_traces(instrumented):
    barrier = threading.Barrier(4)

    def threaded(label: str) -> None:
        barrier.wait()
        _one_workflow(label)

    async def in_task(label: str) -> None:
        async with workflow(f"wf-{label}", session_id=f"session-{label}"), phase("control"):
            for number in (1, 2):
                async with step(number, f"{label} step {number}"):
                    tag = f"{label}{number}"
                    alice = offline_agent(f"alice_{tag}", [f"reply {tag}"])
                    bob = ConversableAgent(f"bob_{tag}", llm_config=False, human_input_mode="NEVER")
                    await asyncio.sleep(0)  # let the other tasks interleave
                    await bob.a_initiate_chat(alice, message=f"hello {tag}", max_turns=1, silent=True)

    async def tasks() -> None:
        await asyncio.gather(*(in_task(f"a{i}") for i in range(4)))

    threads = [threading.Thread(target=threaded, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()

    roots = instrumented.named("workflow wf-")
    assert len(roots) == 8
    traces: dict[int, list[Any]] = {}
    for span in instrumented.spans:
        traces.setdefault(span.context.trace_id, []).append(span)
    assert len(traces) == 8
    for root in roots:
        label = root.name.removeprefix("workflow wf-")
        members = traces[root.context.trace_id]
        assert len(members) == 1 + 1 + 2 * 4  # workflow, phase, 2 x (step, conversation, agent, chat)
        for span in members:
            assert span.attributes[semconv.SESSION_ID] == f"session-{label}"
            agent = span.attributes.get(semconv.GEN_AI_AGENT_NAME)
            if agent is not None:
                assert agent.startswith(("alice_" + label, "bob_" + label)), (label, span.name, agent)
        orders = sorted(s.attributes[semconv.EXECUTION_ORDER] for s in members)
        assert orders == list(range(1, len(members) + 1))
        steps = [s for s in members if s.name.startswith("step ")]
        for step_span in steps:
            chats = [s for s in members if s.name == "conversation alice_" + label + str(
                step_span.attributes[semconv.STEP_NUMBER])]
            assert len(chats) == 1 and chats[0].parent.span_id == step_span.context.span_id


def test_executor_work_inside_a_step_stays_a_child_of_the_step(instrumented):
    with workflow("pool"), phase("control"), step(1, "fan out"), ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(_chat_in_step, ["x", "y", "z"]))
    step_span = instrumented.one("step 1")
    conversations = instrumented.named("conversation")
    assert len(conversations) == 3
    assert all(c.parent.span_id == step_span.context.span_id for c in conversations)
    assert all(c.attributes[semconv.DAG_NODE] == "step_1" for c in conversations)


def test_execution_order_is_unique_under_contention(capture):
    def burst() -> None:
        for _ in range(200):
            with TracedSpan("tick", "custom"):
                pass

    with workflow("contention"):
        from opentelemetry import context

        ctx = context.get_current()

        def run_in_ctx() -> None:
            token = context.attach(ctx)
            try:
                burst()
            finally:
                context.detach(token)

        threads = [threading.Thread(target=run_in_ctx) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    orders = [s.attributes[semconv.EXECUTION_ORDER] for s in capture.spans]
    assert sorted(orders) == list(range(1, 8 * 200 + 2))


def test_spans_outside_any_workflow_form_an_implicit_run(capture):
    with TracedSpan("lonely", "custom"), TracedSpan("child", "custom"):
        pass
    lonely, child = capture.one("lonely"), capture.one("child")
    assert lonely.attributes[semconv.SESSION_ID] == semconv.DEFAULT_SESSION_ID
    assert lonely.attributes[semconv.EXECUTION_ORDER] == 1
    assert child.attributes[semconv.EXECUTION_ORDER] == 2
    assert child.attributes[semconv.EVENT_DEPTH] == 1
    assert cmbagent_otel.is_instrumented() is False


def test_an_event_span_s_children_scope_is_built_once_on_first_use(capture):
    # a tool span (a leaf kind) that changes nothing holds its children's scope lazily: built by the
    # first reader, whatever its thread, then the same object for all, as an eager one would be
    from cmbagent_otel._context import current_scope

    with TracedSpan("outer", "custom") as outer, TracedSpan("leaf", semconv.KIND_TOOL) as leaf:
        seen: list[Any] = []
        barrier = threading.Barrier(8)

        def read() -> None:
            barrier.wait()
            seen.append(current_scope())

        threads = [threading.Thread(target=contextvars.copy_context().run, args=(read,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with TracedSpan("inner", "custom"):
            pass
    assert leaf._scope is not None  # built by a reader
    assert len(seen) == 8 and all(s is leaf.scope for s in seen)
    assert leaf.scope.owner is leaf.span
    assert leaf.scope.event_depth == outer.scope.event_depth + 1 == 2
    inner = capture.one("inner")
    assert inner.attributes[semconv.EVENT_DEPTH] == 2
    assert inner.parent.span_id == capture.one("leaf").context.span_id
