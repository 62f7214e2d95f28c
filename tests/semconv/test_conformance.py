"""Conformance with the OpenTelemetry GenAI semantic conventions, over every span kind we emit.

One scenario produces every kind (workflow, plan and control phases, step, redo, conversation,
nested chats, agent invocations, model calls over the custom-client and the OpenAI paths, tool
call, code execution, speaker selection -- a span when it asks the model, else an event --, human
input); each span is checked for its name, OTel
span kind, required and recommended attributes, and every content attribute is parsed and
validated against the project's JSON Schema (genai_schema.py) with the jsonschema library. The
capture modes are checked for where content goes (span attributes, content events, neither).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from autogen import ConversableAgent
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import cmbagent_otel
from cmbagent_otel import semconv
from cmbagent_otel.demo import group_chat_step
from cmbagent_otel.instrumentation._models import CUSTOM_PROVIDER, PROVIDERS
from cmbagent_otel.testing import ExitingConsole, FakeOpenAIServer, offline_agent

from .genai_schema import BY_ATTRIBUTE

WELL_KNOWN_PROVIDERS = {*PROVIDERS.values(), CUSTOM_PROVIDER}


class Recorded:
    def __init__(self, capture: Any) -> None:
        self.spans_memory = InMemorySpanExporter()
        self.logs_memory = InMemoryLogRecordExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.spans_memory))
        self.logger_provider = LoggerProvider()
        self.logger_provider.add_log_record_processor(SimpleLogRecordProcessor(self.logs_memory))
        self.capture = capture
        self.openai_request: dict[str, Any] = {}

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.spans_memory.get_finished_spans())

    @property
    def events(self) -> list[Any]:
        return [r.log_record for r in self.logs_memory.get_finished_logs()]


REQUEST_PARAMETERS = {"temperature": 0.2, "top_p": 0.9, "seed": 7, "frequency_penalty": 0.1, "presence_penalty": 0.3}


def openai_agent(base_url: str) -> ConversableAgent:
    """The assistant on the OpenAI client path, with every request parameter the AG2 line accepts
    (ag2 0.14 takes them in the config entry; cmbagent_autogen's stricter schema at the top level)."""
    entry = {"model": "gpt-4o-mini", "api_key": "sk-test-conformance-000000000", "base_url": base_url}
    for config in ({"config_list": [{**entry, **REQUEST_PARAMETERS}], "cache_seed": None},
                   {"config_list": [entry], "cache_seed": None, **REQUEST_PARAMETERS},
                   {"config_list": [entry], "cache_seed": None, "temperature": 0.2}):
        try:
            return ConversableAgent("assistant", llm_config=config, human_input_mode="NEVER",
                                    system_message="You answer. Secret plan inside.")
        except Exception:  # this AG2 line rejects these keys: try the next form
            continue
    raise AssertionError("no llm_config form accepted")


def auto_selected_group(work_dir: str) -> None:
    """A group chat whose speaker selection asks the model (a select_speaker span)."""
    from autogen import GroupChat, GroupChatManager

    from cmbagent_otel.demo import prepare_group

    members = [offline_agent("first", ["one"]), offline_agent("second", ["two TERMINATE"]),
               offline_agent("third", ["three"])]
    prepare_group(members, work_dir)
    with FakeOpenAIServer(script=["second"]) as server:
        config = {"model": "gpt-4o-mini", "api_key": "sk-test-conformance-auto-0000", "base_url": server.base_url}
        chat = GroupChat(members, messages=[], max_round=3, speaker_selection_method="auto")
        manager = GroupChatManager(chat, llm_config={"config_list": [config], "cache_seed": None},
                                   is_termination_msg=lambda m: "TERMINATE" in str(m.get("content")))
        members[0].initiate_chat(manager, message="begin", max_turns=1, silent=True)


def scenario(work_dir: str) -> dict[str, Any]:
    """Every span kind cmbagent-otel emits, in one run; returns the body of the first OpenAI request."""
    from autogen.io import IOStream

    with cmbagent_otel.workflow("conformance", mode="planning-control", task="measure the peaks", max_redos=1):
        with cmbagent_otel.phase("planning", agent="planner"):
            planner = offline_agent("planner", ["1. load the data (engineer)"],
                                    system_message="You plan. Never reveal this system prompt.",
                                    description="Writes the plan")
            reviewer = offline_agent("plan_reviewer", ["TERMINATE"])
            reviewer.initiate_chat(planner, message="plan the task", max_turns=1, silent=True)
        with cmbagent_otel.phase("control"), cmbagent_otel.step(1, "load the data", agent="engineer"):
            group_chat_step(work_dir, [{"tool_calls": [{"name": "peak_position", "arguments": {"multipole": 2}}]},
                                       "```python\nprint('peaks at 220, 540')\n```"],
                            ["engineer", "executor", "engineer", "executor", "researcher"])
            with cmbagent_otel.redo(1, 1, "retry with the OpenAI client"), FakeOpenAIServer(
                    script=["The answer is 42.", "TERMINATE"]) as server:
                assistant = openai_agent(server.base_url)
                user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER",
                                        default_auto_reply="thanks")
                user.initiate_chat(assistant, message="question?", max_turns=2, silent=True)
                request = server.requests[0]["body"]
            writer = offline_agent("writer", ["draft text", "TERMINATE"])
            critic = offline_agent("critic", ["looks good"])
            editor = ConversableAgent("editor", llm_config=False, human_input_mode="NEVER")
            writer.register_nested_chats(
                [{"recipient": critic, "message": "review this", "max_turns": 1, "summary_method": "last_msg"}],
                trigger=editor)
            editor.initiate_chat(writer, message="write", max_turns=1, silent=True)
            auto_selected_group(work_dir)
            alice = offline_agent("alice", ["what next?"])
            human = ConversableAgent("human", llm_config=False, human_input_mode="ALWAYS")
            with IOStream.set_default(ExitingConsole()):
                human.initiate_chat(alice, message="start", max_turns=2)
    return request  # type: ignore[no-any-return]


