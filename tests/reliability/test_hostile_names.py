"""Names are the app's or the model's text: a 1 MiB agent name or tool name (from the model's
tool call) must not be copied whole into span names, attributes and DB rows; the app is unchanged."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from autogen import ConversableAgent
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

HUGE = 1 << 20
BOUND = 64 * 1024  # far above any bounded name, far below one copy of a huge one


def test_huge_agent_and_tool_names_are_bounded(tmp_path: Path) -> None:
    memory = InMemorySpanExporter()
    db = tmp_path / "dag.db"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(SimpleSpanProcessor(DagSpanExporter(f"sqlite:///{db}")))
    cmbagent_otel.instrument(tracer_provider=provider, capture_content=False, instrument_cmbagent=False)
    try:
        name = "n" * HUGE
        tool = "t" * HUGE
        call = {"content": None, "tool_calls": [{"id": "call_1", "name": tool, "arguments": {}}]}
        assistant = ConversableAgent(name, human_input_mode="NEVER", llm_config={
            "config_list": [{"model": "scripted", client_key(): "ScriptedModelClient"}], "cache_seed": None})
        assistant.register_model_client(ScriptedModelClient, script=[call])
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
        user.initiate_chat(assistant, message="hi", max_turns=2, silent=True)
        assert assistant.name == name  # the app's agent is unchanged
    finally:
        cmbagent_otel.uninstrument()
        provider.shutdown()
    spans = memory.get_finished_spans()
    assert any(s.name.startswith("execute_tool t") for s in spans)
    for span in spans:
        assert len(span.name) < BOUND, span.name[:40]
        for key, value in (span.attributes or {}).items():
            assert len(str(value)) < BOUND, key
    conn = sqlite3.connect(db)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    assert len(str(value)) < BOUND, table
    finally:
        conn.close()
