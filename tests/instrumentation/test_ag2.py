"""AG2 instrumentor: real agents and group chats, offline model client or loopback OpenAI server."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from types import MappingProxyType, SimpleNamespace
from typing import Any

import autogen
import pytest
from autogen import ConversableAgent, GroupChat, GroupChatManager
from autogen.agentchat import conversable_agent, groupchat
from autogen.coding import LocalCommandLineCodeExecutor
from autogen.oai import client as oai_client
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import StatusCode

import cmbagent_otel
from cmbagent_otel import semconv
from cmbagent_otel.demo import group_chat_step, order_speakers, prepare_group
from cmbagent_otel.instrumentation.ag2 import AG2Instrumentor
from cmbagent_otel.testing import (
    ExitingConsole,
    FakeOpenAIServer,
    ScriptedModelClient,
    activate,
    offline_agent,
    offline_backend,
)
from tests.conftest import custom_client_config, custom_client_key


def scripted(name: str, script: list[Any], **kwargs: Any) -> ConversableAgent:
    return offline_agent(name, script, **kwargs)


EXPECTED_PROVIDER = "ag2.custom_client" if offline_backend() == "client" else "openai"


FOUR_AGENT_TREE = [
    "conversation chat_manager",
    "  invoke_agent chat_manager",
    "    handoff control -> engineer",
    "    invoke_agent engineer",
    "      chat scripted",
    "    handoff engineer -> executor",
    "    invoke_agent executor",
    "      execute_tool peak_position",
    "    handoff executor -> engineer",
    "    invoke_agent engineer",
    "      chat scripted",
    "    handoff engineer -> executor",
    "    invoke_agent executor",
    "      execute_code python",
    "    handoff executor -> researcher",
    "    invoke_agent researcher",
    "      chat scripted",
]


def run_four_agent_chat(tmp_path: Any) -> Any:
    return group_chat_step(
        str(tmp_path),
        [{"tool_calls": [{"name": "peak_position", "arguments": {"multipole": 2}}]},
         "```python\nprint('peaks at 220, 540')\n```"],
        ["engineer", "executor", "engineer", "executor", "researcher"],
    )


def test_four_agent_group_chat_with_tool_and_code(instrumented, tmp_path):
    result = run_four_agent_chat(tmp_path)
    assert "TERMINATE" in result.chat_history[-1]["content"]
    assert instrumented.tree() == FOUR_AGENT_TREE

    spans = instrumented.spans
    conversation = instrumented.one("conversation chat_manager")
    conversation_id = conversation.attributes[semconv.GEN_AI_CONVERSATION_ID]
    assert isinstance(conversation_id, str) and len(conversation_id) == 32
    # every span of the chat carries the conversation id, not only the root
    assert {s.attributes.get(semconv.GEN_AI_CONVERSATION_ID) for s in spans} == {conversation_id}
    # one trace, execution order strictly increasing with start order
    assert len({s.context.trace_id for s in spans}) == 1
    orders = [s.attributes[semconv.EXECUTION_ORDER] for s in spans]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)

    agent = instrumented.named("invoke_agent engineer")[0]
    assert agent.attributes[semconv.GEN_AI_OPERATION_NAME] == "invoke_agent"
    assert agent.attributes[semconv.GEN_AI_AGENT_NAME] == "engineer"
    assert agent.attributes[semconv.AGENT_SENDER] == "chat_manager"

    chat = instrumented.named("chat scripted")[0]
    attrs = chat.attributes
    assert attrs[semconv.GEN_AI_OPERATION_NAME] == "chat"
    assert attrs[semconv.GEN_AI_PROVIDER_NAME] == EXPECTED_PROVIDER
    assert attrs[semconv.GEN_AI_REQUEST_MODEL] == "scripted"
    assert attrs[semconv.GEN_AI_RESPONSE_MODEL] == "scripted"
    assert isinstance(attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS], int) and attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] > 0
    assert isinstance(attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS], int)
    assert isinstance(attrs[semconv.LLM_COST_USD], float)
    if offline_backend() == "client":  # the OpenAI path prices the unknown model at 0
        assert attrs[semconv.LLM_COST_USD] > 0
    assert attrs[semconv.GEN_AI_RESPONSE_FINISH_REASONS] == ("tool_calls",)
    assert instrumented.parent_of(chat) is agent

    tool = instrumented.one("execute_tool peak_position")
    assert tool.attributes[semconv.GEN_AI_OPERATION_NAME] == "execute_tool"
    assert tool.attributes[semconv.GEN_AI_TOOL_NAME] == "peak_position"
    assert tool.attributes[semconv.GEN_AI_TOOL_CALL_ID].startswith("call_")
    assert tool.status.status_code is StatusCode.UNSET

    code = instrumented.one("execute_code python")
    assert code.attributes[semconv.CODE_LANGUAGE] == "python"
    assert code.attributes[semconv.CODE_EXIT_CODE] == 0
    assert code.attributes[semconv.CODE_BLOCK_COUNT] == 1
    assert "peaks at 220, 540" in code.attributes[semconv.CODE_OUTPUT]
    assert code.attributes[semconv.CODE_EXECUTOR] == "LocalCommandLineCodeExecutor"

    # speaker selections that do not ask the model are events on the manager's span, not spans
    assert not instrumented.named("select_speaker")
    manager = instrumented.one("invoke_agent chat_manager")
    handoffs = instrumented.handoffs()
    assert [(h[semconv.HANDOFF_FROM], h[semconv.HANDOFF_TO]) for h in handoffs] == [
        ("control", "engineer"), ("engineer", "executor"), ("executor", "engineer"), ("engineer", "executor"),
        ("executor", "researcher")]
    handoff = handoffs[1]
    assert handoff["span"] is manager
    assert handoff[semconv.SPAN_KIND] == semconv.KIND_SPEAKER_SELECTION
    assert handoff[semconv.HANDOFF_REASON] == "scripted_handoff"
    assert handoff[semconv.HANDOFF_CANDIDATES] == ("control", "engineer", "executor", "researcher")
    assert handoff[semconv.EVENT_DEPTH] == manager.attributes[semconv.EVENT_DEPTH] + 1
    # handoffs take their place in the run's execution order, between the turns they separate
    engineer_turns = instrumented.named("invoke_agent engineer")
    executor_turns = instrumented.named("invoke_agent executor")
    assert (engineer_turns[0].attributes[semconv.EXECUTION_ORDER] < handoff[semconv.EXECUTION_ORDER]
            < executor_turns[0].attributes[semconv.EXECUTION_ORDER])
    all_orders = orders + [h[semconv.EXECUTION_ORDER] for h in handoffs]
    assert len(set(all_orders)) == len(all_orders)


def test_agents_built_before_instrument_are_traced(capture, tmp_path):
    alice = scripted("alice", ["hello", "TERMINATE"])
    bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER", default_auto_reply="ok")
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        bob.initiate_chat(alice, message="hi", max_turns=2, silent=True)
    finally:
        cmbagent_otel.uninstrument()
    assert capture.tree() == [
        "conversation alice",
        "  invoke_agent alice",
        "    chat scripted",
        "  invoke_agent bob",
        "  invoke_agent alice",
        "    chat scripted",
    ]


def test_openai_client_path_over_loopback(instrumented):
    with FakeOpenAIServer(script=["The answer is 42.", "TERMINATE"]) as server:
        config = {"config_list": [{"model": "gpt-4o-mini", "api_key": "sk-test-loopback-key-000000",
                                   "base_url": server.base_url}], "cache_seed": None, "temperature": 0.2}
        assistant = ConversableAgent("assistant", llm_config=config, human_input_mode="NEVER")
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", default_auto_reply="thanks")
        user.initiate_chat(assistant, message="question?", max_turns=2, silent=True)
        assert len(server.requests) == 2
    chats = instrumented.named("chat gpt-4o-mini")
    assert len(chats) == 2
    attrs = chats[0].attributes
    assert attrs[semconv.GEN_AI_PROVIDER_NAME] == "openai"
    assert attrs[semconv.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    assert attrs[semconv.GEN_AI_RESPONSE_ID].startswith("chatcmpl-")
    assert attrs[semconv.GEN_AI_REQUEST_TEMPERATURE] == 0.2
    assert attrs[semconv.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)
    assert attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] > 0 and attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] > 0
    for span in instrumented.spans:
        assert "sk-test-loopback-key" not in json.dumps(dict(span.attributes), default=str)
        # content capture is off by default
        assert semconv.GEN_AI_INPUT_MESSAGES not in span.attributes
        assert semconv.GEN_AI_OUTPUT_MESSAGES not in span.attributes


def test_llm_error_marks_span_and_propagates_unchanged(instrumented):
    with FakeOpenAIServer(status=400) as server:
        config = {"config_list": [{"model": "gpt-4o-mini", "api_key": "sk-test-loopback-key-111111",
                                   "base_url": server.base_url}], "cache_seed": None}
        assistant = ConversableAgent("assistant", llm_config=config, human_input_mode="NEVER")
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
        import openai

        with pytest.raises(openai.BadRequestError) as raised:
            user.initiate_chat(assistant, message="question?", max_turns=1, silent=True)
    chat = instrumented.one("chat gpt-4o-mini")
    assert chat.status.status_code is StatusCode.ERROR
    assert chat.attributes[semconv.ERROR_TYPE] == "BadRequestError"
    assert chat.events[0].name == "exception"
    # the exception recorded is the one the app sees, and it fails every enclosing span
    assert raised.value.__class__.__name__ in chat.status.description
    assert instrumented.one("invoke_agent assistant").status.status_code is StatusCode.ERROR
    assert instrumented.one("conversation assistant").status.status_code is StatusCode.ERROR


def test_failed_tool_and_failing_code_set_error_status(instrumented, tmp_path):
    executor = ConversableAgent(
        "executor", llm_config=False, human_input_mode="NEVER",
        code_execution_config={"executor": LocalCommandLineCodeExecutor(work_dir=str(tmp_path))},
    )

    def divide(a: int, b: int) -> float:
        return a / b

    script = [
        {"tool_calls": [{"name": "divide", "arguments": {"a": 1, "b": 0}}]},
        "```python\nimport sys\nprint('boom')\nsys.exit(7)\n```",
        "TERMINATE",
    ]
    engineer = offline_agent("engineer", script)
    autogen.register_function(divide, caller=engineer, executor=executor, description="divide")
    activate(engineer, script)
    executor.initiate_chat(engineer, message="go", max_turns=3, silent=True)
    tool = instrumented.one("execute_tool divide")
    assert tool.status.status_code is StatusCode.ERROR
    assert "division by zero" in tool.status.description
    code = instrumented.one("execute_code python")
    assert code.status.status_code is StatusCode.ERROR
    assert code.attributes[semconv.CODE_EXIT_CODE] == 7
    assert "boom" in code.attributes[semconv.CODE_OUTPUT]


def test_content_capture_is_opt_in_and_bounded(capture, monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    monkeypatch.setenv("CMBAGENT_OTEL_MAX_ATTRIBUTE_LENGTH", "200")
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        alice = scripted("alice", ["x" * 1000])
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
        bob.initiate_chat(alice, message="tell me", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
        monkeypatch.delenv("CMBAGENT_OTEL_MAX_ATTRIBUTE_LENGTH")
        from cmbagent_otel.redaction import reload_settings

        reload_settings()
    chat = capture.one("chat scripted")
    assert json.loads(chat.attributes[semconv.GEN_AI_INPUT_MESSAGES]) == [
        {"role": "user", "name": "bob", "parts": [{"type": "text", "content": "tell me"}]}]
    output = chat.attributes[semconv.GEN_AI_OUTPUT_MESSAGES]
    assert len(output) <= 200
    (message,) = json.loads(output)  # cut inside the message, still valid JSON
    assert message["role"] == "assistant" and message["finish_reason"] == "stop"
    text = message["parts"][0]["content"]
    assert text.startswith("xxx") and text.endswith("...[truncated]")
    assert json.loads(capture.one("conversation alice").attributes[semconv.GEN_AI_INPUT_MESSAGES]) == [
        {"role": "user", "name": "bob", "parts": [{"type": "text", "content": "tell me"}]}]


def test_suppressed_instrumentation_calls_through(instrumented):
    alice = scripted("alice", ["hi"])
    bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
    with suppress_instrumentation():
        result = bob.initiate_chat(alice, message="hello", max_turns=1, silent=True)
    assert result.chat_history[-1]["content"] == "hi"
    assert instrumented.spans == []


def test_uninstrument_restores_every_patched_attribute_by_identity(capture):
    owners = {
        "ConversableAgent": conversable_agent.ConversableAgent,
        "GroupChat": groupchat.GroupChat,
        "OpenAIWrapper": oai_client.OpenAIWrapper,
        "LocalCommandLineCodeExecutor": LocalCommandLineCodeExecutor,
    }
    before = {(name, attr): value for name, owner in owners.items() for attr, value in vars(owner).items()}
    module_before = dict(vars(conversable_agent))
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    patched = AG2Instrumentor().patched
    try:
        assert len(patched) >= 12
        assert conversable_agent.ConversableAgent.__dict__["generate_reply"] is not before[
            ("ConversableAgent", "generate_reply")]
        # instrument() is idempotent: a second call patches nothing twice
        assert cmbagent_otel.instrument(tracer_provider=capture.provider) is capture.provider
        assert AG2Instrumentor().patched == patched
    finally:
        cmbagent_otel.uninstrument()
    after = {(name, attr): value for name, owner in owners.items() for attr, value in vars(owner).items()}
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key] is value, key
    for name, value in module_before.items():
        assert vars(conversable_agent)[name] is value, name
    alice = scripted("alice", ["hi"])
    ConversableAgent("bob", llm_config=False, human_input_mode="NEVER").initiate_chat(
        alice, message="x", max_turns=1, silent=True)
    assert capture.spans == []


def test_async_chat_and_async_tools(instrumented):
    async def lookup(key: str) -> str:
        return f"value-of-{key}"

    script = [{"tool_calls": [{"name": "lookup", "arguments": {"key": "h0"}}]}, "TERMINATE"]
    caller = offline_agent("caller", script)
    runner = ConversableAgent("runner", llm_config=False, human_input_mode="NEVER")
    autogen.register_function(lookup, caller=caller, executor=runner, description="lookup")
    activate(caller, script)

    async def main() -> Any:
        return await runner.a_initiate_chat(caller, message="find h0", max_turns=2, silent=True)

    result = asyncio.run(main())
    assert "value-of-h0" in json.dumps(result.chat_history)
    tree = instrumented.tree()
    assert tree[0] == "conversation caller"
    assert "  invoke_agent runner" in tree
    assert "    execute_tool lookup" in tree
    assert len({s.context.trace_id for s in instrumented.spans}) == 1


def test_nested_chats_are_traced(instrumented):
    writer = scripted("writer", ["draft text", "TERMINATE"])
    critic = scripted("critic", ["looks good"])
    reviewer = ConversableAgent("reviewer", llm_config=False, human_input_mode="NEVER")
    writer.register_nested_chats(
        [{"recipient": critic, "message": "review this", "max_turns": 1, "summary_method": "last_msg"}],
        trigger=reviewer,
    )
    reviewer.initiate_chat(writer, message="write", max_turns=1, silent=True)
    tree = instrumented.tree()
    assert tree[:2] == ["conversation writer", "  invoke_agent writer"]
    assert "    initiate_chats writer" in tree
    assert "      conversation critic" in tree
    nested = instrumented.one("conversation critic")
    outer = instrumented.one("conversation writer")
    # a nested chat is a conversation of its own
    assert nested.attributes[semconv.GEN_AI_CONVERSATION_ID] != outer.attributes[semconv.GEN_AI_CONVERSATION_ID]


def test_human_input_is_traced_without_content_by_default(instrumented):
    from autogen.io import IOStream

    alice = scripted("alice", ["what next?"])
    human = ConversableAgent("human", llm_config=False, human_input_mode="ALWAYS")
    with IOStream.set_default(ExitingConsole()):
        human.initiate_chat(alice, message="start", max_turns=2)
    span = instrumented.one("await_human_input human")
    assert span.attributes[semconv.GEN_AI_AGENT_NAME] == "human"
    assert semconv.HUMAN_INPUT_RESPONSE not in span.attributes


def test_round_robin_selection_reason_and_targets(instrumented, tmp_path):
    first = scripted("first", ["one"])
    second = scripted("second", ["two TERMINATE"])
    prepare_group([first, second], str(tmp_path))
    chat = GroupChat([first, second], messages=[], max_round=3, speaker_selection_method="round_robin")
    manager = GroupChatManager(chat, llm_config=False,
                               is_termination_msg=lambda m: "TERMINATE" in str(m.get("content")))
    first.initiate_chat(manager, message="begin", max_turns=1, silent=True)
    assert not instrumented.named("select_speaker")
    selections = instrumented.handoffs()
    assert [s[semconv.HANDOFF_TO] for s in selections] == ["second"]
    assert selections[0][semconv.HANDOFF_FROM] == "first"
    assert selections[0][semconv.HANDOFF_REASON] == "round_robin"
    assert selections[0]["span"].name == "invoke_agent chat_manager"


def test_auto_selection_asks_the_model_in_its_own_span(instrumented, tmp_path):
    first = scripted("first", ["one"])
    second = scripted("second", ["two"])
    third = scripted("third", ["three TERMINATE"])
    prepare_group([first, second, third], str(tmp_path))
    with FakeOpenAIServer(script=["second", "third"]) as server:
        config = {"model": "gpt-4o-mini", "api_key": "sk-test-auto-selection-0000", "base_url": server.base_url}
        chat = GroupChat([first, second, third], messages=[], max_round=4, speaker_selection_method="auto")
        manager = GroupChatManager(chat, llm_config={"config_list": [config], "cache_seed": None},
                                   is_termination_msg=lambda m: "TERMINATE" in str(m.get("content")))
        first.initiate_chat(manager, message="begin", max_turns=1, silent=True)
    assert [m["content"] for m in chat.messages] == ["begin", "two", "three TERMINATE"]
    selections = instrumented.named("select_speaker")
    assert [s.name for s in selections] == ["select_speaker first", "select_speaker second"]
    assert [s.attributes[semconv.HANDOFF_TO] for s in selections] == ["second", "third"]
    assert selections[0].attributes[semconv.HANDOFF_REASON] == "auto"
    assert selections[0].attributes[semconv.HANDOFF_CANDIDATES] == ("first", "second", "third")
    manager_span = instrumented.one("invoke_agent chat_manager")
    assert all(instrumented.parent_of(s) is manager_span for s in selections)
    # the model calls of the selection stay under its span; no handoff event doubles it
    for selection in selections:
        below = [s for s in instrumented.spans if _descends(instrumented, s, selection)]
        assert any(s.name == "chat gpt-4o-mini" for s in below)
    assert [h["span"] for h in instrumented.handoffs()] == selections
    assert not manager_span.events


def test_async_group_chat_handoffs_and_auto_selection(instrumented, tmp_path):
    """a_select_speaker / a_auto_select_speaker: the same two forms as the sync path."""
    first = scripted("first", ["one"])
    second = scripted("second", ["two"])
    third = scripted("third", ["three TERMINATE"])
    prepare_group([first, second, third], str(tmp_path))
    with FakeOpenAIServer(script=["third"]) as server:
        config = {"model": "gpt-4o-mini", "api_key": "sk-test-async-selection-000", "base_url": server.base_url}

        def route(last_speaker: Any, chat: Any) -> Any:  # a handoff, then the model decides
            return second if last_speaker is first else "auto"

        chat = GroupChat([first, second, third], messages=[], max_round=4, speaker_selection_method=route)
        manager = GroupChatManager(chat, llm_config={"config_list": [config], "cache_seed": None},
                                   is_termination_msg=lambda m: "TERMINATE" in str(m.get("content")))
        asyncio.run(first.a_initiate_chat(manager, message="begin", max_turns=1, silent=True))
    assert [m["content"] for m in chat.messages] == ["begin", "two", "three TERMINATE"]
    handoffs = instrumented.handoffs()
    assert [(h[semconv.HANDOFF_FROM], h[semconv.HANDOFF_TO]) for h in handoffs] == [
        ("first", "second"), ("second", "third")]
    event, span = handoffs
    assert event["span"].name == "invoke_agent chat_manager" and event[semconv.HANDOFF_REASON] == "route"
    assert span["span"].name == "select_speaker second"  # the model was asked: a span
    assert any(s.name == "chat gpt-4o-mini" and _descends(instrumented, s, span["span"]) for s in instrumented.spans)


def _descends(capture: Any, span: Any, ancestor: Any) -> bool:
    parent = capture.parent_of(span)
    while parent is not None:
        if parent is ancestor:
            return True
        parent = capture.parent_of(parent)
    return False


def test_handoffs_past_the_span_event_limit_become_spans(capture, tmp_path, monkeypatch):
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    limited = TracerProvider(span_limits=SpanLimits(max_events=6))
    limited.add_span_processor(SimpleSpanProcessor(capture.exporter))
    first = scripted("first", ["one"] * 10)
    second = scripted("second", ["two"] * 10)
    prepare_group([first, second], str(tmp_path))
    chat = GroupChat([first, second], messages=[], max_round=10, speaker_selection_method="round_robin")
    manager = GroupChatManager(chat, llm_config=False)
    cmbagent_otel.instrument(tracer_provider=limited, instrument_cmbagent=False, instrument_threading=False)
    try:
        first.initiate_chat(manager, message="begin", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
    handoffs = capture.handoffs()
    assert len(handoffs) == 9  # every selection of the 10 rounds, none dropped
    manager_span = capture.one("invoke_agent chat_manager")
    assert [e.name for e in manager_span.events] == ["cmbagent.handoff"] * 4  # the limit less a margin
    assert manager_span.dropped_events == 0
    spans = capture.named("select_speaker")
    assert len(spans) == 5 and all(capture.parent_of(s) is manager_span for s in spans)
    orders = [h[semconv.EXECUTION_ORDER] for h in handoffs]
    assert orders == sorted(set(orders))


def test_threads_started_inside_a_chat_keep_the_trace(instrumented):
    alice = scripted("alice", ["a"] * 4)
    results: list[Any] = []

    def worker() -> None:
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
        results.append(bob.initiate_chat(alice, message="hi", max_turns=1, silent=True))

    with cmbagent_otel.workflow("threads"):
        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 3
    root = instrumented.one("workflow threads")
    conversations = instrumented.named("conversation alice")
    assert len(conversations) == 3
    assert {c.parent.span_id for c in conversations} == {root.context.span_id}
    assert len({c.attributes[semconv.GEN_AI_CONVERSATION_ID] for c in conversations}) == 3


def test_group_chat_handoff_function_raising_propagates(instrumented):
    class HandoffError(RuntimeError):
        pass

    def broken(last_speaker: Any, chat: Any) -> Any:
        raise HandoffError("no route")

    first = scripted("first", ["one"])
    chat = GroupChat([first, scripted("second", ["two"])], messages=[], max_round=3,
                     speaker_selection_method=broken)
    manager = GroupChatManager(chat, llm_config=False)
    with pytest.raises(HandoffError, match="no route"):
        first.initiate_chat(manager, message="begin", max_turns=1, silent=True)
    selection = instrumented.handoffs()[0]
    assert selection[semconv.ERROR_TYPE].endswith("HandoffError")
    assert selection["exception.message"] == "no route"
    manager_span = selection["span"]
    assert manager_span.name == "invoke_agent chat_manager"
    assert manager_span.status.status_code is StatusCode.ERROR  # the exception passes through it
    assert manager_span.attributes[semconv.ERROR_TYPE].endswith("HandoffError")


def test_order_speakers_helper_stops_cleanly():
    agents = [scripted("a", ["x"]), scripted("b", ["y"])]
    chat = GroupChat(agents, messages=[], max_round=5)
    pick = order_speakers(["b"])
    assert pick(agents[0], chat) is agents[1]
    assert pick(agents[1], chat) is None


class _RecordingExecutor:
    """A ``CodeExecutor`` written from scratch (no AG2 base class), as a user might ship."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    @property
    def code_extractor(self) -> Any:
        from autogen.coding import MarkdownCodeExtractor

        return MarkdownCodeExtractor()

    def execute_code_blocks(self, code_blocks: Any) -> Any:
        from autogen.coding import CodeResult

        self.ran.extend(block.code for block in code_blocks)
        return CodeResult(exit_code=3, output="custom ran")

    def restart(self) -> None:
        pass