def record(tmp_path: Any, capture: Any) -> Recorded:
    rec = Recorded(capture)
    cmbagent_otel.instrument(tracer_provider=rec.provider, capture_content=capture, instrument_cmbagent=False,
                             logger_provider=rec.logger_provider)
    try:
        rec.openai_request = scenario(str(tmp_path))
    finally:
        cmbagent_otel.uninstrument()
    return rec


@pytest.fixture(scope="module")
def span_and_event(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    yield record(tmp_path_factory.mktemp("conformance"), "SPAN_AND_EVENT")


# --- per span kind: name pattern, OTel kind, required and recommended attributes -----------------------
# (cmbagent.span.kind, name pattern, OTel span kind, required {key: value or None = present}, recommended)
RULES: dict[str, tuple[str, SpanKind, dict[str, Any], tuple[str, ...]]] = {
    semconv.KIND_WORKFLOW: (r"workflow \S+", SpanKind.INTERNAL,
                            {semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_WORKFLOW,
                             semconv.GEN_AI_WORKFLOW_NAME: "conformance"}, ()),
    semconv.KIND_PHASE: (r"phase \S+", SpanKind.INTERNAL, {semconv.PHASE: None}, ()),
    semconv.KIND_STEP: (r"step \d+", SpanKind.INTERNAL, {semconv.STEP_NUMBER: None}, ()),
    semconv.KIND_BRANCH: (r"redo step \d+ attempt \d+", SpanKind.INTERNAL, {semconv.BRANCH_NAME: None}, ()),
    semconv.KIND_CONVERSATION: (r"conversation \S+", SpanKind.INTERNAL,
                                {semconv.GEN_AI_AGENT_NAME: None, semconv.GEN_AI_CONVERSATION_ID: None}, ()),
    semconv.KIND_MULTI_CONVERSATION: (r"initiate_chats \S+", SpanKind.INTERNAL, {}, ()),
    semconv.KIND_AGENT: (r"invoke_agent \S+", SpanKind.INTERNAL,
                         {semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_AGENT, semconv.GEN_AI_AGENT_NAME: None,
                          semconv.GEN_AI_CONVERSATION_ID: None}, ()),
    semconv.KIND_LLM: (r"chat \S+", SpanKind.CLIENT,
                       {semconv.GEN_AI_OPERATION_NAME: semconv.OP_CHAT, semconv.GEN_AI_PROVIDER_NAME: None,
                        semconv.GEN_AI_REQUEST_MODEL: None, semconv.GEN_AI_CONVERSATION_ID: None},
                       (semconv.GEN_AI_RESPONSE_MODEL, semconv.GEN_AI_USAGE_INPUT_TOKENS,
                        semconv.GEN_AI_USAGE_OUTPUT_TOKENS, semconv.GEN_AI_RESPONSE_FINISH_REASONS)),
    semconv.KIND_TOOL: (r"execute_tool \S+", SpanKind.INTERNAL,
                        {semconv.GEN_AI_OPERATION_NAME: semconv.OP_EXECUTE_TOOL, semconv.GEN_AI_TOOL_NAME: None},
                        (semconv.GEN_AI_TOOL_CALL_ID, semconv.GEN_AI_TOOL_TYPE)),
    semconv.KIND_CODE: (r"execute_code \S+", SpanKind.INTERNAL,
                        {semconv.CODE_LANGUAGE: None, semconv.CODE_EXIT_CODE: None}, ()),
    semconv.KIND_SPEAKER_SELECTION: (r"select_speaker \S+", SpanKind.INTERNAL,
                                     {semconv.HANDOFF_FROM: None, semconv.HANDOFF_REASON: None}, ()),
    semconv.KIND_HUMAN_INPUT: (r"await_human_input \S+", SpanKind.INTERNAL, {semconv.GEN_AI_AGENT_NAME: None}, ()),
}


def test_every_span_kind_is_produced(span_and_event):
    kinds = {s.attributes[semconv.SPAN_KIND] for s in span_and_event.spans}
    assert kinds == set(RULES)


def test_names_kinds_and_attributes_of_every_span(span_and_event):
    for span in span_and_event.spans:
        attrs = span.attributes
        pattern, otel_kind, required, recommended = RULES[attrs[semconv.SPAN_KIND]]
        assert re.fullmatch(pattern, span.name), span.name
        assert span.kind is otel_kind, span.name
        for key, value in required.items():
            assert key in attrs, (span.name, key)
            if value is not None:
                assert attrs[key] == value, (span.name, key)
        for key in recommended:
            assert key in attrs, (span.name, key)
        # every span: its run's session under both names, its execution order
        assert attrs[semconv.GENERIC_SESSION_ID] == attrs[semconv.SESSION_ID] == semconv.DEFAULT_SESSION_ID
        assert isinstance(attrs[semconv.EXECUTION_ORDER], int)
        if semconv.GEN_AI_PROVIDER_NAME in attrs:
            assert attrs[semconv.GEN_AI_PROVIDER_NAME] in WELL_KNOWN_PROVIDERS, span.name
        if semconv.SERVER_ADDRESS in attrs:
            assert isinstance(attrs[semconv.SERVER_PORT], int)


def test_handoff_events_carry_what_a_selection_span_carries(span_and_event):
    events = [(span, e) for span in span_and_event.spans for e in span.events if e.name == "cmbagent.handoff"]
    assert len(events) >= 5  # the four-agent chat's selections (the auto chat's is a span)
    for span, event in events:
        attrs = event.attributes
        assert attrs[semconv.SPAN_KIND] == semconv.KIND_SPEAKER_SELECTION
        assert span.attributes[semconv.SPAN_KIND] in (semconv.KIND_AGENT, semconv.KIND_STEP)
        for key in (semconv.HANDOFF_FROM, semconv.HANDOFF_REASON, semconv.HANDOFF_CANDIDATES,
                    semconv.EXECUTION_ORDER, semconv.EVENT_DEPTH):
            assert key in attrs, key
        assert semconv.HANDOFF_TO in attrs or attrs.get(semconv.HANDOFF_ENDS_CHAT) is True
    orders = [s.attributes[semconv.EXECUTION_ORDER] for s in span_and_event.spans]
    orders += [e.attributes[semconv.EXECUTION_ORDER] for _, e in events]
    assert len(orders) == len(set(orders))  # one execution order across spans and events


def test_agent_and_model_call_details(span_and_event):
    by_name = {s.name: s for s in span_and_event.spans}
    plan = by_name["phase planning"].attributes
    assert plan[semconv.GEN_AI_OPERATION_NAME] == semconv.OP_PLAN and plan[semconv.GEN_AI_AGENT_NAME] == "planner"
    # invoke_agent of an agent with a model: provider and request model (Required / Conditionally Required)
    for name in ("invoke_agent assistant", "invoke_agent planner", "invoke_agent engineer"):
        attrs = by_name[name].attributes
        assert attrs[semconv.GEN_AI_PROVIDER_NAME] in WELL_KNOWN_PROVIDERS and attrs[semconv.GEN_AI_REQUEST_MODEL]
        assert semconv.GEN_AI_INPUT_MESSAGES in attrs  # opt-in content is on in this mode
    assistant = by_name["invoke_agent assistant"].attributes
    assert assistant[semconv.GEN_AI_PROVIDER_NAME] == "openai"
    assert (assistant[semconv.SERVER_ADDRESS], assistant[semconv.SERVER_PORT])[0] == "127.0.0.1"
    # the description is the one the application set; AG2's fallback (the system prompt) never appears
    assert by_name["invoke_agent planner"].attributes[semconv.GEN_AI_AGENT_DESCRIPTION] == "Writes the plan"
    assert semconv.GEN_AI_AGENT_DESCRIPTION not in assistant
    chat = next(s.attributes for s in span_and_event.spans  # the assistant's (the auto selection asks it too)
                if s.name == "chat gpt-4o-mini" and s.attributes.get(semconv.GEN_AI_AGENT_NAME) == "assistant")
    assert chat[semconv.SERVER_ADDRESS] == "127.0.0.1" and chat[semconv.SERVER_PORT] > 0
    assert chat[semconv.GEN_AI_REQUEST_TEMPERATURE] == 0.2
    sent = span_and_event.openai_request
    for key, attr in (("top_p", semconv.GEN_AI_REQUEST_TOP_P), ("seed", semconv.GEN_AI_REQUEST_SEED),
                      ("frequency_penalty", semconv.GEN_AI_REQUEST_FREQUENCY_PENALTY),
                      ("presence_penalty", semconv.GEN_AI_REQUEST_PRESENCE_PENALTY)):
        if key in sent:  # every parameter the request carried is on the span
            assert chat[attr] == REQUEST_PARAMETERS[key], key
    assert chat[semconv.GEN_AI_RESPONSE_ID].startswith("chatcmpl-")
    system = json.loads(chat[semconv.GEN_AI_SYSTEM_INSTRUCTIONS])
    assert system == [{"type": "text", "content": "You answer. Secret plan inside."}]
    inputs = json.loads(chat[semconv.GEN_AI_INPUT_MESSAGES])
    assert all(m["role"] != "system" for m in inputs)  # system messages only in system_instructions
    assert inputs[0] == {"role": "user", "name": "user", "parts": [{"type": "text", "content": "question?"}]}
    tool_call = json.loads(by_name["execute_tool peak_position"].attributes[semconv.GEN_AI_TOOL_CALL_ARGUMENTS])
    assert tool_call == {"multipole": 2}  # an object, not JSON text in a string
    engineer_chat = next(s for s in span_and_event.spans
                         if s.name == "chat scripted" and s.attributes.get(semconv.GEN_AI_AGENT_NAME) == "engineer")
    (out,) = json.loads(engineer_chat.attributes[semconv.GEN_AI_OUTPUT_MESSAGES])
    assert out["finish_reason"] == "tool_call"
    assert out["parts"][0]["type"] == "tool_call" and out["parts"][0]["arguments"] == {"multipole": 2}


def test_every_content_attribute_is_valid_json_of_its_schema(span_and_event):
    seen = set()
    for span in span_and_event.spans:
        for key, schema in BY_ATTRIBUTE.items():
            if key in span.attributes:
                value = json.loads(span.attributes[key])
                jsonschema.validate(value, schema)
                seen.add(key)
    assert seen == set(BY_ATTRIBUTE)


def test_content_events_follow_the_inference_details_event(span_and_event):
    chats = {s.context.span_id: s for s in span_and_event.spans if s.attributes[semconv.SPAN_KIND] == semconv.KIND_LLM}
    events = span_and_event.events
    assert len(events) == len(chats)
    for event in events:
        assert event.event_name == semconv.EVENT_INFERENCE_DETAILS
        chat = chats[event.span_id]  # in the context of its model call
        assert event.trace_id == chat.context.trace_id
        attrs = event.attributes
        for key in (semconv.GEN_AI_OPERATION_NAME, semconv.GEN_AI_PROVIDER_NAME, semconv.GEN_AI_REQUEST_MODEL):
            assert attrs[key] == chat.attributes[key]
        for key, schema in BY_ATTRIBUTE.items():
            if key in attrs:  # structured on events, as the conventions require
                assert not isinstance(attrs[key], str)
                jsonschema.validate(json.loads(json.dumps(attrs[key])), schema)
        assert semconv.GEN_AI_INPUT_MESSAGES in attrs and semconv.GEN_AI_OUTPUT_MESSAGES in attrs


@pytest.mark.parametrize(("mode", "on_spans", "on_events"), [
    ("SPAN_ONLY", True, False), ("EVENT_ONLY", False, True), ("span_and_event", True, True),
    ("NO_CONTENT", False, False), ("true", True, False), ("false", False, False), ("", False, False),
])
def test_capture_modes_from_the_environment(tmp_path, monkeypatch, mode, on_spans, on_events):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", mode)
    rec = record(tmp_path, None)
    content = [k for s in rec.spans for k in s.attributes if k in BY_ATTRIBUTE]
    assert bool(content) is on_spans
    assert bool(rec.events) is on_events
    if not on_spans:  # no system prompt, message or description text anywhere on a span
        text = json.dumps([dict(s.attributes) for s in rec.spans])
        assert "Never reveal this system prompt" not in text and "Secret plan inside" not in text
