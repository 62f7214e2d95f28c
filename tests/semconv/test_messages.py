"""Message content: always valid JSON within the bound, newest turns kept, secrets redacted, DAG rows unchanged."""

from __future__ import annotations

import json

import jsonschema
from autogen import ConversableAgent
from cmbagent_otel.exporters.dag import DagSpanExporter
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from sqlalchemy import create_engine, text

import cmbagent_otel
from cmbagent_otel.instrumentation import _messages
from cmbagent_otel.testing import activate, offline_agent

from .genai_schema import INPUT_MESSAGES, OUTPUT_MESSAGES

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400)
raw_messages = st.lists(
    st.one_of(
        st.builds(lambda c, n: {"role": "user", "content": c, "name": n}, texts, st.sampled_from(["bob", "ann"])),
        st.builds(lambda c: {"role": "assistant", "content": c}, texts),
        st.builds(lambda a: {"role": "assistant", "content": None,
                             "tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": a}}]},
                  st.one_of(texts, st.just('{"x": [1, 2, "three"]}'))),
        st.builds(lambda c: {"role": "tool", "tool_call_id": "call_1", "content": c}, texts),
    ),
    min_size=1, max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(raw_messages, st.integers(min_value=120, max_value=3000))
def test_rendered_messages_are_valid_json_within_the_bound_newest_first(messages, bound):
    converted = [_messages.message(m) for m in messages]
    rendered, dropped = _messages.render(converted, bound)
    assert len(rendered) <= bound
    value = json.loads(rendered)
    jsonschema.validate(value, INPUT_MESSAGES)
    assert len(value) + dropped == len(converted)
    assert value, "the newest message is always kept"
    assert value[-1]["role"] == converted[-1]["role"]
    # the kept ones are the newest, in order
    kept = converted[dropped:]
    assert [m["role"] for m in value] == [m["role"] for m in kept]


@settings(max_examples=60, deadline=None)
@given(texts, st.integers(min_value=60, max_value=2000))
def test_output_message_and_values_are_valid_json_within_the_bound(content, bound):
    rendered, _ = _messages.render([_messages.output_message(content)], bound)
    assert len(rendered) <= bound
    jsonschema.validate(json.loads(rendered), OUTPUT_MESSAGES)
    value = _messages.render_value({"query": content, "n": [content] * 3}, bound)
    assert len(value) <= bound
    json.loads(value)


def test_a_secret_stated_in_an_old_message_left_out_is_redacted_in_the_newest():
    secret = "pw-4f9c2e-left-out-but-known"
    history = [{"role": "assistant", "content": None,
                "tool_calls": [{"id": "c1", "function": {"name": "login",
                                                         "arguments": json.dumps({"password": secret})}}]}]
    history += [{"role": "user", "content": "filler " * 60, "name": "bob"} for _ in range(20)]
    history.append({"role": "user", "content": f"I typed {secret} again", "name": "bob"})
    rendered, dropped = _messages.render([_messages.message(m) for m in history], 600)
    assert dropped > 0 and "again" in rendered
    assert secret not in rendered and "[REDACTED]" in rendered


def test_dag_messages_rows_keep_sender_recipient_and_content(tmp_path):
    url = f"sqlite:///{tmp_path}/dag.db"
    exporter = DagSpanExporter(url)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cmbagent_otel.instrument(tracer_provider=provider, capture_content="SPAN_ONLY", instrument_cmbagent=False)
    try:
        alice = offline_agent("alice", ["hello bob"], system_message="You are alice.")
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
        bob.initiate_chat(alice, message="tell me", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
        provider.shutdown()
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT m.sender, m.recipient, m.content, e.meta FROM messages m JOIN execution_events e "
            "ON e.id = m.event_id")).all()
    engine.dispose()
    by_span: dict[str, list[tuple[str, str, str]]] = {}
    for sender, recipient, content, meta in rows:
        span_name = (json.loads(meta) if isinstance(meta, str) else meta)["span_name"]
        by_span.setdefault(span_name, []).append((sender, recipient, content))
    # the model call: bob's message in, alice's answer out (to "user": a model call has no sender attribute,
    # as before); the system prompt is an instruction (gen_ai.system_instructions), not a message row
    assert sorted(by_span["chat scripted"]) == [("alice", "user", "hello bob"), ("bob", "alice", "tell me")]
    assert set(by_span) == {"chat scripted"}  # the conversation and agent turns are DAG nodes here, not events


def test_history_rendered_again_reflects_changes_and_later_secrets():
    from cmbagent_otel.redaction import register_secret

    history = [{"role": "user", "content": "first text with tok-7a1c93e5d2", "name": "bob"},
               {"role": "assistant", "content": "second"}]
    first, _ = _messages.render(history, 4096, convert=_messages.message)
    assert "tok-7a1c93e5d2" in first
    history[1]["content"] = "second, edited"  # AG2 replaced the content: rendered anew
    register_secret("tok-7a1c93e5d2")  # learned after the first rendering
    again, _ = _messages.render(history, 4096, convert=_messages.message)
    assert "second, edited" in again and "tok-7a1c93e5d2" not in again and "[REDACTED]" in again


def test_an_agent_turns_tool_responses_keep_each_calls_id(capture):
    """AG2's reply to tool calls is ``{"role": "tool", "tool_responses": [...], "content": <the results
    joined>}``: each call's id is only in ``tool_responses``. docs/spans.md gives a tool_call_response part
    as ``{"type", "id", "response"}``; the agent turns' messages (the executing agent's output, the next
    turn's input) had one part of the joined text and no id, while the model call's input had one per call."""
    cmbagent_otel.instrument(tracer_provider=capture.provider, capture_content="SPAN_ONLY", instrument_cmbagent=False)
    try:
        script = [{"tool_calls": [{"id": "call_a1", "name": "add", "arguments": {"a": 1, "b": 2}},
                                  {"id": "call_b2", "name": "add", "arguments": {"a": 5, "b": 6}}]}, "done TERMINATE"]
        alice = offline_agent("alice", script)
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")

        def add(a: int, b: int) -> int:
            return a + b

        alice.register_for_llm(name="add", description="adds")(add)
        bob.register_for_execution(name="add")(add)
        activate(alice, script)  # registering the tool rebuilt alice's model client
        bob.initiate_chat(alice, message="add twice", max_turns=2, silent=True)
    finally:
        cmbagent_otel.uninstrument()
    expected = [{"type": "tool_call_response", "response": "3", "id": "call_a1"},
                {"type": "tool_call_response", "response": "11", "id": "call_b2"}]
    turns = capture.named("invoke_agent")
    outputs = [json.loads(str(s.attributes["gen_ai.output.messages"])) for s in turns if s.name == "invoke_agent bob"]
    assert outputs[0][0]["role"] == "tool" and outputs[0][0]["parts"] == expected
    jsonschema.validate(outputs[0], OUTPUT_MESSAGES)
    # alice's next turn reads the same message from her history, and her model call gets one message per call
    alice_inputs = [json.loads(str(s.attributes["gen_ai.input.messages"]))
                    for s in turns if s.name == "invoke_agent alice"]
    assert [m["parts"] for m in alice_inputs[1] if m["role"] == "tool"] == [expected]
    chat_inputs = [json.loads(str(s.attributes["gen_ai.input.messages"])) for s in capture.named("chat ")]
    assert [m["parts"][0] for m in chat_inputs[1] if m["role"] == "tool"] == expected
