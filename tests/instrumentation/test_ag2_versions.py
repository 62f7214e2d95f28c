"""AG2 releases whose classic API differs from the one the tests run: instrument() says so in one line and
instruments the rest; an AG2 without the classic ``autogen`` package (ag2 1.x) is never a crash."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

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
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "lacks ConversableAgent.a_get_human_input:" in warnings[0]
    assert "\n" not in warnings[0]
    names = {span.name for span in memory.get_finished_spans()}
    assert {"conversation alice", "invoke_agent alice", "chat scripted"} <= names


# An AG2 whose `autogen` package cannot be imported (ag2 1.x ships only the new `ag2` package): the
# application runs, its workflow spans are recorded, and one warning says AG2 is not instrumented.
NO_AUTOGEN = textwrap.dedent("""
    import logging, sys
    sys.modules["autogen"] = None  # `import autogen` now fails as it does under ag2 1.x
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import cmbagent_otel
    names = []
    for label in ("first", "second"):
        memory = InMemorySpanExporter()
        cmbagent_otel.instrument(span_exporters=[memory], exporters=[])
        with cmbagent_otel.workflow(label):
            pass
        cmbagent_otel.uninstrument()
        names += [span.name for span in memory.get_finished_spans()]
    print("SPANS", sorted(names))
""")


def test_no_classic_autogen_is_one_warning_and_no_crash() -> None:
    result = subprocess.run([sys.executable, "-c", NO_AUTOGEN], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stdout
    assert "no importable classic `autogen` package" in warnings[0]
    assert "AG2 is not instrumented" in warnings[0]
    assert "SPANS ['workflow first', 'workflow second']" in result.stdout
