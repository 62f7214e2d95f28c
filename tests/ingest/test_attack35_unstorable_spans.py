"""A span the writer cannot store costs that span, never its request (35th attack campaign).

The DAG exporter writes a batch that fails unexpectedly in halves, dropping only the spans that fail.
The ingest server did not: any error of the writer other than the database being unavailable (a span
the mapping cannot take, a row the database refuses) answered the whole request 500 ``internal
error``, which OTLP clients do not retry, so every span of it was lost. Found with an ingest client's
``cmbagent.span.kind`` sent as a ``kvlistValue`` (decoded to a dict, unhashable: the mapping's lookup
of the kind raised ``TypeError``) and with JSON texts nested past the parser's depth
(``tests/reliability/test_attack35_deep_json.py``). Both are fixed where they arose; the server now
also isolates whatever else a writer refuses, as the exporter does.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, text

from cmbagent_otel.dag.statements import decode_json
from cmbagent_otel.ingest import IngestServer

from .conftest import post_json


def test_a_span_kind_sent_as_a_key_value_list_is_stored(sqlite_url: str) -> None:
    spans, ids = [], []
    for kind in ({"stringValue": "agent"}, {"kvlistValue": {"values": [{"key": "a", "value": {"stringValue": "b"}}]}},
                 {"arrayValue": {"values": [{"kvlistValue": {"values": []}}]}}):
        span_id = secrets.token_hex(8)
        ids.append(span_id)
        spans.append({"traceId": secrets.token_hex(16), "spanId": span_id, "name": "s", "kind": 1,
                      "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
                      "attributes": [{"key": "cmbagent.span.kind", "value": kind}]})
    doc = {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "js"}, "spans": spans}]}]}
    with IngestServer(sqlite_url, host="127.0.0.1", port=0, grpc_port="off") as srv:
        status, answer = post_json(srv, doc)
    assert status == 200 and "partialSuccess" not in answer, answer  # 500 "internal error" before
    engine = create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            rows = [(decode_json(m)["span_id"], sub) for m, sub in
                    conn.execute(text("SELECT meta, event_subtype FROM execution_events"))]
    finally:
        engine.dispose()
    assert {span_id for span_id, _ in rows} == set(ids)
    assert "{'a': 'b'}" in {sub for _, sub in rows}  # an unknown kind, shown as its text


class PickyWriter:
    """An application's own writer (``IngestServer(writer=...)``) that refuses spans named ``refused``."""

    def __init__(self) -> None:
        self.stored: list[str] = []

    def write(self, spans: Sequence[ReadableSpan]) -> None:
        if any(s.name == "refused" for s in spans):
            raise ValueError("cannot store a span named refused")
        self.stored.extend(s.name for s in spans)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_span_the_writer_refuses_costs_that_span_alone(protocol: str) -> None:
    writer = PickyWriter()
    with IngestServer(writer=writer, host="127.0.0.1", port=0, grpc_port=0) as srv:
        exporter = HttpExporter(endpoint=srv.endpoint) if protocol == "http" else \
            GrpcExporter(endpoint=f"127.0.0.1:{srv.grpc_port}", insecure=True)
        memory = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("client")
        for name in ("a", "b", "refused", "c", "d", "e", "f"):
            tracer.start_span(name).end()
        spans = memory.get_finished_spans()
        exporter.export(spans)  # one request of seven spans
        exporter.shutdown()
        provider.shutdown()
    assert sorted(writer.stored) == ["a", "b", "c", "d", "e", "f"]  # [] before: the request answered 500
