"""An AG2 release whose classic API lacks a method we wrap: instrument() says so in one line and instruments
the rest (an AG2 without the classic ``autogen`` package: test_without_autogen.py)."""

from __future__ import annotations

import logging

import pytest
from autogen import ConversableAgent
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cmbagent_otel.instrumentation.ag2 import AG2Instrumentor
from cmbagent_otel.testing import offline_agent


def test_a_missing_method_is_one_warning_and_the_rest_is_instrumented(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # an AG2 line whose ConversableAgent has no a_get_human_input (as if renamed in a release)
    monkeypatch.delattr(ConversableAgent, "a_get_human_input")
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    instrumentor = AG2Instrumentor()
    with caplog.at_level(logging.WARNING, logger="cmbagent_otel"):
        instrumentor.instrument(tracer_provider=provider)
    try:
        alice = offline_agent("alice", ["an answer"])
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
        bob.initiate_chat(alice, message="a question", max_turns=1, silent=True)
    finally:
        instrumentor.uninstrument()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "cmbagent_otel"]
    assert len(warnings) == 1, warnings
    assert "lacks ConversableAgent.a_get_human_input:" in warnings[0]
    assert "\n" not in warnings[0]
    names = {span.name for span in memory.get_finished_spans()}
    assert {"conversation alice", "invoke_agent alice", "chat scripted"} <= names
