"""The ingest server against hostile and oversized input, run as an operator runs it (a
subprocess): every request gets a complete answer, memory stays bounded, and the server
keeps serving afterwards."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import sqlite3
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from .conftest import IngestProcess

MiB = 1 << 20
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


# --- building requests ------------------------------------------------------------------------------

_trace_ids = iter(range(1, 1 << 60))


def pb_request(spans: int = 2, attrs: dict[str, AnyValue] | None = None) -> tuple[ExportTraceServiceRequest, int]:
    """A request with ``spans`` spans of one fresh trace; returns it and the trace id."""
    trace_id = next(_trace_ids) << 64 | 0xABC
    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    scope.scope.name = "limits-test"
    for i in range(spans):
        span = scope.spans.add()
        span.trace_id = trace_id.to_bytes(16, "big")
        span.span_id = (i + 1).to_bytes(8, "big")
        if i:
            span.parent_span_id = (1).to_bytes(8, "big")
        span.name = f"span {i}"
        span.start_time_unix_nano, span.end_time_unix_nano = 1_000_000_000 + i, 2_000_000_000 + i
        for key, value in (attrs or {}).items():
            kv = span.attributes.add()
            kv.key = key
            kv.value.CopyFrom(value)
    return request, trace_id


def to_json(request: ExportTraceServiceRequest) -> bytes:
    from google.protobuf import json_format

    doc = json_format.MessageToDict(request)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(doc).encode()


def nested(depth: int) -> AnyValue:
    value = AnyValue(string_value="leaf")
    for _ in range(depth):
        outer = AnyValue()
        kv = outer.kvlist_value.values.add()
        kv.key = "k"
        kv.value.CopyFrom(value)
        value = outer
    return value


def big_array(count: int) -> AnyValue:
    value = AnyValue()
    value.array_value.values.extend(AnyValue(string_value=f"element {i:07d}") for i in range(count))
    return value


# --- talking HTTP/1.1 over a raw socket -------------------------------------------------------------

class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def message(self) -> str:
        if self.headers.get("content-type") == "application/x-protobuf":
            return status_pb2.Status.FromString(self.body).message
        try:
            return str(json.loads(self.body).get("message", ""))
        except ValueError:
            return self.body.decode("latin-1")


def exchange(port: int, head: bytes, body: bytes = b"", *, close_after: int | None = None,
             timeout: float = 300) -> Response | None:
    """Send a request (``head`` ends with the blank line), read one response; with
    ``close_after``, send only that many body bytes and hang up instead (returns None)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        if close_after is not None:
            sock.sendall(body[:close_after])
            return None
        if body:
            sock.sendall(body)  # a reset while sending fails the test: the server must read or drain
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without a response: {data!r}"
            data += chunk
        raw_head, _, rest = data.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(rest) < length:
                chunk = sock.recv(65536)
                assert chunk, "connection closed mid-response"
                rest += chunk
            return Response(status, headers, rest[:length])
        while chunk := sock.recv(65536):  # no length: chunked or up to the close (uvicorn's own 400)
            rest += chunk
        if headers.get("transfer-encoding") == "chunked":
            body, data = b"", rest
            while (size := int(data.split(b"\r\n", 1)[0], 16)) > 0:
                start = data.index(b"\r\n") + 2
                body, data = body + data[start:start + size], data[start + size + 2:]
            rest = body
        return Response(status, headers, rest)


