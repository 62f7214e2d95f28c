"""A secret split across the items of another instrumentation's string-array attribute.

Other instrumentations (OpenInference's message lists, an HTTP client's header values, a
streamed reply recorded chunk by chunk) put text on spans as arrays of strings. The DAG
writer redacted each item alone, so a key cut across two items was stored in both halves
(found open by the fifth campaign). Written by the DAG exporter into SQLite, and sent over
OTLP/HTTP to ``cmbagent-otel ingest``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Span
from sqlalchemy import create_engine, text

import cmbagent_otel as c
from cmbagent_otel import redaction
from cmbagent_otel.ingest import IngestServer


def _marker(shaped: bool) -> str:
    body = f"QZXW{secrets.token_hex(10)}WXZQ"
    return f"sk-{body}" if shaped else body


def _rows(url: str) -> Iterator[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            names = [r[0] for r in conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))]
            for name in names:
                for row in conn.execute(text(f'SELECT * FROM "{name}"')):
                    yield f"{name}: {row!r}"
    finally:
        engine.dispose()


def rows_of_a_foreign_span(tmp_path: Path, workflow: str, phase_attributes: dict[str, Any],
                           fill: Callable[[Span], None]) -> list[str]:
    """Every row, as text, of two SQLite databases after one run in which another
    instrumentation's span (``fill`` sets its attributes) sits under a step: one database written
    by the DAG exporter, the other by ``cmbagent-otel ingest`` from the same spans over OTLP/HTTP."""
    local, ingested = f"sqlite:///{tmp_path / 'local.db'}", f"sqlite:///{tmp_path / 'ingest.db'}"
    with IngestServer(ingested, host="127.0.0.1", port=0, grpc_port=0) as server:
        provider = TracerProvider()
        dag = DagSpanExporter(local)
        provider.add_span_processor(SimpleSpanProcessor(dag))
        provider.add_span_processor(SimpleSpanProcessor(
            OTLPSpanExporter(endpoint=f"http://127.0.0.1:{server.port}/v1/traces")))
        c.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
        try:
            tracer = provider.get_tracer("other.instrumentation")
            with c.workflow(workflow), c.phase("control", attributes=phase_attributes), \
                    c.step(1, "call", agent="engineer"), tracer.start_as_current_span("client call") as span:
                fill(span)
        finally:
            c.uninstrument()
            provider.force_flush()
            provider.shutdown()
        assert dag.stats()["exported"] > 0
    return list(_rows(local)) + list(_rows(ingested))


@pytest.mark.parametrize("which", ["shaped", "registered"])
def test_a_secret_split_across_array_items_of_a_foreign_span_is_not_stored(tmp_path: Path, which: str) -> None:
    secret = _marker(which == "shaped")
    if which == "registered":
        redaction.register_secret(secret)
    cut = len(secret) // 2
    first, second = secret[:cut], secret[cut:]
    stored = rows_of_a_foreign_span(
        tmp_path, "foreign arrays", {},
        lambda span: span.set_attribute("llm.output_chunks", (f"my key is {first}", f"{second} - keep it", "done")))
    assert any("keep it" in row for row in stored)  # the foreign span and its array are stored
    leaks = [row[:60] for row in stored if first in row or second in row]
    assert not leaks, leaks
