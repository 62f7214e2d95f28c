"""The twenty-third fault campaign (AG2 API surface): every public way an application runs agents
with AG2's classic ``autogen`` API gives a correct span tree and DAG rows, and the application's
results are those of the uninstrumented run.

Real AG2 agents answering from scripts (the offline model client, or the loopback OpenAI-compatible
server where a group pattern rebuilds the agents' model clients); spans in memory, DAG rows in a
real SQLite file. Each scenario is run twice: uninstrumented, then instrumented, and what the
application sees is compared.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Callable
from typing import Any

import autogen
import pytest
from autogen import ConversableAgent, GroupChat, GroupChatManager
from autogen.agentchat.group import ContextVariables, ReplyResult
from autogen.io import IOStream
from opentelemetry.trace import StatusCode
from sqlalchemy import create_engine, select

import cmbagent_otel
from cmbagent_otel import semconv
from cmbagent_otel.dag.writer import T
from cmbagent_otel.testing import ExitingConsole, activate, offline_agent


# --- helpers ------------------------------------------------------------------------------------
def _visible(history: Any) -> list[tuple[Any, Any, Any]]:
    """What an application reads of a chat history (tool call ids are counters of the fake model)."""
    return [(m.get("name"), m.get("role"), m.get("content")) for m in history]


def traced(capture: Any, scenario: Callable[[], Any]) -> tuple[Any, Any]:
    """``scenario()`` uninstrumented, then instrumented into ``capture``: (plain result, traced result)."""
    plain = scenario()
    capture.exporter.clear()  # the workflow API records without instrument(): only the traced run's spans
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        result = scenario()
    finally:
        cmbagent_otel.uninstrument()
    return plain, result


def assert_one_connected_trace(capture: Any) -> None:
    spans = capture.spans
    assert spans
    assert len({s.context.trace_id for s in spans}) == 1
    ids = {s.context.span_id for s in spans}
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, [s.name for s in roots]
    assert all(s.parent is None or s.parent.span_id in ids for s in spans), "orphan spans"


def dag_rows(capture: Any, tmp_path: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(dag_nodes, execution_events) rows of the captured spans written into a fresh SQLite file."""
    url = f"sqlite:///{tmp_path}/surface.db"
    capture.write_dag(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            nodes = [dict(r) for r in conn.execute(select(T["dag_nodes"])).mappings()]
            events = [dict(r) for r in conn.execute(select(T["execution_events"])).mappings()]
    finally:
        engine.dispose()
    return nodes, events


def nodes_of(capture: Any) -> list[tuple[str, str]]:
    return [(s.attributes[semconv.DAG_NODE], s.attributes[semconv.DAG_NODE_TYPE]) for s in capture.spans
            if semconv.DAG_NODE_TYPE in s.attributes]


@pytest.fixture
def server_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Group patterns rebuild their agents' model clients: the loopback server routes by API key, which
    survives that (the offline client registered on the agent does not)."""
    monkeypatch.setenv("CMBAGENT_OTEL_OFFLINE_BACKEND", "server")


@pytest.fixture
def capture_only(capture: Any) -> Any:
    """The capture, not instrumented yet (``traced`` instruments it for the second run)."""
    return capture


# --- fixed: sequential chats started through every public name of initiate_chats -----------------
def _chat_queue() -> list[dict[str, Any]]:
    bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
    alice = offline_agent("alice", ["a1"])
    carol = offline_agent("carol", ["c1"])
    return [{"chat_id": 1, "sender": bob, "recipient": alice, "message": "m1", "max_turns": 1, "silent": True},
            {"chat_id": 2, "prerequisites": [1], "sender": bob, "recipient": carol, "message": "m2",
             "max_turns": 1, "silent": True, "summary_method": "last_msg"}]


@pytest.mark.parametrize("module, name", [
    ("autogen.agentchat", "a_initiate_chats"),
    ("autogen.agentchat.chat", "initiate_chats"),
    ("autogen.agentchat.chat", "a_initiate_chats"),
    ("autogen", "initiate_chats"),
    ("autogen.agentchat", "initiate_chats"),
])
def test_surface_sequential_chats_through_every_public_name_are_one_run(capture_only, tmp_path, module, name):
    """``from autogen.agentchat import a_initiate_chats`` (and the ``chat`` module's two) bypassed the
    wrapped names: no ``initiate_chats`` span, and each chat became a run (trace) of its own."""
    def scenario() -> Any:
        run = getattr(importlib.import_module(module), name)
        if name.startswith("a_"):
            results = asyncio.run(run(_chat_queue()))
            return [_visible(results[k].chat_history) for k in sorted(results)]
        return [_visible(r.chat_history) for r in run(_chat_queue())]

    plain, result = traced(capture_only, scenario)
    assert result == plain == [[("bob", "assistant", "m1"), ("alice", "user", "a1")],
                               [("bob", "assistant", "m2\nContext: \na1"), ("carol", "user", "c1")]]
    assert capture_only.tree() == [
        "initiate_chats bob",
        "  conversation alice",
        "    invoke_agent alice",
        "      chat scripted",
        "  conversation carol",
        "    invoke_agent carol",
        "      chat scripted",
    ]
    assert_one_connected_trace(capture_only)
    assert capture_only.one("initiate_chats bob").attributes[semconv.CONVERSATION_CHAT_COUNT] == 2
    assert nodes_of(capture_only) == [("conversation_1", "agent"), ("conversation_1_alice", "sub_agent"),
                                      ("conversation_2", "agent"), ("conversation_2_carol", "sub_agent")]


# --- fixed: an agent class asking its human its own way --------------------------------------------
class _WebUser(ConversableAgent):
    """A UI's user proxy: overrides AG2's human input methods (the input comes from elsewhere)."""

    asked: list[str]

    def get_human_input(self, prompt: str, **kwargs: Any) -> str:
        type(self).asked.append(prompt)
        return "exit"

    async def a_get_human_input(self, prompt: str, **kwargs: Any) -> str:
        type(self).asked.append(prompt)
        return "exit"


class _LoggingUser(ConversableAgent):
    """Overrides get_human_input and calls AG2's through super(): still one human-input span."""

    def get_human_input(self, prompt: str, **kwargs: Any) -> str:
        return super().get_human_input(prompt, **kwargs)


@pytest.mark.parametrize("cls, use_async", [(_WebUser, False), (_WebUser, True), (_LoggingUser, False)])
def test_surface_human_input_of_an_agent_subclass_is_traced(capture_only, cls, use_async):
    """AG2 looks ``get_human_input`` up on the agent's class: an override bypassed the patch on
    ConversableAgent, and the human's answer left no ``await_human_input`` span."""
    _WebUser.asked = []
    original = {attr: vars(cls).get(attr) for attr in ("get_human_input", "a_get_human_input")}

    def scenario() -> Any:
        alice = offline_agent("alice", ["what next?"])
        human = cls("human", llm_config=False, human_input_mode="ALWAYS")
        with IOStream.set_default(ExitingConsole()):
            if use_async:
                result = asyncio.run(human.a_initiate_chat(alice, message="start", max_turns=2, silent=True))
            else:
                result = human.initiate_chat(alice, message="start", max_turns=2, silent=True)
        return _visible(result.chat_history)

    plain, result = traced(capture_only, scenario)
    assert result == plain == [("human", "assistant", "start"), ("alice", "user", "what next?")]
    assert capture_only.tree() == [
        "conversation alice",
        "  invoke_agent alice",
        "    chat scripted",
        "  invoke_agent human",
        "    await_human_input human",
    ]
    span = capture_only.one("await_human_input human")
    assert span.attributes[semconv.GEN_AI_AGENT_NAME] == "human"
    assert span.attributes[semconv.SPAN_KIND] == semconv.KIND_HUMAN_INPUT
    if cls is _WebUser:
        assert len(_WebUser.asked) == 2  # the override answered both runs
    # uninstrument() put the subclass's own methods back
    assert {attr: vars(cls).get(attr) for attr in original} == original


class _InputGone(RuntimeError):
    pass


def test_surface_human_input_override_exception_is_recorded_and_reraised(instrumented):
    class Broken(ConversableAgent):
        def get_human_input(self, prompt: str, **kwargs: Any) -> str:
            raise _InputGone("socket closed")

    alice = offline_agent("alice", ["what next?"])
    human = Broken("human", llm_config=False, human_input_mode="ALWAYS")
    with pytest.raises(_InputGone, match="socket closed"):
        human.initiate_chat(alice, message="start", max_turns=2, silent=True)
    span = instrumented.one("await_human_input human")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[semconv.ERROR_TYPE] == "_InputGone"
    assert instrumented.one("conversation alice").status.status_code is StatusCode.ERROR


# --- fixed: an agent turn the application runs itself ------------------------------------------------
def test_surface_generate_reply_called_directly_is_a_dag_node(capture_only, tmp_path):
    """``agent.generate_reply(messages=...)`` outside any conversation: its run had no DAG node at all
    (its events hung on no node); it is now a node of type agent, ``agent_<k>``."""
    def scenario() -> Any:
        return offline_agent("alice", ["hello"]).generate_reply(messages=[{"role": "user", "content": "hi"}])

    plain, result = traced(capture_only, scenario)
    assert result == plain == "hello"
    assert capture_only.tree() == ["invoke_agent alice", "  chat scripted"]
    agent = capture_only.one("invoke_agent alice")
    assert agent.attributes[semconv.DAG_NODE] == "agent_1"
    assert agent.attributes[semconv.DAG_NODE_TYPE] == semconv.NODE_AGENT
    assert agent.attributes[semconv.DAG_ORDER_INDEX] == 1001
    assert capture_only.one("chat scripted").attributes[semconv.DAG_NODE] == "agent_1"
    nodes, events = dag_rows(capture_only, tmp_path)
    assert sorted(n["node_type"] for n in nodes) == ["agent", "terminator"]
    assert events and all(e["node_id"] is not None for e in events)


def test_surface_group_chat_manager_run_directly_keeps_its_agents_as_sub_agent_nodes(capture_only, tmp_path):
    from cmbagent_otel.demo import prepare_group

    def scenario() -> Any:
        a = offline_agent("a", ["a says"])
        b = offline_agent("b", ["b says"])
        prepare_group([a, b], str(tmp_path))
        start = {"role": "user", "content": "go", "name": "a"}
        chat = GroupChat([a, b], messages=[start], max_round=3, speaker_selection_method="round_robin")
        manager = GroupChatManager(chat, llm_config=False)
        reply = manager.generate_reply(messages=[start], sender=a)
        return reply, [m["content"] for m in chat.messages]

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert nodes_of(capture_only) == [("agent_1", "agent"), ("agent_1_b", "sub_agent"), ("agent_1_a", "sub_agent")]
    assert [(h[semconv.HANDOFF_FROM], h[semconv.HANDOFF_TO]) for h in capture_only.handoffs()] == [
        ("a", "b"), ("b", "a")]
    nodes, events = dag_rows(capture_only, tmp_path)
    assert sorted(n["node_type"] for n in nodes) == ["agent", "sub_agent", "sub_agent", "terminator"]
    assert all(e["node_id"] is not None for e in events)


def test_surface_direct_turn_running_a_nested_chat_is_one_node(capture_only):
    def scenario() -> Any:
        writer = offline_agent("writer", ["draft"])
        critic = offline_agent("critic", ["looks good"])
        reviewer = ConversableAgent("reviewer", llm_config=False, human_input_mode="NEVER")
        writer.register_nested_chats(
            [{"recipient": critic, "message": "review", "max_turns": 1, "summary_method": "last_msg"}],
            trigger=reviewer)
        return writer.generate_reply(messages=[{"role": "user", "content": "write"}], sender=reviewer)

    plain, result = traced(capture_only, scenario)
    assert result == plain == "looks good"
    assert capture_only.tree() == [
        "invoke_agent writer",
        "  initiate_chats writer",
        "    conversation critic",
        "      invoke_agent critic",
        "        chat scripted",
    ]
    assert nodes_of(capture_only) == [("agent_1", "agent")]
    assert {s.attributes[semconv.DAG_NODE] for s in capture_only.spans} == {"agent_1"}


def test_surface_direct_turns_inside_a_conversation_or_workflow_are_unchanged(instrumented):
    alice = offline_agent("alice", ["one", "two"])
    with cmbagent_otel.workflow("w"):
        alice.generate_reply(messages=[{"role": "user", "content": "hi"}])
    bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
    bob.initiate_chat(alice, message="x", max_turns=1, silent=True)
    assert nodes_of(instrumented) == [("conversation_1", "agent"), ("conversation_1_alice", "sub_agent")]


# --- held up: group chat patterns, handoffs, context variables, ReplyResult ----------------------------
def _triage_pattern(work_dir: Any) -> Any:
    """triage hands off to solver through an OnCondition (the model calls transfer_to_solver_1), solver's
    tool returns a ReplyResult routing to reviewer and updating the context, reviewer's after-work ends it."""
    from autogen.agentchat.group import (
        AgentTarget,
        OnCondition,
        StringLLMCondition,
        TerminateTarget,
    )
    from autogen.agentchat.group.patterns import DefaultPattern

    def record(value: int, context_variables: Any) -> Any:
        """Record a value."""
        context_variables["value"] = value
        return ReplyResult(target=AgentTarget(reviewer), message=f"recorded {value}",
                           context_variables=context_variables)

    triage = offline_agent("triage", [{"tool_calls": [{"name": "transfer_to_solver_1", "arguments": {}}]}])
    solver = offline_agent("solver", [{"tool_calls": [{"name": "record", "arguments": {"value": 7}}]}],
                           functions=[record])
    reviewer = offline_agent("reviewer", ["approved"])
    triage.handoffs.add_llm_condition(OnCondition(target=AgentTarget(solver), condition=StringLLMCondition("solve")))
    reviewer.handoffs.set_after_work(TerminateTarget())
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    (work_dir / "chats").mkdir(exist_ok=True)  # cmbagent_autogen saves group chats there
    return DefaultPattern(initial_agent=triage, agents=[triage, solver, reviewer], user_agent=user,
                          context_variables=ContextVariables(data={"value": 0, "work_dir": str(work_dir)}),
                          group_manager_args={"llm_config": False})


def _group_entry(entry: str, pattern: Any) -> Any:
    """Run ``pattern`` through one of AG2's four group chat entry points: what the application reads."""
    import autogen.agentchat

    run = getattr(autogen.agentchat, entry)  # by name: the run_* entry points are missing from the oldest line
    if entry == "initiate_group_chat":
        result, context, last = run(pattern=pattern, messages="go", max_rounds=10)
        return _visible(result.chat_history), context.get("value"), last.name
    if entry == "a_initiate_group_chat":
        result, context, last = asyncio.run(run(pattern=pattern, messages="go", max_rounds=10))
        return _visible(result.chat_history), context.get("value"), last.name
    if entry == "run_group_chat":
        response = run(pattern=pattern, messages="go", max_rounds=10)
        response.process()
        return response.summary, pattern.context_variables.get("value"), str(response.last_speaker)

    async def main() -> Any:
        response = await run(pattern=pattern, messages="go", max_rounds=10)
        await response.process()
        return await response.summary, pattern.context_variables.get("value"), str(await response.last_speaker)

    return asyncio.run(main())


TRIAGE_TREE = [
    "workflow w",
    "  phase control",
    "    step 1",
    "      conversation chat_manager",
    "        invoke_agent chat_manager",
    "          handoff user -> triage",
    "          invoke_agent triage",
    "            chat scripted",
    "          handoff triage -> _Group_Tool_Executor",
    "          invoke_agent _Group_Tool_Executor",
    "            execute_tool transfer_to_solver_1",
    "          handoff _Group_Tool_Executor -> solver",
    "          invoke_agent solver",
    "            chat scripted",
    "          handoff solver -> _Group_Tool_Executor",
    "          invoke_agent _Group_Tool_Executor",
    "            execute_tool record",
    "          handoff _Group_Tool_Executor -> reviewer",
    "          invoke_agent reviewer",
    "            chat scripted",
    "          handoff reviewer -> (end)",
]


@pytest.mark.parametrize("entry", ["initiate_group_chat", "a_initiate_group_chat", "run_group_chat",
                                   "a_run_group_chat"])
def test_surface_group_pattern_handoffs_through_every_entry_point(capture_only, server_backend, tmp_path, entry):
    import autogen.agentchat

    if not hasattr(autogen.agentchat, entry):  # run_group_chat and a_run_group_chat came after ag2 0.9.0
        pytest.skip(f"this AG2 line has no autogen.agentchat.{entry}")

    def scenario() -> Any:
        pattern = _triage_pattern(tmp_path)
        with cmbagent_otel.workflow("w"), cmbagent_otel.phase("control"), cmbagent_otel.step(1, "triage"):
            return _group_entry(entry, pattern)

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert result[1:] == (7, "reviewer")
    assert capture_only.tree() == TRIAGE_TREE
    assert_one_connected_trace(capture_only)
    assert all(s.status.status_code is StatusCode.UNSET for s in capture_only.spans)
    # AG2's tool runner is never a node; the three agents are sub-agent nodes of the step
    assert nodes_of(capture_only) == [("control", "control"), ("step_1", "agent"), ("step_1_triage", "sub_agent"),
                                      ("step_1_solver", "sub_agent"), ("step_1_reviewer", "sub_agent")]
    tools = [s for s in capture_only.spans if s.name.startswith("execute_tool")]
    assert [s.attributes[semconv.GEN_AI_TOOL_NAME] for s in tools] == ["transfer_to_solver_1", "record"]
    assert all(s.attributes[semconv.DAG_NODE] == "step_1" for s in tools)
    last = capture_only.handoffs()[-1]
    assert last[semconv.HANDOFF_FROM] == "reviewer" and semconv.HANDOFF_TO not in last
    nodes, events = dag_rows(capture_only, tmp_path)
    assert sorted(n["agent"] for n in nodes if n["node_type"] == "sub_agent") == ["reviewer", "solver", "triage"]
    assert "_Group_Tool_Executor" not in {n["agent"] for n in nodes}
    assert sum(e["event_type"] == "handoff" for e in events) == 6
    assert all(e["node_id"] is not None for e in events)


def test_surface_context_condition_handoff(capture_only, server_backend, tmp_path):
    from autogen.agentchat import initiate_group_chat
    from autogen.agentchat.group import (
        AgentTarget,
        ContextExpression,
        ExpressionContextCondition,
        OnContextCondition,
        TerminateTarget,
    )
    from autogen.agentchat.group.patterns import DefaultPattern

    def scenario() -> Any:
        first = offline_agent("first", ["unused"])
        second = offline_agent("second", ["second speaks"])
        first.handoffs.add_context_condition(OnContextCondition(
            target=AgentTarget(second), condition=ExpressionContextCondition(ContextExpression("${go} == True"))))
        second.handoffs.set_after_work(TerminateTarget())
        (tmp_path / "chats").mkdir(exist_ok=True)
        pattern = DefaultPattern(initial_agent=first, agents=[first, second], group_manager_args={"llm_config": False},
                                 context_variables=ContextVariables(data={"go": True, "work_dir": str(tmp_path)}))
        result, _, last = initiate_group_chat(pattern=pattern, messages="go", max_rounds=6)
        return _visible(result.chat_history), last.name

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert result[1] == "second"
    tree = capture_only.tree()
    # first hands off without asking its model: a turn with no model call
    assert tree[2:7] == ["    handoff _User -> first", "    invoke_agent first", "    handoff first -> second",
                         "    invoke_agent second", "      chat scripted"]
    assert_one_connected_trace(capture_only)
    assert nodes_of(capture_only) == [("conversation_1", "agent"), ("conversation_1_first", "sub_agent"),
                                      ("conversation_1_second", "sub_agent")]


def test_surface_auto_pattern_selection_asks_the_model_in_its_own_span(capture_only, server_backend, tmp_path):
    from autogen.agentchat import initiate_group_chat
    from autogen.agentchat.group.patterns import AutoPattern

    from cmbagent_otel.testing import shared_server

    def scenario() -> Any:
        server = shared_server()
        first = offline_agent("first", ["first speaks"])
        second = offline_agent("second", ["second speaks TERMINATE"])
        key = f"offline-selector-{id(first)}"
        server.route(key, ["second"])
        config = {"config_list": [{"model": "scripted", "api_key": key, "base_url": server.base_url}],
                  "cache_seed": None}
        (tmp_path / "chats").mkdir(exist_ok=True)
        pattern = AutoPattern(initial_agent=first, agents=[first, second],
                              context_variables=ContextVariables(data={"work_dir": str(tmp_path)}),
                              group_manager_args={"llm_config": config, "is_termination_msg":
                                                  lambda m: "TERMINATE" in str(m.get("content"))})
        result, _, last = initiate_group_chat(pattern=pattern, messages="go", max_rounds=5)
        return _visible(result.chat_history), last.name

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert result[1] == "second"
    selection = capture_only.one("select_speaker first")
    assert selection.attributes[semconv.HANDOFF_TO] == "second"
    assert capture_only.parent_of(selection).name == "invoke_agent chat_manager"
    # the selection's own model call (AG2 runs it as a two-agent chat) stays under the selection span
    inner = capture_only.one("conversation speaker_selection_agent")
    assert capture_only.parent_of(inner) is selection
    assert_one_connected_trace(capture_only)
    assert ("conversation_1_speaker_selection_agent", "sub_agent") not in nodes_of(capture_only)


# --- held up: the run APIs (a background thread or task, a response object) ----------------------------
@pytest.mark.parametrize("api", ["run", "a_run", "run_iter"])
def test_surface_run_apis_keep_the_chat_in_the_callers_trace(capture_only, api):
    if not hasattr(ConversableAgent, api):
        pytest.skip(f"this AG2 line has no ConversableAgent.{api}")

    def scenario() -> Any:
        alice = offline_agent("alice", ["hello", "more"])
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER", default_auto_reply="ok")
        with cmbagent_otel.workflow("w"):
            if api == "run":
                response = bob.run(alice, message="hi", max_turns=2, silent=True)
                response.process()
                return response.summary, _visible(response.messages)
            if api == "run_iter":
                return [type(event).__name__ for event in bob.run_iter(alice, message="hi", max_turns=2, silent=True)
                        if type(event).__name__ in ("TextEvent", "TerminationEvent")]

            async def main() -> Any:
                response = await bob.a_run(alice, message="hi", max_turns=2, silent=True)
                await response.process()
                return await response.summary, _visible(await response.messages)

            return asyncio.run(main())

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert capture_only.tree() == [
        "workflow w",
        "  conversation alice",
        "    invoke_agent alice",
        "      chat scripted",
        "    invoke_agent bob",
        "    invoke_agent alice",
        "      chat scripted",
    ]
    assert_one_connected_trace(capture_only)


def test_surface_run_error_goes_to_the_response_and_fails_the_spans(instrumented):
    """run() reports the chat's exception as an ErrorEvent on its response: the conversation's spans fail."""
    def broken(recipient: Any, messages: Any, sender: Any, config: Any) -> tuple[bool, Any]:
        raise _InputGone("reply failed")

    alice = ConversableAgent("alice", llm_config=False, human_input_mode="NEVER")
    alice.register_reply([autogen.Agent, None], broken)
    bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
    response = bob.run(alice, message="hi", max_turns=1, silent=True)
    with pytest.raises(_InputGone, match="reply failed"):
        response.process()
    for name in ("conversation alice", "invoke_agent alice"):
        span = instrumented.one(name)
        assert span.status.status_code is StatusCode.ERROR and span.attributes[semconv.ERROR_TYPE] == "_InputGone"


def test_surface_single_agent_run_with_tools(capture_only, server_backend):
    import inspect

    if "tools" not in inspect.signature(ConversableAgent.run).parameters:
        pytest.skip("this AG2 line's run() takes no tools")
    from autogen.tools import Tool

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    def scenario() -> Any:
        alice = offline_agent("alice", [])
        activate(alice, [{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}, "3 TERMINATE"])
        with cmbagent_otel.workflow("w"):
            response = alice.run(message="add", tools=[Tool(func_or_tool=add, name="add", description="add")],
                                 max_turns=2, user_input=False)
            response.process()
            return response.summary, _visible(response.messages)

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert capture_only.tree() == [
        "workflow w",
        "  conversation alice",
        "    invoke_agent alice",
        "      chat scripted",
        "    invoke_agent user",
        "      execute_tool add",
        "    invoke_agent alice",
        "      chat scripted",
    ]
    assert_one_connected_trace(capture_only)


# --- held up: tools -----------------------------------------------------------------------------------
def test_surface_parallel_tool_calls_one_failing_one_returning_an_object(capture_only):
    def ok(x: int) -> str:
        """ok"""
        return f"ok {x}"

    def bad(x: int) -> str:
        """bad"""
        raise ValueError("bad value")

    async def as_object(x: int) -> dict[str, Any]:
        """an async tool returning a dict"""
        return {"x": x, "list": [1, 2]}

    calls = {"tool_calls": [{"name": "ok", "arguments": {"x": 1}}, {"name": "bad", "arguments": {"x": 2}},
                            {"name": "as_object", "arguments": {"x": 3}}]}

    def scenario() -> Any:
        caller = offline_agent("caller", [])
        runner = ConversableAgent("runner", llm_config=False, human_input_mode="NEVER")
        caller.register_for_llm(description="ok")(ok)  # decorator form
        runner.register_for_execution()(ok)
        for tool in (bad, as_object):
            autogen.register_function(tool, caller=caller, executor=runner, description=tool.__doc__ or "")
        activate(caller, [calls, "TERMINATE"])
        result = runner.initiate_chat(caller, message="go", max_turns=2, silent=True)
        return _visible(result.chat_history)

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert "Error: bad value" in result[2][2] and "{'x': 3, 'list': [1, 2]}" in result[2][2]
    tools = [s for s in capture_only.spans if s.name.startswith("execute_tool")]
    assert [s.name for s in tools] == ["execute_tool ok", "execute_tool bad", "execute_tool as_object"]
    assert [s.status.status_code for s in tools] == [StatusCode.UNSET, StatusCode.ERROR, StatusCode.UNSET]
    assert tools[1].attributes[semconv.ERROR_TYPE] == "tool_error"
    runner_turn = capture_only.one("invoke_agent runner")
    assert all(capture_only.parent_of(s) is runner_turn for s in tools)
    assert len({s.attributes[semconv.GEN_AI_TOOL_CALL_ID] for s in tools}) == 3
    assert runner_turn.status.status_code is StatusCode.UNSET  # AG2 handled the tool's error


# --- held up: group chat shapes -----------------------------------------------------------------------
def test_surface_group_chat_manager_nested_in_another_group_chat(capture_only, tmp_path):
    from cmbagent_otel.demo import prepare_group

    def scenario() -> Any:
        a = offline_agent("a", ["a says"])
        b = offline_agent("b", ["b says"])
        c = offline_agent("c", ["c says"])
        prepare_group([a, b, c], str(tmp_path))
        inner = GroupChatManager(GroupChat([a, b], messages=[], max_round=3, speaker_selection_method="round_robin"),
                                 llm_config=False, name="inner_manager")
        outer_chat = GroupChat([c, inner], messages=[], max_round=3, speaker_selection_method="round_robin")
        outer = GroupChatManager(outer_chat, llm_config=False, name="outer_manager")
        result = c.initiate_chat(outer, message="start", max_turns=1, silent=True)
        return _visible(result.chat_history), [m["content"] for m in outer_chat.messages]

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert capture_only.tree() == [
        "conversation outer_manager",
        "  invoke_agent outer_manager",
        "    handoff c -> inner_manager",
        "    invoke_agent inner_manager",
        "      handoff outer_manager -> a",
        "      invoke_agent a",
        "        chat scripted",
        "      handoff a -> b",
        "      invoke_agent b",
        "        chat scripted",
    ]
    # both managers are transparent: the inner chat's agents are the conversation's sub-agent nodes
    assert nodes_of(capture_only) == [("conversation_1", "agent"), ("conversation_1_a", "sub_agent"),
                                      ("conversation_1_b", "sub_agent")]


def test_surface_selection_callable_returning_an_agent_then_none(capture_only, tmp_path):
    from cmbagent_otel.demo import prepare_group

    def scenario() -> Any:
        a = offline_agent("a", ["a1"])
        b = offline_agent("b", ["b1"])
        prepare_group([a, b], str(tmp_path))
        picks: list[str] = []

        def pick(last_speaker: Any, chat: Any) -> Any:
            picks.append(last_speaker.name)
            return chat.agent_by_name("b") if len(picks) == 1 else None

        chat = GroupChat([a, b], messages=[], max_round=5, speaker_selection_method=pick, allow_repeat_speaker=False)
        result = a.initiate_chat(GroupChatManager(chat, llm_config=False), message="go", max_turns=1, silent=True)
        return _visible(result.chat_history), picks

    plain, result = traced(capture_only, scenario)
    assert result == plain
    handoffs = capture_only.handoffs()
    assert [(h[semconv.HANDOFF_FROM], h.get(semconv.HANDOFF_TO), h[semconv.HANDOFF_REASON]) for h in handoffs] == [
        ("a", "b", "pick"), ("b", None, "pick")]
    assert all(semconv.ERROR_TYPE not in h for h in handoffs)
    assert all(s.status.status_code is StatusCode.UNSET for s in capture_only.spans)


def test_surface_async_nested_chats_with_reflection_summary(capture_only, server_backend):
    def scenario() -> Any:
        writer = offline_agent("writer", ["draft", "TERMINATE"])
        critic = offline_agent("critic", ["looks good", "summary of the review"])
        reviewer = ConversableAgent("reviewer", llm_config=False, human_input_mode="NEVER")
        writer.register_nested_chats(
            [{"chat_id": 1, "recipient": critic, "message": "review", "max_turns": 1,
              "summary_method": "reflection_with_llm"}], trigger=reviewer, use_async=True)
        result = asyncio.run(reviewer.a_initiate_chat(writer, message="write", max_turns=1, silent=True))
        return _visible(result.chat_history)

    plain, result = traced(capture_only, scenario)
    assert result == plain
    tree = capture_only.tree()
    assert tree[:5] == ["conversation writer", "  invoke_agent writer", "    initiate_chats writer",
                        "      conversation critic", "        invoke_agent critic"]
    nested = capture_only.one("conversation critic")
    # the reflection summary's model call belongs to the nested conversation
    summaries = [s for s in capture_only.spans if s.name == "chat scripted" and capture_only.parent_of(s) is nested]
    assert len(summaries) == 1
    assert_one_connected_trace(capture_only)


def test_surface_llm_config_object(instrumented):
    from autogen import LLMConfig

    from cmbagent_otel.testing import FakeOpenAIServer

    with FakeOpenAIServer(script=["hi there"]) as server:
        entry = {"model": "gpt-4o-mini", "api_key": "sk-surface-llmconfig-0000000000", "base_url": server.base_url}
        try:  # ag2 0.14 takes the entries positionally, cmbagent_autogen (an older line) as config_list
            config = LLMConfig(entry, temperature=0.3, cache_seed=None)
        except TypeError:
            config = LLMConfig(config_list=[entry], temperature=0.3, cache_seed=None)
        alice = ConversableAgent("alice", llm_config=config, human_input_mode="NEVER")
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
        assert bob.initiate_chat(alice, message="x", max_turns=1, silent=True).summary == "hi there"
    agent = instrumented.one("invoke_agent alice")
    assert agent.attributes[semconv.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    assert agent.attributes[semconv.GEN_AI_PROVIDER_NAME] == "openai"
    chat = instrumented.one("chat gpt-4o-mini")
    assert chat.attributes[semconv.GEN_AI_REQUEST_TEMPERATURE] == 0.3
    assert chat.attributes[semconv.SERVER_ADDRESS] == "127.0.0.1"
    assert "sk-surface-llmconfig" not in json.dumps([dict(s.attributes) for s in instrumented.spans])


# --- held up: next to AG2's own OpenTelemetry instrumentation ---------------------------------------------
@pytest.mark.parametrize("order", ["ag2_first", "ours_first"])
def test_surface_next_to_ag2_builtin_instrumentation(capture, order):
    """AG2 0.14 ships ``autogen.opentelemetry`` (per-agent wrappers, a replaced OpenAIWrapper.create):
    with it on, in either order, ours' spans keep their tree and DAG nodes."""
    ag2_otel = pytest.importorskip("autogen.opentelemetry", reason="this AG2 line has no built-in instrumentation")
    from autogen.oai import client as oai_client

    def chat() -> Any:
        alice = offline_agent("alice", [])
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")

        def add(a: int, b: int) -> int:
            return a + b

        autogen.register_function(add, caller=alice, executor=bob, description="add")
        activate(alice, [{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}, "TERMINATE"])
        return alice, bob

    def ours_only(spans: list[Any]) -> list[tuple[str, Any]]:
        return [(s.name, s.attributes.get(semconv.DAG_NODE)) for s in spans
                if s.instrumentation_scope.name.startswith("cmbagent_otel")]

    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        alice, bob = chat()
        bob.initiate_chat(alice, message="x", max_turns=2, silent=True)
    finally:
        cmbagent_otel.uninstrument()
    alone = ours_only(capture.spans)
    capture.exporter.clear()
    create = oai_client.OpenAIWrapper.__dict__["create"]
    try:
        if order == "ag2_first":
            ag2_otel.instrument_llm_wrapper(tracer_provider=capture.provider)
        cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
        if order == "ours_first":
            ag2_otel.instrument_llm_wrapper(tracer_provider=capture.provider)
        alice, bob = chat()
        for agent in (alice, bob):
            ag2_otel.instrument_agent(agent, tracer_provider=capture.provider)
        result = bob.initiate_chat(alice, message="x", max_turns=2, silent=True)
    finally:
        cmbagent_otel.uninstrument()
        oai_client.OpenAIWrapper.create = create
    assert "3" in json.dumps(result.chat_history)
    spans = capture.spans
    assert len(spans) > len(alone)  # AG2's spans are there too
    assert ours_only(spans) == alone


# --- held up: the swarm API of cmbagent_autogen -----------------------------------------------------------
def test_surface_swarm_chat_in_a_step(capture_only, server_backend, tmp_path):
    swarm = pytest.importorskip("autogen.agentchat.contrib.swarm_agent",
                                reason="this AG2 line has no swarm API (ag2 0.14 removed it; cmbagent_autogen has it)")

    def scenario() -> Any:
        def record(value: int, context_variables: Any) -> Any:
            """Record a value."""
            context_variables["value"] = value
            return swarm.SwarmResult(values=f"recorded {value}", agent="reviewer", context_variables=context_variables)

        triage = offline_agent("triage", [{"tool_calls": [{"name": "transfer_triage_to_solver", "arguments": {}}]}])
        solver = offline_agent("solver", [{"tool_calls": [{"name": "record", "arguments": {"value": 7}}]}],
                               functions=[record])
        reviewer = offline_agent("reviewer", ["approved"])
        swarm.register_hand_off(triage, [swarm.OnCondition(target=solver, condition="solve")])
        swarm.register_hand_off(reviewer, [swarm.AfterWork(swarm.AfterWorkOption.TERMINATE)])
        (tmp_path / "chats").mkdir(exist_ok=True)
        with cmbagent_otel.workflow("w"), cmbagent_otel.phase("control"), cmbagent_otel.step(1, "triage"):
            result, context, last = swarm.initiate_swarm_chat(
                initial_agent=triage, agents=[triage, solver, reviewer], messages="go", max_rounds=10,
                context_variables=ContextVariables(data={"value": 0, "work_dir": str(tmp_path)}))
        return _visible(result.chat_history), context.get("value"), last.name

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert result[1:] == (7, "reviewer")
    assert [line.replace("_Swarm_Tool_Executor", "_Group_Tool_Executor").replace("transfer_triage_to_solver",
                                                                                "transfer_to_solver_1")
            .replace("_User", "user") for line in capture_only.tree()] == TRIAGE_TREE
    assert nodes_of(capture_only) == [("control", "control"), ("step_1", "agent"), ("step_1_triage", "sub_agent"),
                                      ("step_1_solver", "sub_agent"), ("step_1_reviewer", "sub_agent")]


# --- held up: more ways to run a turn or stop a chat --------------------------------------------------
def test_surface_run_with_the_human_answering_through_the_response_events(capture_only):
    """run() asks the human through its response's events (another thread answers): the question is an
    await_human_input span of the chat's trace, under the human's turn."""
    def scenario() -> Any:
        alice = offline_agent("alice", ["what next?"])
        human = ConversableAgent("human", llm_config=False, human_input_mode="ALWAYS")
        with cmbagent_otel.workflow("w"):
            response = human.run(alice, message="start", max_turns=2, silent=True)
            asked = []
            for event in response.events:
                if getattr(event, "type", None) == "input_request":
                    asked.append(event.content.prompt)
                    event.content.respond("exit")
            return asked, _visible(response.messages)

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert len(result[0]) == 1
    human_input = capture_only.one("await_human_input human")
    assert capture_only.parent_of(human_input).name == "invoke_agent human"
    assert_one_connected_trace(capture_only)


def test_surface_a_generate_reply_called_directly_is_a_dag_node(capture_only):
    def scenario() -> Any:
        agent = offline_agent("alice", ["hello"])
        return asyncio.run(agent.a_generate_reply(messages=[{"role": "user", "content": "hi"}]))

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert capture_only.tree() == ["invoke_agent alice", "  chat scripted"]
    assert nodes_of(capture_only) == [("agent_1", "agent")]


@pytest.mark.parametrize("stop", ["is_termination_msg", "max_consecutive_auto_reply"])
def test_surface_chat_stops(capture_only, stop):
    def scenario() -> Any:
        alice = offline_agent("alice", ["one", "two DONE", "three", "four"])
        options: dict[str, Any] = ({"is_termination_msg": lambda m: "DONE" in str(m.get("content"))}
                                   if stop == "is_termination_msg" else {"max_consecutive_auto_reply": 1})
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER", default_auto_reply="ok", **options)
        return _visible(bob.initiate_chat(alice, message="x", silent=True).chat_history)

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert [m[2] for m in result] == ["x", "one", "ok", "two DONE"]
    # bob's last turn decided to stop: a turn without a reply, the chat ends there
    assert capture_only.tree()[-1] == "  invoke_agent bob"
    assert all(s.status.status_code is StatusCode.UNSET for s in capture_only.spans)


def test_surface_group_pattern_content_is_valid_json_of_its_schema(capture, server_backend, tmp_path):
    """Content capture through handoffs, ReplyResult tool results and context variables."""
    import jsonschema
    from semconv.genai_schema import BY_ATTRIBUTE

    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False, capture_content=True)
    try:
        _group_entry("initiate_group_chat", _triage_pattern(tmp_path))
    finally:
        cmbagent_otel.uninstrument()
    seen = set()
    for span in capture.spans:
        for key, schema in BY_ATTRIBUTE.items():
            if key in span.attributes:
                jsonschema.validate(json.loads(span.attributes[key]), schema)
                seen.add(key)
    assert {semconv.GEN_AI_INPUT_MESSAGES, semconv.GEN_AI_OUTPUT_MESSAGES, semconv.GEN_AI_TOOL_CALL_ARGUMENTS,
            semconv.GEN_AI_TOOL_CALL_RESULT} <= seen
    record = capture.one("execute_tool record")
    assert json.loads(record.attributes[semconv.GEN_AI_TOOL_CALL_RESULT]) == "recorded 7"


# --- held up: the human choosing the next speaker -------------------------------------------------------
class _Picker(ExitingConsole):
    """An IOStream whose human picks the second candidate when asked for the next speaker."""

    prompts: list[str] = []

    def input(self, prompt: str = "", *, password: bool = False) -> str:
        type(self).prompts.append(prompt)
        return "2"


class _GonePicker(ExitingConsole):
    def input(self, prompt: str = "", *, password: bool = False) -> str:
        raise _InputGone("console closed")


def _manual_group(tmp_path: Any) -> tuple[Any, Any]:
    from cmbagent_otel.demo import prepare_group

    a = offline_agent("a", ["a1", "a2"])
    b = offline_agent("b", ["b1 TERMINATE"])
    prepare_group([a, b], str(tmp_path))
    chat = GroupChat([a, b], messages=[], max_round=3, speaker_selection_method="manual")
    def ends(message: dict[str, Any]) -> bool:
        return "TERMINATE" in str(message.get("content"))

    return a, GroupChatManager(chat, llm_config=False, is_termination_msg=ends)


@pytest.mark.parametrize("use_async", [False, True])
def test_surface_manual_speaker_selection_is_a_handoff_event(capture_only, tmp_path, use_async):
    """``speaker_selection_method="manual"``: AG2 asks the human (its IOStream) for the next speaker.
    Issue 13 lists ``manual`` among the selections that do no work of their own: a
    ``cmbagent.handoff`` event on the manager's span (reason ``manual``, ``.to`` the agent picked),
    in sync and async chats alike, and what the application reads is unchanged."""
    def scenario() -> Any:
        _Picker.prompts = []
        a, manager = _manual_group(tmp_path)
        with IOStream.set_default(_Picker()):
            if use_async:
                result = asyncio.run(a.a_initiate_chat(manager, message="go", max_turns=1, silent=True))
            else:
                result = a.initiate_chat(manager, message="go", max_turns=1, silent=True)
        return _visible(result.chat_history), [m["content"] for m in manager.groupchat.messages], len(_Picker.prompts)

    plain, result = traced(capture_only, scenario)
    assert result == plain
    assert result[1] == ["go", "b1 TERMINATE"] and result[2] == 1
    assert capture_only.tree() == [
        "conversation chat_manager",
        "  invoke_agent chat_manager",
        "    handoff a -> b",
        "    invoke_agent b",
        "      chat scripted",
    ]
    manager_span = capture_only.one("invoke_agent chat_manager")
    [handoff] = capture_only.handoffs()
    assert handoff["span"] is manager_span
    assert handoff[semconv.SPAN_KIND] == semconv.KIND_SPEAKER_SELECTION
    assert handoff[semconv.HANDOFF_REASON] == "manual"
    assert handoff[semconv.HANDOFF_TO] == "b"
    assert handoff[semconv.HANDOFF_CANDIDATES] == ("a", "b")


def test_surface_manual_speaker_selection_failing_is_recorded_and_reraised(instrumented, tmp_path):
    a, manager = _manual_group(tmp_path)
    with IOStream.set_default(_GonePicker()), pytest.raises(_InputGone, match="console closed"):
        a.initiate_chat(manager, message="go", max_turns=1, silent=True)
    manager_span = instrumented.one("invoke_agent chat_manager")
    assert manager_span.status.status_code is StatusCode.ERROR
    [handoff] = instrumented.handoffs()
    assert handoff["span"] is manager_span
    assert handoff[semconv.HANDOFF_REASON] == "manual"
    assert handoff[semconv.ERROR_TYPE] == "_InputGone"