def test_custom_code_executor_is_traced_and_restored(capture):
    original = _RecordingExecutor.__dict__["execute_code_blocks"]
    custom = _RecordingExecutor()
    executor = ConversableAgent("executor", llm_config=False, human_input_mode="NEVER",
                                code_execution_config={"executor": custom})
    script = ["```python\nprint(1)\n```", "TERMINATE"]
    engineer = offline_agent("engineer", script)
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        activate(engineer, script)
        executor.initiate_chat(engineer, message="go", max_turns=2, silent=True)
        assert _RecordingExecutor.__dict__["execute_code_blocks"] is not original
    finally:
        cmbagent_otel.uninstrument()
    assert custom.ran == ["print(1)"]
    code = capture.one("execute_code python")
    assert code.attributes[semconv.CODE_EXIT_CODE] == 3
    assert code.status.status_code is StatusCode.ERROR
    assert capture.parent_of(code).name == "invoke_agent executor"
    assert _RecordingExecutor.__dict__["execute_code_blocks"] is original


def test_plain_ag2_program_gets_conversation_and_turn_nodes(instrumented, tmp_path):
    run_four_agent_chat(tmp_path)
    nodes = {s.attributes[semconv.DAG_NODE]: s for s in instrumented.spans
             if semconv.DAG_NODE_TYPE in s.attributes}
    shape = {short: (s.name, s.attributes[semconv.DAG_NODE_TYPE], s.attributes[semconv.DAG_ORDER_INDEX],
                     s.attributes.get(semconv.DAG_PARENT_NODE)) for short, s in nodes.items()}
    # the group chat manager is transparent: its turns are the conversation's sub-agents, in speaking order
    assert shape == {
        "conversation_1": ("conversation chat_manager", "agent", 1001, None),
        "conversation_1_engineer": ("invoke_agent engineer", "sub_agent", 1001001, "conversation_1"),
        "conversation_1_executor": ("invoke_agent executor", "sub_agent", 1001002, "conversation_1"),
        "conversation_1_engineer_2": ("invoke_agent engineer", "sub_agent", 1001003, "conversation_1"),
        "conversation_1_executor_2": ("invoke_agent executor", "sub_agent", 1001004, "conversation_1"),
        "conversation_1_researcher": ("invoke_agent researcher", "sub_agent", 1001005, "conversation_1"),
    }
    tool = instrumented.one("execute_tool peak_position")
    assert tool.attributes[semconv.DAG_NODE] == "conversation_1_executor"
    handoff = next(h for h in instrumented.handoffs() if h[semconv.HANDOFF_FROM] == "engineer")
    assert handoff["span"].attributes[semconv.DAG_NODE] == "conversation_1"  # the manager's: the conversation


