"""Realistic runs, shaped the way the span side emits them (docs/spans.md and the issue-11 contract).

The spans are made with a plain OpenTelemetry SDK tracer and carry the contract attributes
explicitly, so these runs test the DAG side against the contract itself, not against
whatever our instrumentation emits today:

* order_index: planning 0, plan step n -> n, other phases 1000 + phase index, a one_shot
  phase is node ``execute`` at 1 (a repeated one ``execute_2``... at 1000 + phase index); a
  child of node P gets ``base(P) * 1000 + k`` (k = 1, 2, ... per parent, shared by
  sub-agents and redos; base(step n) = n, else P's order_index);
* sub-agent nodes for agent turns directly inside a step, redo, one_shot ``execute`` or
  top-level conversation node; nested agent calls are events;
* a plain AG2 program: each top-level conversation span is a DAG node ``conversation_<k>``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from cmbagent_otel import semconv as sc

TASK = "Fit the CMB TT power spectrum and plot the residuals"
NODE_HOSTS = (sc.NODE_AGENT, sc.NODE_REDO)  # node types whose agent turns become sub-agent nodes


@dataclass(frozen=True)
class Frame:
    node: str | None
    node_type: str | None
    node_depth: int
    event_depth: int
    base: int
    in_agent: bool


class Shaper:
    """Opens contract-shaped spans; ``with`` nesting gives the parent/child structure."""

    def __init__(self, tracer: trace.Tracer, session_id: str = sc.DEFAULT_SESSION_ID) -> None:
        self.tracer = tracer
        self.session_id = session_id
        self._order = itertools.count(1)
        self._stack: list[Frame] = [Frame(None, None, -1, 0, 0, False)]
        self._children: Counter[str] = Counter()
        self._names: Counter[str] = Counter()
        self._phases = itertools.count(1)
        self._conversations = itertools.count(1)

    @property
    def top(self) -> Frame:
        return self._stack[-1]

    def _base_attrs(self, kind: str) -> dict[str, Any]:
        return {sc.SPAN_KIND: kind, sc.EXECUTION_ORDER: next(self._order), sc.SESSION_ID: self.session_id}

    @contextmanager
    def _span(self, name: str, attrs: dict[str, Any], frame: Frame, fail: str | None) -> Iterator[Any]:
        with self.tracer.start_as_current_span(name, attributes=attrs, record_exception=False,
                                               set_status_on_exception=False) as span:
            self._stack.append(frame)
            try:
                yield span
            finally:
                self._stack.pop()
                if fail:
                    span.set_status(Status(StatusCode.ERROR, fail))
                    span.set_attribute(sc.ERROR_TYPE, "error")

    def _unique(self, short: str) -> str:
        self._names[short] += 1
        return short if self._names[short] == 1 else f"{short}_{self._names[short]}"

    def _child_order(self) -> int:
        parent = self.top
        assert parent.node is not None
        self._children[parent.node] += 1
        return min(parent.base * 1000 + self._children[parent.node], 2**31 - 1)

    @contextmanager
    def node(self, name: str, kind: str, short: str, node_type: str, order: int, attrs: dict[str, Any] | None = None,
             *, in_agent: bool = False, fail: str | None = None) -> Iterator[Any]:
        parent = self.top
        all_attrs = self._base_attrs(kind)
        all_attrs.update({sc.DAG_NODE: short, sc.DAG_NODE_TYPE: node_type, sc.DAG_DEPTH: parent.node_depth + 1,
                          sc.DAG_ORDER_INDEX: order})
        if parent.node is not None:
            all_attrs[sc.DAG_PARENT_NODE] = parent.node
        all_attrs.update(attrs or {})
        frame = Frame(short, node_type, parent.node_depth + 1, 0, order, in_agent)
        with self._span(name, all_attrs, frame, fail) as span:
            yield span

    @contextmanager
    def event(self, name: str, kind: str, attrs: dict[str, Any] | None = None, *, fail: str | None = None,
              agent: bool = False) -> Iterator[Any]:
        parent = self.top
        all_attrs = self._base_attrs(kind)
        all_attrs[sc.EVENT_DEPTH] = parent.event_depth
        if parent.node is not None:
            all_attrs[sc.DAG_NODE] = parent.node
        all_attrs.update(attrs or {})
        frame = Frame(parent.node, parent.node_type, parent.node_depth, parent.event_depth + 1, parent.base,
                      parent.in_agent or agent)
        with self._span(name, all_attrs, frame, fail) as span:
            yield span

    # --- the cmbagent vocabulary ---------------------------------------------------------------

    @contextmanager
    def workflow(self, name: str, mode: str, *, fail: str | None = None) -> Iterator[Any]:
        attrs = self._base_attrs(sc.KIND_WORKFLOW)
        attrs.update({sc.WORKFLOW_NAME: name, sc.WORKFLOW_MODE: mode, sc.WORKFLOW_TASK: TASK,
                      sc.WORKFLOW_AGENT: "engineer", sc.WORKFLOW_MODEL: "gpt-4o", sc.WORKFLOW_WORK_DIR: "/tmp/w",
                      sc.WORKFLOW_TASK_ID: f"task-{name}"})
        with self._span(f"workflow {name}", attrs, self.top, fail) as span:
            yield span

    @contextmanager
    def phase(self, name: str, *, fail: str | None = None) -> Iterator[Any]:
        index = next(self._phases)
        attrs = {sc.PHASE: name, sc.PHASE_INDEX: index}
        if name == "planning":
            with self.node("phase planning", sc.KIND_PHASE, "planning", sc.NODE_PLANNING, 0, attrs, fail=fail) as s:
                yield s
        elif name == "one_shot":
            with self.node("phase one_shot", sc.KIND_PHASE, "execute", sc.NODE_AGENT, 1, attrs, fail=fail) as s:
                yield s
        else:
            with self.node(f"phase {name}", sc.KIND_PHASE, self._unique(name), sc.NODE_CONTROL, 1000 + index, attrs,
                           fail=fail) as s:
                yield s

    @contextmanager
    def step(self, number: int, goal: str, agent: str, *, fail: str | None = None) -> Iterator[Any]:
        attrs = {sc.STEP_NUMBER: number, sc.STEP_GOAL: goal, sc.STEP_AGENT: agent,
                 sc.PHASE: "control"}
        with self.node(f"step {number}", sc.KIND_STEP, f"step_{number}", sc.NODE_AGENT, number, attrs,
                       fail=fail) as s:
            yield s

    @contextmanager
    def redo(self, number: int, attempt: int, hypothesis: str, *, fail: str | None = None) -> Iterator[Any]:
        step_node = self.top.node
        attrs = {sc.STEP_NUMBER: number, sc.BRANCH_NAME: f"redo_{attempt}", sc.BRANCH_ATTEMPT: attempt,
                 sc.BRANCH_HYPOTHESIS: hypothesis, sc.PHASE: "control"}
        with self.node(f"redo step {number} attempt {attempt}", sc.KIND_BRANCH, f"{step_node}_redo_{attempt}",
                       sc.NODE_REDO, self._child_order(), attrs, fail=fail) as s:
            yield s

    @contextmanager
    def conversation(self, initiator: str, recipient: str) -> Iterator[Any]:
        """A chat: a DAG node when it is the top of a plain AG2 program, else an event."""
        attrs = {sc.GEN_AI_AGENT_NAME: recipient, sc.CONVERSATION_INITIATOR: initiator,
                 sc.CONVERSATION_RECIPIENT: recipient, sc.CONVERSATION_MAX_TURNS: 4}
        if self.top.node is None and self.top.event_depth == 0:
            k = next(self._conversations)
            with self.node(f"conversation {recipient}", sc.KIND_CONVERSATION, f"conversation_{k}", sc.NODE_AGENT,
                           k - 1, attrs) as s:
                yield s
        else:
            with self.event(f"conversation {recipient}", sc.KIND_CONVERSATION, attrs) as s:
                yield s

    @contextmanager
    def agent(self, name: str, sender: str = "chat_manager", *, fail: str | None = None) -> Iterator[Any]:
        attrs = {sc.GEN_AI_OPERATION_NAME: sc.OP_INVOKE_AGENT, sc.GEN_AI_AGENT_NAME: name, sc.AGENT_SENDER: sender}
        top = self.top
        if top.node is not None and top.node_type in NODE_HOSTS and not top.in_agent:
            order = self._child_order()
            with self.node(f"invoke_agent {name}", sc.KIND_AGENT, self._unique(f"{top.node}_{name}"),
                           sc.NODE_SUB_AGENT, order, attrs, in_agent=True, fail=fail) as s:
                yield s
        else:
            with self.event(f"invoke_agent {name}", sc.KIND_AGENT, attrs, agent=True, fail=fail) as s:
                yield s

    def llm(self, agent: str, prompt: int, completion: int, cost: float, model: str = "gpt-4o") -> None:
        with self.event(f"chat {model}", sc.KIND_LLM, {
            sc.GEN_AI_OPERATION_NAME: sc.OP_CHAT, sc.GEN_AI_AGENT_NAME: agent, sc.GEN_AI_REQUEST_MODEL: model,
            sc.GEN_AI_RESPONSE_MODEL: model, sc.GEN_AI_USAGE_INPUT_TOKENS: prompt,
            sc.GEN_AI_USAGE_OUTPUT_TOKENS: completion, sc.LLM_COST_USD: cost,
        }):
            pass

    def code(self, exit_code: int) -> None:
        """A code execution as AG2 reports it: no agent name on the span, the executor class instead."""
        with self.event("execute_code python", sc.KIND_CODE, {
            sc.CODE_LANGUAGE: "python", sc.CODE_BLOCK_COUNT: 1, sc.CODE_EXECUTOR: "LocalCommandLineCodeExecutor",
            sc.CODE_EXIT_CODE: exit_code, sc.CODE_OUTPUT: "ok" if exit_code == 0 else "Traceback ...",
        }, fail=f"code execution exited with {exit_code}" if exit_code else None):
            pass

    def tool(self, agent: str, name: str) -> None:
        with self.event(f"execute_tool {name}", sc.KIND_TOOL, {
            sc.GEN_AI_OPERATION_NAME: sc.OP_EXECUTE_TOOL, sc.GEN_AI_AGENT_NAME: agent, sc.GEN_AI_TOOL_NAME: name,
            sc.GEN_AI_TOOL_CALL_ID: f"call_{name}", sc.GEN_AI_TOOL_TYPE: "function",
        }):
            pass

    def handoff(self, source: str, target: str) -> None:
        with self.event(f"select_speaker {source}", sc.KIND_SPEAKER_SELECTION, {
            sc.HANDOFF_FROM: source, sc.HANDOFF_TO: target, sc.HANDOFF_REASON: "auto",
            sc.HANDOFF_CANDIDATES: ("engineer", "executor", "control"),
        }):
            pass


def planning_and_control(shaper: Shaper) -> None:
    """planning -> control with 3 steps; step 2 fails, redo 1 fails, redo 2 succeeds."""
    s = shaper
    with s.workflow("planning_and_control", "planning-control"):
        with s.phase("planning"), s.conversation("admin", "planner"):
            s.handoff("none", "planner")
            with s.agent("planner"):
                s.llm("planner", 900, 300, 0.012)
            s.handoff("planner", "plan_reviewer")
            with s.agent("plan_reviewer"):
                s.llm("plan_reviewer", 700, 120, 0.006, model="gpt-4o-mini")
            with s.agent("planner"):
                s.llm("planner", 1000, 280, 0.013)
        with s.phase("control"), s.conversation("admin", "control"):
            with s.step(1, "load the Planck maps", "engineer"):
                s.handoff("control", "engineer")
                with s.agent("engineer"):
                    s.llm("engineer", 1200, 400, 0.02)
                    s.tool("engineer", "record_status")
                s.handoff("engineer", "executor")
                with s.agent("executor"):
                    s.code(0)
                with s.agent("engineer"):
                    s.llm("engineer", 1300, 100, 0.015)
            with s.step(2, "fit the six-parameter model", "engineer", fail="initial attempt failed"):
                with s.agent("engineer"):
                    s.llm("engineer", 1500, 500, 0.025)
                with s.agent("executor"):
                    s.code(1)
                with s.redo(2, 1, "use a smaller learning rate", fail="still failing"):
                    with s.agent("engineer"):
                        s.llm("engineer", 1600, 450, 0.024)
                    with s.agent("executor"):
                        s.code(1)
                with s.redo(2, 2, "switch to MCMC"):
                    with s.agent("engineer"):
                        s.llm("engineer", 1700, 520, 0.027)
                        with s.agent("researcher"):  # a nested chat inside an agent turn: an event
                            s.llm("researcher", 300, 80, 0.004, model="gpt-4o-mini")
                    with s.agent("executor"):
                        s.code(0)
            with s.step(3, "plot the residuals", "engineer"), s.agent("engineer"):
                s.llm("engineer", 800, 200, 0.01)


def control_from_plan(shaper: Shaper) -> None:
    """cmbagent.control: a stored plan's steps in a control phase, no planning phase."""
    s = shaper
    with s.workflow("control", "planning-control"), s.phase("control"), s.conversation("admin", "control"):
        for number in (1, 2):
            with s.step(number, f"task {number}", "engineer"), s.agent("engineer"):
                s.llm("engineer", 400, 100, 0.005)


