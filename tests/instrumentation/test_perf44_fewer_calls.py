"""Calls of ours a model call no longer makes (issue 13, session 44).

A response's model whose type is exactly ``str`` goes straight to the name memo's ``redact`` (no ``redact_name``
frame, no ``str.__str__``); a ``str`` subclass still through ``redact_name``. These tests pin it and that the
output is what it was: secrets in a model name are redacted.
"""

from __future__ import annotations

import secrets
import sys
from typing import Any

import pytest

from cmbagent_otel import redaction
from cmbagent_otel.instrumentation import ag2
from cmbagent_otel.testing import offline_agent
from tests.conftest import SpanCapture


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