def test_sequential_chats_are_one_node_each(instrumented):
    writer = scripted("writer", ["draft", "final"])
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    user.initiate_chats([
        {"recipient": writer, "message": "write", "max_turns": 1, "silent": True},
        {"recipient": writer, "message": "polish", "max_turns": 1, "silent": True},
    ])
    conversations = instrumented.named("conversation writer")
    assert [c.attributes[semconv.DAG_NODE] for c in conversations] == ["conversation_1", "conversation_2"]
    assert [c.attributes[semconv.DAG_ORDER_INDEX] for c in conversations] == [1001, 1002]
    turns = instrumented.named("invoke_agent writer")
    assert [t.attributes[semconv.DAG_PARENT_NODE] for t in turns] == ["conversation_1", "conversation_2"]


def test_conversations_inside_a_workflow_are_not_extra_nodes(instrumented):
    alice = scripted("alice", ["pong"])
    bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
    with cmbagent_otel.workflow("w"), cmbagent_otel.phase("control"), cmbagent_otel.step(1, "ping"):
        bob.initiate_chat(alice, message="ping", max_turns=1, silent=True)
    conversation = instrumented.one("conversation alice")
    assert semconv.DAG_NODE_TYPE not in conversation.attributes
    assert conversation.attributes[semconv.DAG_NODE] == "step_1"
    turn = instrumented.one("invoke_agent alice")
    assert (turn.attributes[semconv.DAG_NODE], turn.attributes[semconv.DAG_ORDER_INDEX]) == ("step_1_alice", 1001)


