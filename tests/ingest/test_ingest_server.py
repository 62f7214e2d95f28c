"""The OTLP/HTTP ingest server over real sockets, fed by the SDK's own OTLP exporter."""

from __future__ import annotations

import gzip
import http.client
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.rpc import status_pb2
from ingest_app import otlp_json, run
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

import cmbagent_otel
from cmbagent_otel.dag.writer import DagWriter, dump_tables
from cmbagent_otel.ingest import IngestServer

TOKEN = "s3cret-ingest-token"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[IngestServer]:
    with IngestServer(sqlite_url(tmp_path / "ingest.db"), host="127.0.0.1", port=0, grpc_port=0, token=TOKEN) as srv:
        yield srv


def run_spans(*exporters: Any, tag: str = "a") -> list[ReadableSpan]:
    """Run the agent app once under a fresh provider; returns its finished spans."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=5))
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        run(tag)
    finally:
        cmbagent_otel.uninstrument()
        assert provider.force_flush()
        provider.shutdown()
    return list(memory.get_finished_spans())


def tables(url: str) -> dict[str, list[tuple[Any, ...]]]:
    writer = DagWriter(url)
    try:
        with writer.engine.connect() as conn:
            return dump_tables(conn)
    finally:
        writer.close()


def post(srv: IngestServer, body: bytes, headers: dict[str, str], path: str = "/v1/traces"
         ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}
PB = {**AUTH, "Content-Type": "application/x-protobuf"}
JS = {**AUTH, "Content-Type": "application/json"}


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_sdk_exporter_rows_equal_direct_dag_writer(server: IngestServer, tmp_path: Path,
                                                   compression: Compression) -> None:
    exporter = OTLPSpanExporter(endpoint=server.endpoint, headers=AUTH, compression=compression)
    spans = run_spans(exporter)
    assert server.spans_written == len(spans) > 10
    direct = sqlite_url(tmp_path / "direct.db")
    DagWriter(direct).write(spans)
    over_the_wire = tables(server.db_url or "")
    assert over_the_wire == tables(direct)
    assert len(over_the_wire["workflow_runs"]) == 1
    assert {row for row in over_the_wire["dag_nodes"]}  # planning, control, steps


def test_json_payload_lands_and_answers_json(server: IngestServer, tmp_path: Path) -> None:
    spans = run_spans(tag="json")
    status, headers, body = post(server, json.dumps(otlp_json(spans)).encode(), JS)
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {}
    root = next(s for s in spans if s.parent is None)
    run_id = str(uuid.UUID(int=root.context.trace_id))
    writer = DagWriter(server.db_url)
    with writer.engine.connect() as conn:
        row = conn.execute(text("select mode, status, task_description from workflow_runs where id = :id"),
                           {"id": run_id}).one()
    writer.close()
    assert row.mode == "planning-control" and row.task_description == "task json"
    direct = sqlite_url(tmp_path / "direct.db")
    DagWriter(direct).write(spans)
    assert tables(server.db_url or "") == tables(direct)


def test_partial_success_reports_rejected_spans(server: IngestServer) -> None:
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [
        {"traceId": "0a" * 16, "spanId": "0b" * 8, "name": "good", "startTimeUnixNano": "1", "endTimeUnixNano": "2",
         "attributes": [  # non-SDK attribute kinds must still be storable
             {"key": "raw", "value": {"bytesValue": "AAE="}},
             {"key": "map", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"intValue": "3"}}]}}},
             {"key": "mixed", "value": {"arrayValue": {"values": [{"intValue": "1"}, {"stringValue": "x"}]}}},
         ]},
        {"traceId": "00" * 16, "spanId": "0c" * 8, "name": "bad"},
    ]}]}]}
    status, _, body = post(server, json.dumps(doc).encode(), JS)
    assert status == 200
    partial = json.loads(body)["partialSuccess"]
    assert int(partial["rejectedSpans"]) == 1 and "all zeros" in partial["errorMessage"]
    status, _, body = post(server, gzip.compress(json.dumps(doc).encode()), {**JS, "Content-Encoding": "gzip"})
    assert status == 200
    assert server.spans_written == 2


def error_message(body: bytes, protobuf: bool) -> str:
    if protobuf:
        return status_pb2.Status.FromString(body).message
    return str(json.loads(body)["message"])


@pytest.mark.parametrize(("body", "headers", "code", "needle"), [
    (b"\x0a\xff\xff\xff\xff\x0f", PB, 400, "protobuf"),
    (b"{not json", JS, 400, "invalid JSON"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz"}]}]}]}', JS, 400, "hex"),
    (b"\x1f\x8b\x08garbage", {**PB, "Content-Encoding": "gzip"}, 400, "gzip"),
    (b"{}", {**AUTH, "Content-Type": "text/plain"}, 415, "Content-Type"),
    (b"{}", {**JS, "Content-Encoding": "br"}, 415, "Content-Encoding"),
    (b"{}", {"Content-Type": "application/json"}, 401, "token"),
    (b"{}", {"Content-Type": "application/json", "Authorization": "Bearer wrong"}, 401, "token"),
    (b"{}", {"Content-Type": "application/json", "Authorization": f"Basic {TOKEN}"}, 401, "token"),
])
def test_client_errors(server: IngestServer, body: bytes, headers: dict[str, str], code: int, needle: str) -> None:
    status, resp_headers, resp = post(server, body, headers)
    assert status == code
    protobuf = headers.get("Content-Type") == "application/x-protobuf"
    assert needle in error_message(resp, protobuf)
    if code == 401:
        assert resp_headers["www-authenticate"].startswith("Bearer")
    assert TOKEN not in resp.decode("latin-1")
    assert server.spans_written == 0


def test_unknown_path_is_404(server: IngestServer) -> None:
    status, _, _ = post(server, b"{}", JS, path="/v1/metrics")
    assert status == 404


def test_oversize_bodies_are_413(tmp_path: Path) -> None:
    with IngestServer(sqlite_url(tmp_path / "small.db"), port=0, grpc_port=0, max_bytes=1024) as srv:
        status, _, body = post(srv, b"{" + b" " * 2048 + b"}", {"Content-Type": "application/json"})
        assert status == 413 and "1024" in error_message(body, False)
        bomb = gzip.compress(b"{" + b" " * 100_000 + b"}")
        assert len(bomb) < 1024
        status, _, _ = post(srv, bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert status == 413
        assert srv.spans_written == 0


def test_token_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a token of its own: the server registers it as a secret for the rest of the process (a word such as
    # "from-env" would then be redacted in every later test's spans)
    token = f"ingest-env-token-{uuid.uuid4().hex}"
    monkeypatch.setenv("CMBAGENT_OTEL_INGEST_TOKEN", token)
    with IngestServer(sqlite_url(tmp_path / "env.db"), port=0, grpc_port=0) as srv:
        assert token not in repr(srv)
        assert post(srv, b"{}", {"Content-Type": "application/json"})[0] == 401
        assert post(srv, b"{}", {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})[0] == 200


def test_unreachable_postgres_is_503_with_retry_after(tmp_path: Path) -> None:
    with IngestServer("postgresql+psycopg://u:p@127.0.0.1:1/nodb", port=0, grpc_port=0, retry_after=7) as srv:
        spans = run_spans(tag="pg")
        status, headers, body = post(srv, encode_spans(spans).SerializeToString(),
                                     {"Content-Type": "application/x-protobuf"})
        assert status == 503
        assert headers["retry-after"] == "7"
        assert "unavailable" in error_message(body, True)
        assert ":p@" not in body.decode("latin-1")


def test_exporter_retries_503_until_the_database_is_back(tmp_path: Path) -> None:
    db_path = tmp_path / "later.db"
    db_path.mkdir()  # a directory where the SQLite file should be: "unable to open database file"
    spans = run_spans(tag="later")
    with IngestServer(sqlite_url(db_path), port=0, grpc_port=0, retry_after=1) as srv:
        exporter = OTLPSpanExporter(endpoint=srv.endpoint, timeout=60)
        result: list[SpanExportResult] = []
        sender = threading.Thread(target=lambda: result.append(exporter.export(spans)))
        sender.start()
        deadline = time.monotonic() + 30
        while srv.unavailable_responses == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.unavailable_responses >= 1
        db_path.rmdir()
        sender.join(timeout=60)
        assert result == [SpanExportResult.SUCCESS]
        assert srv.spans_written == len(spans)
    assert len(tables(sqlite_url(db_path))["workflow_runs"]) == 1


def test_protobuf_response_is_export_trace_service_response(server: IngestServer) -> None:
    spans = run_spans(tag="pb")
    status, headers, body = post(server, encode_spans(spans).SerializeToString(), PB)
    assert status == 200 and headers["content-type"] == "application/x-protobuf"
    assert not ExportTraceServiceResponse.FromString(body).HasField("partial_success")
    # the same batch again is idempotent: nothing duplicated
    before = tables(server.db_url or "")
    assert post(server, encode_spans(spans).SerializeToString(), PB)[0] == 200
    assert tables(server.db_url or "") == before


def test_start_stop_are_idempotent(tmp_path: Path) -> None:
    srv = IngestServer(sqlite_url(tmp_path / "x.db"), port=0, grpc_port=0)
    assert srv.port is None
    srv.start()
    port = srv.port
    assert port and srv.start().port == port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    srv.stop()
    srv.stop()
    assert srv.port is None
