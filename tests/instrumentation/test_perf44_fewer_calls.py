"""Calls of ours a model call and a speaker selection no longer make (issue 13, session 44).

A response's model whose type is exactly ``str`` goes straight to the name memo's ``redact`` (no ``redact_name``
frame, no ``str.__str__``); a ``str`` subclass still through ``redact_name``. A speaker selection under a span of
ours (the manager's turn: every selection of a group chat) reads the current span from the Context only when no
span of ours owns the scope. These tests pin both and that the output is what it was: secrets in a model name are
redacted, the handoff events land on the manager's span.
"""

from __future__ import annotations

import secrets
import sys
from typing import Any

import pytest
from autogen.agentchat import groupchat
from opentelemetry.context import Context

from cmbagent_otel import redaction
from cmbagent_otel.instrumentation import ag2
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