def test_chat_ending_with_no_eligible_speaker_is_success(instrumented, tmp_path):
    first = scripted("first", ["one"])
    second = scripted("second", ["two"])
    prepare_group([first, second], str(tmp_path))

    def pick(last_speaker: Any, chat: Any) -> Any:
        return second if last_speaker is first else None  # None: AG2 raises NoEligibleSpeakerError, ends the chat

    chat = GroupChat([first, second], messages=[], max_round=5, speaker_selection_method=pick)
    manager = GroupChatManager(chat, llm_config=False)
    result = first.initiate_chat(manager, message="begin", silent=True)
    assert result.chat_history[-1]["content"] == "two"
    last = [h for h in instrumented.handoffs() if h[semconv.HANDOFF_FROM] == "second"]
    assert len(last) == 1
    assert last[0][semconv.HANDOFF_ENDS_CHAT] is True
    assert semconv.HANDOFF_TO not in last[0] and semconv.ERROR_TYPE not in last[0]
    assert [e.name for e in last[0]["span"].events] == ["cmbagent.handoff"] * 2  # no exception event
    assert all(s.status.status_code is StatusCode.UNSET for s in instrumented.spans)


def test_group_tool_runner_is_never_a_node(instrumented, monkeypatch, tmp_path):
    from autogen.agentchat import initiate_group_chat
    from autogen.agentchat.group import ContextVariables, ReplyResult, TerminateTarget
    from autogen.agentchat.group.patterns import RoundRobinPattern

    def finish(context_variables: Any) -> Any:
        """Finish the task."""
        return ReplyResult(target=TerminateTarget(), message="done", context_variables=context_variables)

    # the pattern rebuilds the agents' model clients: the loopback server routes by API key, which survives that
    monkeypatch.setenv("CMBAGENT_OTEL_OFFLINE_BACKEND", "server")
    worker = scripted("worker", [{"tool_calls": [{"name": "finish", "arguments": {}}]}], functions=[finish])
    helper = scripted("helper", ["unused"])
    (tmp_path / "chats").mkdir()
    pattern = RoundRobinPattern(initial_agent=worker, agents=[worker, helper], group_manager_args={"llm_config": False},
                                context_variables=ContextVariables(data={"work_dir": str(tmp_path)}))
    with cmbagent_otel.workflow("w"), cmbagent_otel.phase("control"), cmbagent_otel.step(1, "finish"):
        initiate_group_chat(pattern=pattern, messages="go", max_rounds=4)
    runner = [s for s in instrumented.spans if s.name == "invoke_agent _Group_Tool_Executor"]
    assert runner and all(semconv.DAG_NODE_TYPE not in s.attributes for s in runner)
    assert instrumented.one("execute_tool finish").attributes[semconv.DAG_NODE] == "step_1"
    nodes = [s.attributes[semconv.DAG_NODE] for s in instrumented.spans if semconv.DAG_NODE_TYPE in s.attributes]
    assert nodes == ["control", "step_1", "step_1_worker"]


