"""instrument() / uninstrument() repeated: every round records spans (subprocess: the global
provider can be set once per process)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import cmbagent_otel
from cmbagent_otel import phase, workflow
from cmbagent_otel.testing import offline_agent
from autogen import ConversableAgent

counts, providers = [], []
for round_ in range(5):
    memory = InMemorySpanExporter()
    provider = cmbagent_otel.instrument(exporters="none", span_exporters=[memory], instrument_cmbagent=False)
    providers.append(provider)
    with workflow(f"round {round_}"), phase("control"):
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
        bob.initiate_chat(offline_agent("alice", ["pong"]), message="ping", max_turns=1, silent=True)
    with trace.get_tracer("other.library").start_as_current_span("through the global provider"):
        pass
    cmbagent_otel.uninstrument()  # flushes the round's processors into memory
    counts.append(len(memory.get_finished_spans()))
    with trace.get_tracer("other.library").start_as_current_span("after uninstrument"):
        pass  # goes nowhere, and nowhere it could fail
print(f"COUNTS {counts}")
print(f"SAME {all(p is providers[0] for p in providers)} {trace.get_tracer_provider() is providers[0]}")
"""


def test_every_round_of_instrument_records_spans():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    counts = eval(proc.stdout.split("COUNTS", 1)[1].splitlines()[0])
    assert len(counts) == 5 and len(set(counts)) == 1 and counts[0] > 3, counts
    assert "SAME True True" in proc.stdout  # one provider, the global one, refilled each round
