"""A flood of empty containers or spans costs the ingest no more than reading them.

OTLP nests spans in ``ResourceSpans`` and ``ScopeSpans``; the decoder built the SDK ``Resource``
of each ``ResourceSpans`` and the scope of each ``ScopeSpans`` before looking for spans. An
empty one is 2 bytes of protobuf (``0a 00``) or 3 of JSON (``{},``): a 16 MiB request of them
cost ~30 s of CPU (3 us per empty resource, 7 us per empty scope, parsed by ``json_format`` at
~8 us each for JSON) and stored nothing, so a few clients kept every decoding worker busy. Empty
spans were already rejected without a parse; now a resource and a scope are built for their
first span only, and empty JSON containers are dropped before parsing (one holding a resource or a
scope is still parsed, so that a wrong type there fails the request as before). JSON spans
without a trace id (``{}``) are rejected before parsing too, and past 10,000 rejected spans a JSON
request is malformed (400), as a protobuf one already was.

The work is counted, not timed: calls into the OpenTelemetry SDK and ``json_format`` while a
request of 20,000 empty containers and one real span is decoded (the real span needs a few).
"""

from __future__ import annotations

import json
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, text

from cmbagent_otel import otlp_decode
from cmbagent_otel.ingest import IngestServer

N = 20_000


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _fixed64(number: int, value: int) -> bytes:
    return _varint(number << 3 | 1) + value.to_bytes(8, "little")


def _pb_span(name: str) -> bytes:
    return (_field(1, secrets.token_bytes(16)) + _field(2, secrets.token_bytes(8)) + _field(5, name.encode())
            + _fixed64(7, 1_700_000_000_000_000_000) + _fixed64(8, 1_700_000_001_000_000_000))


def _pb_request(kind: str, name: str) -> bytes:
    """``N`` empty ResourceSpans (or one holding ``N`` empty ScopeSpans), then one real span."""
    real = _field(1, _field(2, _field(2, _pb_span(name))))
    if kind == "resources":
        return _field(1, b"") * N + real
    return _field(1, _field(2, b"") * N) + real


def _json_span(name: str) -> dict[str, Any]:
    return {"traceId": secrets.token_hex(16), "spanId": secrets.token_hex(8), "name": name, "kind": 1,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000"}


def _json_request(kind: str, name: str) -> bytes:
    real = {"resource": {}, "scopeSpans": [{"scope": {}, "spans": [_json_span(name)]}]}
    if kind == "resources":
        doc = {"resourceSpans": [{}] * N + [real]}
    else:
        doc = {"resourceSpans": [{"scopeSpans": [{}] * N}, real]}
    return json.dumps(doc).encode()


def _json_empty_spans(count: int, name: str) -> bytes:
    spans = [{}] * count + [_json_span(name)]
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}).encode()


def _library_calls(decode: Callable[[], Any]) -> int:
    """Python calls into the OpenTelemetry SDK and protobuf's ``json_format`` while ``decode`` runs."""
    calls = 0

    def profile(frame: Any, event: str, _arg: Any) -> None:
        nonlocal calls
        if event == "call":
            filename = frame.f_code.co_filename
            if "opentelemetry/sdk" in filename or "json_format" in filename:
                calls += 1

    sys.setprofile(profile)
    try:
        decode()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("kind", ["resources", "scopes"])
@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_empty_containers_cost_no_resource_or_scope_each(encoding: str, kind: str) -> None:
    limits = otlp_decode.Limits.default()
    if encoding == "protobuf":
        body = _pb_request(kind, "real")
        iterate: Callable[..., Iterator[otlp_decode.DecodedBatch]] = otlp_decode.iter_protobuf
    else:
        body = _json_request(kind, "real")
        iterate = otlp_decode.iter_json
    spans: list[Any] = []
    calls = _library_calls(lambda: [spans.extend(b.spans) for b in iterate(body, limits=limits, chunk=1000)])
    assert [s.name for s in spans] == ["real"]
    # one resource, one scope and one span: a few hundred calls; before, thousands per 1,000 containers
    assert calls < 1000, f"{calls} library calls for {N} empty {kind} ({len(body)} bytes)"


def test_empty_json_spans_are_rejected_without_a_parse_each() -> None:
    """Protobuf's empty spans were rejected before a parse, and past MAX_REJECTED the request was
    malformed (400); JSON's ``{}`` spans were each parsed by ``json_format`` and rejected later, with
    no bound on their count: 400,000 of them (1.2 MB, within the memory budget) cost 5.8 s of CPU."""
    limits = otlp_decode.Limits.default()
    body = _json_empty_spans(5000, "real")
    batches: list[otlp_decode.DecodedBatch] = []
    calls = _library_calls(lambda: batches.extend(otlp_decode.iter_json(body, limits=limits)))
    assert [s.name for b in batches for s in b.spans] == ["real"]
    assert sum(b.rejected for b in batches) == 5000
    assert calls < 1000, f"{calls} library calls for 5000 empty spans"
    with pytest.raises(otlp_decode.MalformedPayload, match="more than 10000 invalid spans"):
        list(otlp_decode.iter_json(_json_empty_spans(otlp_decode.MAX_REJECTED + 1, "real"), limits=limits))


def test_the_server_answers_floods_of_empty_containers_and_stores_their_spans(sqlite_url: str) -> None:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    with IngestServer(sqlite_url, port=0, grpc_port=0) as srv:
        for kind in ("resources", "scopes"):
            for encoding, body in (("protobuf", _pb_request(kind, f"pb-{kind}")),
                                   ("json", _json_request(kind, f"json-{kind}"))):
                ctype = "application/x-protobuf" if encoding == "protobuf" else "application/json"
                request = urllib.request.Request(srv.endpoint, data=body, method="POST",
                                                 headers={"Content-Type": ctype})
                with urllib.request.urlopen(request, timeout=60) as answer:
                    assert answer.status == 200
            request = urllib.request.Request(srv.endpoint, data=_json_empty_spans(50_000, "lost"), method="POST",
                                             headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=60)
            assert info.value.code == 400 and b"more than 10000 invalid spans" in info.value.read()
            with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
                export = channel.unary_unary(
                    "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                    request_serializer=lambda b: b,
                    response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString)
                export(_pb_request(kind, f"grpc-{kind}"), timeout=60)
    engine = create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT COUNT(*) FROM execution_events")).scalar_one()
    finally:
        engine.dispose()
    assert stored == 6  # the real span of each of the six requests, nothing else