def test_agent_protocol_methods_read_as_plain_methods(capture):
    """generate_reply / a_generate_reply (members of AG2's Agent protocol, read on every isinstance check)
    are patched with plain functions: ordinary methods to AG2 and inspect, restored by uninstrument()."""
    cls = conversable_agent.ConversableAgent
    sync_original, async_original = vars(cls)["generate_reply"], vars(cls)["a_generate_reply"]
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        alice = scripted("alice", ["hi"])
        assert isinstance(alice, autogen.Agent)
        patched = vars(cls)["a_generate_reply"]
        assert patched.__wrapped__ is async_original and patched.__name__ == "a_generate_reply"
        assert inspect.iscoroutinefunction(patched) and inspect.iscoroutinefunction(alice.a_generate_reply)
        assert not inspect.iscoroutinefunction(alice.generate_reply)
        assert inspect.signature(alice.generate_reply) == inspect.signature(sync_original.__get__(alice, cls))
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
        bob.initiate_chat(alice, message="x", max_turns=1, silent=True)
        assert "invoke_agent alice" in [s.name for s in capture.spans]
    finally:
        cmbagent_otel.uninstrument()
    assert vars(cls)["generate_reply"] is sync_original and vars(cls)["a_generate_reply"] is async_original


def test_otel_unwrap_leaves_the_plain_methods_to_uninstrument(capture):
    """OTel's ``unwrap`` takes out our wrapt wrappers (module functions) but not the plain functions on
    class methods (it only knows wrapt proxies; a proxy there costs every read and call of the method,
    see docs/spans.md): those stay live until ``uninstrument()``, which then leaves AG2 as it was."""
    from opentelemetry.instrumentation.utils import unwrap

    agent_cls = conversable_agent.ConversableAgent
    before = {(owner, attr): vars(owner)[attr] for owner, attr in (
        (agent_cls, "generate_reply"), (agent_cls, "initiate_chat"), (oai_client.OpenAIWrapper, "create"),
        (groupchat.GroupChat, "select_speaker"), (conversable_agent, "initiate_chats"))}
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        patched = AG2Instrumentor().patched
        assert set(before) <= set(patched)
        for owner, attr in patched:
            unwrap(owner, attr)
        assert vars(conversable_agent)["initiate_chats"] is before[(conversable_agent, "initiate_chats")]
        for (owner, attr), original in before.items():
            if isinstance(owner, type):
                assert vars(owner)[attr] is not original and vars(owner)[attr].__wrapped__ is original, attr
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
        bob.initiate_chat(scripted("alice", ["hi"]), message="x", max_turns=1, silent=True)
        assert {"conversation alice", "invoke_agent alice", "chat scripted"} <= {s.name for s in capture.spans}
    finally:
        cmbagent_otel.uninstrument()
    assert all(vars(owner)[attr] is original for (owner, attr), original in before.items())
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:  # and a new cycle patches everything again
        assert all(vars(owner)[attr] is not original for (owner, attr), original in before.items())
    finally:
        cmbagent_otel.uninstrument()


