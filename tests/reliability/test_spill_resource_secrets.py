"""A secret in the resource of a provider the application built never reaches a spill file.

Found by the eleventh campaign: the ninth redacted the resource of the providers ``instrument()``
builds; an application that builds its own provider (``instrument(tracer_provider=...)``, or the DAG
exporter in its own pipeline) keeps ``OTEL_RESOURCE_ATTRIBUTES`` and detector values as given, and
the spill store wrote that resource into every spill file on disk (``db.password=…``, a collector
URL with its password, a registered key), for our spans and other instrumentations' alike. The
resource of every spilled span is now scrubbed like its attributes (once per resource object); so
are the attributes of another instrumentation's span links, which went to the file as given too.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel as c
from cmbagent_otel import redaction, spill

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def test_the_resource_of_spilled_spans_is_scrubbed(tmp_path: Path) -> None:
    password, url_password, registered = (f"QZXW{secrets.token_hex(10)}" for _ in range(3))
    redaction.register_secret(registered)
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({
        "service.name": "pipeline", "db.password": password, "deployment.note": f"key {registered}",
        "collector.url": f"https://svc:{url_password}@collector.example:4318"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    c.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        linked = trace.SpanContext(0x1F, 0x2F, is_remote=True)
        with c.workflow("spilled"), provider.get_tracer("other.instrumentation").start_as_current_span(
                "call", links=[trace.Link(linked, {"db.password": password, "peer": f"key {registered}"})]):
            pass
    finally:
        c.uninstrument()
    spans = memory.get_finished_spans()
    assert {s.name for s in spans} >= {"call"} and len(spans) >= 2  # ours and another instrumentation's
    exporter = DagSpanExporter(f"sqlite:///{tmp_path / 'dag.db'}", spill_dir=str(tmp_path / "spill"))
    try:
        exporter.spill_overflow(spans)
        files = [path for path in (tmp_path / "spill").rglob("*") if path.is_file()]
        assert files
        leaks = [path.name for path in files for secret in (password, url_password, registered)
                 if secret.encode() in path.read_bytes()]
        assert not leaks, leaks
        kept = [span for path in files for span in spill.SpillStore.read(path)]
        assert len(kept) == len(spans) and all(s.resource.attributes["service.name"] == "pipeline" for s in kept)
        assert exporter.replay()[0] == len(spans)  # and they are stored
    finally:
        exporter.shutdown()
        provider.shutdown()