def plan_stopped_at_a_failed_step(shaper: Shaper) -> None:
    """cmbagent.control whose step 1 ran out of attempts: cmbagent stops the plan there (and returns),
    step 2 never started (a zero-length step span, ``cmbagent.step.status`` "not started"), the run
    is failed."""
    s = shaper
    with s.workflow("control", "planning-control", fail="plan stopped: step 1 ran out of attempts"), \
            s.phase("control"), s.conversation("admin", "control"):
        with s.step(1, "task 1", "engineer", fail="step 1 ran out of attempts"), s.agent("engineer"):
            s.llm("engineer", 400, 100, 0.005)
        with s.node("step 2", sc.KIND_STEP, "step_2", sc.NODE_AGENT, 2,
                    {sc.STEP_NUMBER: 2, sc.STEP_GOAL: "task 2", sc.STEP_AGENT: "researcher", sc.PHASE: "control",
                     sc.STEP_STATUS: sc.STEP_NOT_STARTED}):
            pass


def one_shot(shaper: Shaper) -> None:
    s = shaper
    with s.workflow("one_shot", "one-shot"), s.phase("one_shot"), s.conversation("admin", "engineer"):
        with s.agent("engineer"):
            s.llm("engineer", 500, 150, 0.007)
        s.handoff("engineer", "executor")
        with s.agent("executor"):
            s.code(0)
        with s.agent("engineer"):
            s.llm("engineer", 400, 60, 0.005)


def plain_ag2(shaper: Shaper) -> None:
    """The README's plain AG2 program: one two-agent chat, no workflow(); its conversation is the root span."""
    s = shaper
    with s.conversation("user_proxy", "assistant"):
        for turn in range(2):
            with s.agent("assistant", sender="user_proxy"):
                s.llm("assistant", 200 + turn, 50, 0.002)
            with s.agent("user_proxy", sender="assistant"):
                s.code(0)


def plain_ag2_in_user_span(shaper: Shaper) -> None:
    """Two chats inside the application's own root span (another instrumentation's, or the user's)."""
    s = shaper
    with s.tracer.start_as_current_span("main"):
        for recipient in ("assistant", "critic"):
            with s.conversation("user_proxy", recipient), s.agent(recipient, sender="user_proxy"):
                s.llm(recipient, 100, 20, 0.001)
