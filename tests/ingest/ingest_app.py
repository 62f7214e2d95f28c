"""A small planning/control run with real AG2 agents answering offline.

Imported by the in-process tests (:func:`run`) and executed as a script by the
multi-process test: ``python agent_app.py TAG`` instruments from the ``OTEL_*`` variables,
runs once and flushes on exit.
"""

from __future__ import annotations

import base64
import sys
from typing import Any

from autogen import ConversableAgent
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel
from cmbagent_otel.testing import offline_agent

STEPS = 2


def run(tag: str, steps: int = STEPS) -> None:
    """One ``planning-control`` workflow: a planning chat, then one engineer chat per step."""
    planner = offline_agent("planner", [f"plan {tag}: " + ", ".join(f"{i}. part {i}" for i in range(1, steps + 1))])
    engineer = offline_agent("engineer", [f"{tag} step {i} done" for i in range(1, steps + 1)])
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    with cmbagent_otel.workflow(f"ingest-{tag}", mode="planning-control", task=f"task {tag}",
                                agent="engineer", model="scripted"):
        with cmbagent_otel.phase("planning"):
            user.initiate_chat(planner, message=f"plan {tag}", max_turns=1, silent=True)
        with cmbagent_otel.phase("control"):
            for number in range(1, steps + 1):
                with cmbagent_otel.step(number, f"part {number}", agent="engineer"):
                    user.initiate_chat(engineer, message=f"do part {number}", max_turns=1, silent=True)


def recorded(tag: str, steps: int = STEPS) -> list[ReadableSpan]:
    """The spans of one :func:`run`, instrumented in this process and kept in memory."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        run(tag, steps)
    finally:
        cmbagent_otel.uninstrument()
        provider.shutdown()
    return list(memory.get_finished_spans())


def otlp_json(spans: list[ReadableSpan]) -> dict[str, Any]:
    """The OTLP/JSON encoding of ``spans``: proto3 JSON with hex ids, as OTLP/JSON exporters send."""
    doc = json_format.MessageToDict(encode_spans(spans))

    def hexify(obj: dict[str, Any]) -> None:
        for key in ("traceId", "spanId", "parentSpanId"):
            if key in obj:
                obj[key] = base64.b64decode(obj[key]).hex()

    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                hexify(span)
                for link in span.get("links", []):
                    hexify(link)
    return doc


if __name__ == "__main__":
    cmbagent_otel.instrument()
    try:
        run(sys.argv[1])
    finally:
        cmbagent_otel.uninstrument()
    print("DONE", sys.argv[1], flush=True)