class _RefusingTracer(trace.Tracer):
    """A tracer (not a no-op one: the spans may record) whose every start fails, as a broken tracing
    implementation's might."""

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tracer broken")

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tracer broken")


class _RefusingProvider(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _RefusingTracer()


def test_a_tracer_failing_every_start_leaves_the_chat_alone(tmp_path):
    """Every span's start fails (agent turns, model calls, tools, code): the chat runs as without
    tracing, its exceptions and results untouched, and nothing is left attached."""
    before = otel_context.get_current()
    cmbagent_otel.instrument(tracer_provider=_RefusingProvider(), instrument_cmbagent=False)
    try:
        result = run_four_agent_chat(tmp_path)
        with FakeOpenAIServer(status=400) as server:
            config = {"config_list": [{"model": "gpt-4o-mini", "api_key": "sk-test-loopback-key-111111",
                                       "base_url": server.base_url}], "cache_seed": None}
            assistant = ConversableAgent("assistant", llm_config=config, human_input_mode="NEVER")
            user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
            import openai

            with pytest.raises(openai.BadRequestError):
                user.initiate_chat(assistant, message="question?", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
    assert "TERMINATE" in result.chat_history[-1]["content"]
    assert otel_context.get_current() is before


class _UsageShapesClient(ScriptedModelClient):
    """Answers like ScriptedModelClient, its usage in the shapes model clients return: with token
    details (OpenAI's CompletionUsage), as a plain dict, as a read-only mapping."""

    def __init__(self, config: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.shapes = iter([  # per client: the test can run again in the same process
            SimpleNamespace(prompt_tokens=11, completion_tokens=5, total_tokens=16,
                            prompt_tokens_details=SimpleNamespace(cached_tokens=7),
                            completion_tokens_details=SimpleNamespace(reasoning_tokens=3)),
            {"prompt_tokens": 12, "completion_tokens": 6},
            MappingProxyType({"prompt_tokens": 13, "completion_tokens": 7}),
            SimpleNamespace(prompt_tokens=14, completion_tokens=8, total_tokens=22),
        ])

    def create(self, params: dict[str, Any]) -> SimpleNamespace:
        response = super().create(params)
        response.usage = next(self.shapes)
        return response

    @staticmethod
    def get_usage(response: SimpleNamespace) -> dict[str, Any]:  # AG2's own accounting reads no shape
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost": response.cost,
                "model": response.model}


@pytest.mark.skipif(custom_client_key() is None, reason="this AG2 line takes a custom model client under no known key")
def test_token_counts_from_every_usage_shape(instrumented):
    agent = ConversableAgent("counter", llm_config=custom_client_config("_UsageShapesClient"), human_input_mode="NEVER")
    agent.register_model_client(_UsageShapesClient, script=["one", "two", "three", "four"])
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    for _ in range(4):
        user.initiate_chat(agent, message="count", max_turns=1, silent=True)
    usage = [{k.removeprefix("gen_ai.usage."): v for k, v in s.attributes.items() if k.startswith("gen_ai.usage.")}
             for s in instrumented.named("chat scripted")]
    assert usage == [
        {"input_tokens": 11, "output_tokens": 5, "cache_read.input_tokens": 7, "reasoning.output_tokens": 3},
        {"input_tokens": 12, "output_tokens": 6},
        {"input_tokens": 13, "output_tokens": 7},
        {"input_tokens": 14, "output_tokens": 8},
    ]


def test_a_usage_class_registered_as_a_mapping_later_is_read_as_one():
    """The usage reader remembers which classes are not mappings (an ABC check per model call costs
    ~1,900 instructions); a class registered as a Mapping afterwards is read as one from then on."""
    from collections.abc import Mapping

    from cmbagent_otel.instrumentation._models import usage_attributes

    class Usage:  # attributes say 1 and 2, its mapping side 3 and 4
        prompt_tokens, completion_tokens = 1, 2

        def get(self, key: str, default: Any = None) -> Any:
            return {"prompt_tokens": 3, "completion_tokens": 4}.get(key, default)

    assert usage_attributes(Usage()) == {"gen_ai.usage.input_tokens": 1, "gen_ai.usage.output_tokens": 2}
    assert usage_attributes(Usage()) == {"gen_ai.usage.input_tokens": 1, "gen_ai.usage.output_tokens": 2}
    Mapping.register(Usage)
    assert usage_attributes(Usage()) == {"gen_ai.usage.input_tokens": 3, "gen_ai.usage.output_tokens": 4}