def post_head(length: int | str | None, ctype: str = "application/x-protobuf", extra: str = "",
              chunked: bool = False) -> bytes:
    lines = ["POST /v1/traces HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {ctype}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(port: int, body: bytes, ctype: str = "application/x-protobuf", extra: str = "") -> Response:
    response = exchange(port, post_head(len(body), ctype, extra), body)
    assert response is not None
    return response


def chunked(*parts: bytes) -> bytes:
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


def stored_traces(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select meta from execution_events").fetchall()
    return {json.loads(m)["trace_id"] for (m,) in rows}


# --- the server under test --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IngestProcess, Path]]:
    db = tmp_path_factory.mktemp("limits") / "ingest.db"
    proc = IngestProcess(f"sqlite:///{db}", "--max-bytes", str(4 * MiB))
    yield proc, db
    code, _, err = proc.stop()
    assert code == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err, err[-3000:]


def assert_serving(proc: IngestProcess, db: Path) -> None:
    """A good request after a bad one: stored, 200."""
    request, trace_id = pb_request()
    response = post(proc.port, request.SerializeToString())
    assert response.status == 200, response.message()
    assert f"{trace_id:032x}" in stored_traces(db)


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def empty_span_flood(size: int) -> bytes:
    """A request of ``size`` bytes of empty spans (2 bytes each on the wire, ~200 parsed)."""
    spans = b"\x12\x00" * (size // 2)
    resource_spans = b"\x12" + varint(len(spans)) + spans
    return b"\x0a" + varint(len(resource_spans)) + resource_spans


def req(body: bytes, ctype: str = "application/x-protobuf", extra: str = "") -> tuple[bytes, bytes]:
    if body[:2] == b"\x1f\x8b" and not extra:
        extra = "Content-Encoding: gzip"
    return post_head(len(body), ctype, extra), body


JS = "application/json"
BAD = [
    # (id, (head, body), expected status, text in the error message)
    ("malformed-protobuf", req(b"\x0a\xff\xff\xff\xff\x0f"), 400, "protobuf"),
    ("protobuf-group-wire-type", req(b"\x0b"), 400, "group without its end"),
    ("empty-span-flood", req(empty_span_flood(2 * MiB)), 400, "invalid spans"),
    ("malformed-json", req(b"{not json", JS), 400, "invalid JSON"),
    # a wrong type outside any span (one inside a span rejects that span alone: test_json_poison_span.py)
    ("json-wrong-types", req(b'{"resourceSpans": [{"resource": {"attributes": 5}, "scopeSpans": []}]}', JS), 400,
     "OTLP/JSON"),
    ("json-not-an-object", req(b"[]", JS), 400, "object"),
    ("json-bad-hex-id", req(b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz"}]}]}]}', JS), 400,
     "hex"),
    ("json-nested-5000-deep", req(b'{"resourceSpans": ' + b"[" * 5000 + b"]" * 5000 + b"}", JS), 400,
     "invalid JSON"),
    ("huge-content-length", (post_head(10**15), b"x" * 100), 413, "exceeds"),
    ("negative-content-length", (post_head(-1), b""), 400, "Invalid HTTP"),
    ("garbage-content-length", (post_head("12abc"), b""), 400, "Invalid HTTP"),
    ("two-content-lengths", (post_head(3, extra="Content-Length: 4"), b"abcd"), 400, "Invalid HTTP"),
    ("chunk-size-minus-1", (post_head(None, chunked=True), b"-1\r\nabc\r\n0\r\n\r\n"), 400, "Invalid HTTP"),
    ("chunk-size-minus-2", (post_head(None, chunked=True), b"-2\r\nabc\r\n0\r\n\r\n"), 400, "Invalid HTTP"),
    ("chunk-size-garbage", (post_head(None, chunked=True), b"zz\r\nabc\r\n0\r\n\r\n"), 400, "Invalid HTTP"),
    ("chunk-size-21-digits", (post_head(None, chunked=True), b"f" * 21 + b"\r\nabc"), 400, "Invalid HTTP"),
    ("one-chunk-past-the-limit", (post_head(None, chunked=True), b"500000\r\n" + b"\x00" * (5 * MiB)), 413,
     "exceeds"),
    ("chunks-past-the-limit", (post_head(None, chunked=True), chunked(*[b"\x00" * MiB] * 5)), 413, "exceeds"),
    ("content-length-past-the-limit", req(b"\x00" * (5 * MiB)), 413, "exceeds"),
    ("unsupported-type", req(b"{}", "text/plain"), 415, "Content-Type"),
    ("unsupported-encoding", req(b"{}", extra="Content-Encoding: br"), 415, "Content-Encoding"),
    ("truncated-gzip", req(gzip.compress(b"x" * 1000)[:20]), 400, "gzip"),
    ("not-gzip", req(b"\x1f\x8b\x08garbage!"), 400, "gzip"),
    ("gzip-bomb", req(gzip.compress(b"\x00" * (64 * MiB))), 413, "decompressed"),
    ("gzip-trailing-garbage", req(gzip.compress(b"") + b"garbage"), 400, "gzip"),
    ("expect-100-too-large", (post_head(100 * MiB, extra="Expect: 100-continue"), b""), 413, "exceeds"),
]


@pytest.mark.parametrize(("request_", "status", "needle"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_answered_and_the_server_keeps_serving(server: tuple[IngestProcess, Path],
                                                            request_: tuple[bytes, bytes], status: int,
                                                            needle: str) -> None:
    proc, db = server
    head, body = request_
    response = exchange(proc.port, head, body)
    assert response is not None and response.status == status, response and response.body[:300]
    assert needle in response.message()
    if status == 503:
        assert response.headers["retry-after"]
    assert_serving(proc, db)


def test_methods_and_paths(server: tuple[IngestProcess, Path]) -> None:
    proc, db = server
    health = exchange(proc.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert health is not None and health.status == 200
    assert exchange(proc.port, b"GET /v1/metrics HTTP/1.1\r\nHost: x\r\n\r\n").status == 404  # type: ignore[union-attr]
    wrong = exchange(proc.port, b"PUT /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n", b"{}")
    assert wrong is not None and wrong.status == 405 and wrong.headers["allow"] == "POST"
    assert_serving(proc, db)


def test_disconnects_mid_body(server: tuple[IngestProcess, Path]) -> None:
    """Clients hanging up mid-request: no traceback, no reply needed, the server goes on
    (the module fixture checks the log has no BrokenPipe/ConnectionReset traceback)."""
    proc, db = server
    request, _ = pb_request(50)
    body = request.SerializeToString()
    for cut in (0, 1, len(body) // 2, len(body) - 1):
        exchange(proc.port, post_head(len(body)), body, close_after=cut)
    exchange(proc.port, post_head(None, chunked=True), b"10\r\n0123", close_after=8)
    for _ in range(10_000):  # until the server has seen every hang-up (each frees its place at once)
        health = exchange(proc.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert health is not None
        if json.loads(health.body)["in_flight"] == 0:
            break
    assert json.loads(health.body) == {"status": "ok", "in_flight": 0, "memory_reserved": 0,
                                       "spans_written": json.loads(health.body)["spans_written"]}
    assert_serving(proc, db)


def test_two_member_gzip_keeps_every_span(server: tuple[IngestProcess, Path]) -> None:
    proc, db = server
    first, first_id = pb_request(3)
    second, second_id = pb_request(4)
    # two members, each a whole request: protobuf concatenation merges them into one message
    body = gzip.compress(first.SerializeToString()) + gzip.compress(second.SerializeToString())
    response = post(proc.port, body, extra="Content-Encoding: gzip")
    assert response.status == 200, response.message()
    assert {f"{first_id:032x}", f"{second_id:032x}"} <= stored_traces(db)
    # JSON cannot be concatenated: two members of JSON are not one document
    doc = to_json(first)
    response = post(proc.port, gzip.compress(doc) + gzip.compress(doc), "application/json",
                    extra="Content-Encoding: gzip")
    assert response.status == 400 and "invalid JSON" in response.message()


def test_any_value_depth_counts_levels_in_both_encodings(server: tuple[IngestProcess, Path]) -> None:
    """JSON: ``max_depth`` (32) levels are read, 33 reject the span. Protobuf: 32 levels of maps are past
    protobuf's own nesting limit (100 messages from the request, 3 per level), which its parser refuses:
    the span is rejected at 32 and read at 31, as protobuf reads it (thirty-third fault campaign)."""
    proc, _ = server
    for encoding in ("protobuf", "json"):
        bounds = ((31, 0), (32, 1)) if encoding == "protobuf" else ((32, 0), (33, 1))
        for depth, rejected in bounds:
            request, _ = pb_request(1, {"deep": nested(depth)})
            body = request.SerializeToString() if encoding == "protobuf" else to_json(request)
            response = post(proc.port, body, f"application/{'x-protobuf' if encoding == 'protobuf' else 'json'}")
            assert response.status == 200, (encoding, depth, response.message())
            if encoding == "protobuf":
                partial = ExportTraceServiceResponse.FromString(response.body).partial_success
                got = partial.rejected_spans
            else:
                got = int(json.loads(response.body).get("partialSuccess", {}).get("rejectedSpans", 0))
            assert got == rejected, (encoding, depth)


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_huge_arrays_and_strings_are_bounded_like_strings(server: tuple[IngestProcess, Path], encoding: str) -> None:
    proc, db = server
    attrs = {"array": big_array(60_000), "long": AnyValue(string_value="y" * MiB)}
    request, trace_id = pb_request(1, attrs)
    body = request.SerializeToString() if encoding == "protobuf" else to_json(request)
    assert len(body) > 2 * MiB
    ctype = "application/x-protobuf" if encoding == "protobuf" else "application/json"
    response = post(proc.port, body, ctype)
    assert response.status == 200, response.message()
    with sqlite3.connect(db) as conn:
        (meta,) = [m for (m,) in conn.execute("select meta from execution_events")
                   if json.loads(m)["trace_id"] == f"{trace_id:032x}"]
    attributes = json.loads(meta)["attributes"]
    assert len(attributes["long"]) == 4096 and attributes["long"].endswith("...[truncated]")
    assert 1 <= len(attributes["array"]) <= 128 and attributes["array"][0] == "element 0000000"
    assert len(meta) < 16 * 1024


def test_wrong_id_lengths_are_partial_success(server: tuple[IngestProcess, Path]) -> None:
    proc, _ = server
    request, _ = pb_request(3)
    spans = request.resource_spans[0].scope_spans[0].spans
    spans[1].trace_id = b"\x01" * 15
    spans[2].span_id = b"\x02" * 9
    response = post(proc.port, request.SerializeToString())
    assert response.status == 200
    partial = ExportTraceServiceResponse.FromString(response.body).partial_success
    assert partial.rejected_spans == 2 and "trace_id must be 16 bytes" in partial.error_message


def test_grpc_receiver_answers_like_otlp_asks(server: tuple[IngestProcess, Path]) -> None:
    proc, db = server
    with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}",
                               options=[("grpc.max_send_message_length", 64 * MiB)]) as channel:
        export = channel.unary_unary(EXPORT)  # raw bytes in and out
        request, trace_id = pb_request(5)
        reply = export(request.SerializeToString(), timeout=30, compression=grpc.Compression.Gzip)
        assert not ExportTraceServiceResponse.FromString(reply).HasField("partial_success")
        assert f"{trace_id:032x}" in stored_traces(db)
        cases = [
            (b"\x0a\xff\xff\xff\xff\x0f", grpc.StatusCode.INVALID_ARGUMENT),
            (pb_request(1, {"long": AnyValue(string_value="z" * 5 * MiB)})[0].SerializeToString(),
             grpc.StatusCode.RESOURCE_EXHAUSTED),
        ]
        for body, code in cases:
            with pytest.raises(grpc.RpcError) as info:
                export(body, timeout=30)
            assert info.value.code() == code
        with pytest.raises(grpc.RpcError) as info:  # a gzip bomb: the limit holds after decompression
            export(b"\x0a" + b"\x00" * (8 * MiB), timeout=30, compression=grpc.Compression.Gzip)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serving(proc, db)


# --- memory under load -----------------------------------------------------------------------------

def realistic_body(encoding: str, size: int) -> bytes:
    """``size`` bytes of OTLP made of a recorded instrumented run cloned under fresh trace ids."""
    from ingest_app import otlp_json, run
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanContext, TraceFlags

    import cmbagent_otel

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False,
                             capture_content=True)
    try:
        run("rss")
    finally:
        cmbagent_otel.uninstrument()
        provider.shutdown()
    template = list(memory.get_finished_spans())

    def clone(span: ReadableSpan, trace_id: int) -> ReadableSpan:
        def ctx(c: SpanContext) -> SpanContext:
            return SpanContext(trace_id, c.span_id, False, TraceFlags(TraceFlags.SAMPLED))

        return ReadableSpan(name=span.name, context=ctx(span.context),
                            parent=ctx(span.parent) if span.parent else None, resource=span.resource,
                            attributes=span.attributes, events=span.events, kind=span.kind, status=span.status,
                            start_time=span.start_time, end_time=span.end_time,
                            instrumentation_scope=span.instrumentation_scope)

    encode = (lambda s: encode_spans(s).SerializeToString()) if encoding == "protobuf" else (
        lambda s: json.dumps(otlp_json(s)).encode())
    per_span = len(encode(template)) / len(template)
    spans = [clone(s, next(_trace_ids) << 64 | 7) for _ in range(int(size / per_span / len(template)) + 1)
             for s in template]
    body = encode(spans[: int(size / per_span)])
    return body


def array_body(size: int) -> bytes:
    """OTLP/JSON of a few spans whose array attributes hold ``size`` bytes in all."""
    request, _ = pb_request(4, {"array": big_array(size // 4 // 38)})
    return to_json(request)


@pytest.mark.parametrize("kind", ["protobuf", "json", "json-arrays", "protobuf-gzip"])
def test_eight_concurrent_10mib_posts_stay_under_256mib(tmp_path: Path, kind: str) -> None:
    body = array_body(10 * MiB) if kind == "json-arrays" else realistic_body(kind.split("-")[0], 10 * MiB)
    ctype = "application/json" if kind.startswith("json") else "application/x-protobuf"
    extra = ""
    if kind.endswith("gzip"):
        body, extra = gzip.compress(body, 1), "Content-Encoding: gzip"
    assert 9 * MiB < len(body) <= 10 * MiB or kind.endswith("gzip")
    proc = IngestProcess(f"sqlite:///{tmp_path / 'rss.db'}")
    results: list[Any] = []
    try:
        start = threading.Barrier(8)

        def send() -> None:
            start.wait()
            try:
                response = post(proc.port, body, ctype, extra)
                results.append((response.status, response.headers.get("retry-after")))
            except Exception as exc:  # a reset or a hang is a failure of the server
                results.append(exc)

        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        peak_kib = proc.status("VmHWM")
    finally:
        code, _, err = proc.stop()
    print(f"\ningest {kind}: 8 x {len(body) / MiB:.1f} MiB -> {sorted(map(str, results))}; "
          f"server peak RSS {peak_kib / 1024:.0f} MiB")
    assert len(results) == 8
    assert all(isinstance(r, tuple) and r[0] in (200, 413, 503) for r in results), results
    assert all(r[1] for r in results if r[0] == 503)  # Retry-After on every 503
    assert any(r[0] == 200 for r in results), results
    assert peak_kib < 256 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert code == 0 and "Traceback" not in err, err[-3000:]


def test_gzip_member_boundaries_are_found_in_deflate_streams() -> None:
    """Unit check of the decompressor the HTTP receiver uses: member after member, bounded."""
    from cmbagent_otel._ingest_core import IngestError, gunzip

    members = [gzip.compress(bytes([i]) * 1000) for i in range(3)]
    assert gunzip(b"".join(members), 10_000) == b"".join(bytes([i]) * 1000 for i in range(3))
    with pytest.raises(IngestError) as info:
        gunzip(b"".join(members), 2500)
    assert info.value.kind == "too_large"
    raw_deflate = zlib.compress(b"abc")
    with pytest.raises(IngestError) as info:
        gunzip(raw_deflate, 100)
    assert info.value.kind == "invalid"
