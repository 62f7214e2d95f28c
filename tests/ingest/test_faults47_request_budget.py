"""A request too large for one attempt is written over its client's retries (47th fault campaign; the 45th and
46th campaigns' Left).

A connected client without a deadline had its whole request written in one go: 16 MiB of small spans held a
worker for up to ~2 minutes (two such clients, every worker), whatever else was waiting. An attempt now writes at
most ``CMBAGENT_OTEL_INGEST_REQUEST_SPANS`` spans (whole chunks of 1,000) and is answered 503 with ``Retry-After``
(gRPC: UNAVAILABLE with RetryInfo) after them, its progress kept by the body's digest; the client's retry of the
same body skips the chunks stored and writes the next ones. Nothing is written twice, nothing lost.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel.ingest import IngestServer
from tests.faults.conftest import stored_spans

from .conftest import post_json

REQUEST_SPANS = "CMBAGENT_OTEL_INGEST_REQUEST_SPANS"  # by name: main had no constant


def _request(spans: int) -> dict[str, Any]:
    trace = secrets.token_hex(16)
    return {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "js"}, "spans": [
        {"traceId": trace, "spanId": f"{n + 1:016x}", "name": f"s{n}", "kind": 1,
         "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000"}
        for n in range(spans)]}]}]}


def _first_answer(srv: IngestServer, doc: dict[str, Any]) -> tuple[int, str | None]:
    request = urllib.request.Request(srv.endpoint, data=json.dumps(doc).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Retry-After")


def test_a_request_beyond_one_attempts_spans_is_stored_over_its_retries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails on main 96d5dc3: the whole request written by its first attempt (200), the worker held throughout."""
    monkeypatch.setenv(REQUEST_SPANS, "1000")  # one chunk an attempt
    url = f"sqlite:///{tmp_path / 'ingest.db'}"
    doc = _request(3_500)
    with IngestServer(url, host="127.0.0.1", port=0, grpc_port="off") as srv:
        first = _first_answer(srv, doc)
        answers = [first[0]]
        for _ in range(10):  # an OTLP client sends it again (here at once)
            status, answer = post_json(srv, doc)
            answers.append(status)
            if status != 503:
                break
        counted = (srv.spans_written, srv.unavailable_responses)
    assert first == (503, "5")
    assert answers == [503, 503, 503, 200], answers
    assert answer.get("partialSuccess", {}).get("rejectedSpans") in (None, 0, "0"), answer
    assert counted == (3_500, 3)
    stored = stored_spans(url)
    assert len(stored) == 3_500 and set(stored.values()) == {1}


def test_a_request_within_one_attempt_and_a_new_body_are_written_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the budget exactly: answered at once. A request cut is continued by its own body only: another body
    (here the same spans and one more) starts from its first chunk."""
    monkeypatch.setenv(REQUEST_SPANS, "2000")
    url = f"sqlite:///{tmp_path / 'ingest.db'}"
    with IngestServer(url, host="127.0.0.1", port=0, grpc_port="off") as srv:
        assert post_json(srv, _request(2_000))[0] == 200
        doc = _request(3_000)
        assert post_json(srv, doc)[0] == 503
        spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
        other = {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "js"}, "spans": [*spans, {
            **spans[0], "spanId": f"{10_000:016x}"}]}]}]}
        assert post_json(srv, other)[0] == 503  # its own first 2,000, not the first body's rest
        assert post_json(srv, doc)[0] == 200  # the first body's rest
        assert post_json(srv, other)[0] == 200
        assert srv.spans_written == 2_000 + 3_000 + 3_001
    assert len(stored_spans(url)) == 2_000 + 3_000 + 1


def test_a_grpc_request_beyond_one_attempts_spans_is_answered_unavailable_with_retry_info(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same over gRPC: UNAVAILABLE with ``google.rpc.RetryInfo`` (what OTLP exporters retry), then OK."""
    import grpc
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    from .test_ingest_slow_clients import EXPORT, WAIT

    monkeypatch.setenv(REQUEST_SPANS, "1000")
    url = f"sqlite:///{tmp_path / 'ingest.db'}"
    trace = secrets.token_bytes(16)
    body = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[
        Span(trace_id=trace, span_id=(n + 1).to_bytes(8, "big"), name=f"s{n}", kind=1,
             start_time_unix_nano=1_700_000_000_000_000_000, end_time_unix_nano=1_700_000_001_000_000_000)
        for n in range(2_500)])])]).SerializeToString()
    codes = []
    with IngestServer(url, host="127.0.0.1", port="off", grpc_port=0) as srv, \
            grpc.insecure_channel(srv.grpc_endpoint) as channel:
        export = channel.unary_unary(EXPORT)
        for _ in range(10):
            try:
                export(body, timeout=WAIT)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                assert any(key == "google.rpc.retryinfo-bin" for key, _ in exc.trailing_metadata() or ())
                continue
            codes.append(grpc.StatusCode.OK)
            break
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 2 + [grpc.StatusCode.OK]
    stored = stored_spans(url)
    assert len(stored) == 2_500 and set(stored.values()) == {1}
