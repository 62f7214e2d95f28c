"""Calls of ours a model call and a speaker selection no longer make (issue 13, session 44).

A response's model whose type is exactly ``str`` goes straight to the name memo's ``redact`` (no ``redact_name``
frame, no ``str.__str__``); a ``str`` subclass still through ``redact_name``. The model call's recorder is generated
from ``_record_llm`` with ``_response_facts`` written in (no frame of it per call). A speaker selection under a span of
ours (the manager's turn: every selection of a group chat) reads the current span from the Context only when no
span of ours owns the scope. These tests pin both and that the output is what it was: secrets in a model name are
redacted, the handoff events land on the manager's span.
"""

from __future__ import annotations

import secrets
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from autogen.agentchat import groupchat
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider

from cmbagent_otel import redaction
from cmbagent_otel.instrumentation import ag2
from cmbagent_otel.instrumentation._content import ContentMode
from cmbagent_otel.testing import offline_agent
from tests.conftest import SpanCapture
from tests.instrumentation.test_perf34_selection_path import _profiled_handoffs


class _Response:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.usage = None
        self.cost = None


class _Text(str):
    pass


@pytest.mark.usefixtures("isolated_secrets")
def test_a_response_model_is_redacted_whatever_its_str_type() -> None:
    """An exact ``str`` and a ``str`` subclass holding a registered secret are both redacted (and the subclass
    comes back an exact ``str``); anything else is no model."""
    key = f"sk-perf44-{secrets.token_hex(12)}"
    redaction.register_secret(key)
    for model in (f"gpt-4o?api_key={key}", _Text(f"gpt-4o?api_key={key}")):
        name, usage, cost = ag2._response_facts(_Response(model))
        assert type(name) is str and key not in name and name.startswith("gpt-4o?api_key=")
        assert name == redaction.redact_name(str(model)) and (usage, cost) == ({}, None)
    assert ag2._response_facts(_Response("gpt-4o"))[0] == "gpt-4o"
    assert ag2._response_facts(_Response(42))[0] is None


def test_a_model_call_with_a_plain_model_name_calls_no_redact_name(instrumented: SpanCapture) -> None:
    """The model calls' spans carry the response model, found through the memo without a ``redact_name`` frame."""
    sender = offline_agent("asker", ["hello"] * 3)
    answerer = offline_agent("answerer", ["one", "two", "three"])
    called: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is redaction.redact_name.__code__:
            called.append(frame.f_back.f_code.co_name)

    sender.initiate_chat(answerer, message="hi", max_turns=2, silent=True)  # agents' names memoised first
    instrumented.exporter.clear()
    sys.setprofile(profile)
    try:
        sender.initiate_chat(answerer, message="hi", max_turns=2, silent=True)
    finally:
        sys.setprofile(None)
    calls = instrumented.named("chat ")
    assert calls and all(span.attributes.get("gen_ai.response.model") for span in calls)
    assert "_response_facts" not in called, called
    assert "_response_facts" not in _frames_of_a_model_call(sender, answerer)  # written into the recorder


def _frames_of_a_model_call(sender: Any, answerer: Any) -> list[str]:
    """The functions of ag2.py and redaction.py called while ``sender`` and ``answerer`` chat (one model call)."""
    called: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename in (ag2.__file__, redaction.__file__):
            called.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        sender.initiate_chat(answerer, message="hi", max_turns=1, silent=True)
    finally:
        sys.setprofile(None)
    assert "_record_llm" in called, called
    return called


class _Usage:
    def __init__(self, prompt: Any, completion: Any, details: Any = None) -> None:
        self.prompt_tokens, self.completion_tokens = prompt, completion
        self.prompt_tokens_details = details
        self.completion_tokens_details = None


class _Choice:
    def __init__(self, reason: Any) -> None:
        self.finish_reason = reason


def test_the_generated_model_call_recorder_records_what_record_llm_records() -> None:
    """``_record_llm`` with ``_response_facts`` written in, against ``_record_llm`` itself, on responses of every
    shape they read: the same attributes in the same order on the span."""
    ag2._generate_starts()  # what the first instrument() does
    made = ag2._MADE[ag2._record_llm]
    assert made is not ag2._record_llm and "_response_facts" not in made.__code__.co_names
    assert made.__code__.co_filename == ag2._record_llm.__code__.co_filename
    responses = []
    for model, usage, cost, choices, identifier in (
            ("gpt-4o", _Usage(3, 4), 0.5, [_Choice("stop")], "chatcmpl-1"),
            (_Text("sub"), {"prompt_tokens": 1, "completion_tokens": 2}, 2, [_Choice("length"), _Choice(None)], None),
            (None, _Usage(2**63, -1, {"cached_tokens": 1}), True, [_Choice({"odd": 1})], 7),
            (42, None, None, "not a list", "call_x"),
    ):
        response = _Response(model)
        response.usage, response.cost, response.choices, response.id = usage, cost, choices, identifier
        responses.append(response)
    provider = TracerProvider()
    state = SimpleNamespace(content=ContentMode.NO_CONTENT, capture=False)
    for response in responses:
        recorded = []
        for record in (made, ag2._record_llm):
            span = provider.get_tracer("t").start_span("chat")
            record(state, SimpleNamespace(span=span), None, (), {}, response)
            span.end()
            recorded.append(list(span.attributes.items()))
        assert recorded[0] == recorded[1], recorded
    assert ag2._recorder(state, ag2._record_llm) is made  # the wrappers take the made one (_traced_sync, _async)


def test_a_selection_under_ours_reads_the_context_once(instrumented: SpanCapture, tmp_path: Any) -> None:
    """Every selection of a group chat runs under the manager's span: the scope is read from the Context, the
    span is the scope's owner (the Context's current span is not read), and the handoff is on that span."""
    reads: list[int] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and frame.f_code is groupchat.GroupChat.select_speaker.__code__ \
                and getattr(arg, "__name__", None) == "get" and type(getattr(arg, "__self__", None)) is Context:
            reads.append(1)

    manager = _profiled_handoffs(tmp_path, profile)
    selections = instrumented.handoffs()
    assert len(selections) >= 4 and len(reads) == len(selections), (len(reads), len(selections))
    turn = instrumented.one(f"invoke_agent {manager.name}")
    assert all(selection["span"] is turn for selection in selections)  # events on the manager's span, no spans
