"""OTLP decoding: what the SDK's own encoder produces decodes back to the same spans."""

from __future__ import annotations

import base64
import json

import pytest
from ingest_app import otlp_json
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

import cmbagent_otel
from cmbagent_otel import _spans, semconv
from cmbagent_otel.otlp_decode import MalformedPayload, decode_json, decode_protobuf, encode_response


@pytest.fixture
def workflow_spans() -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "decode-test", "host.cores": 2}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    routed = _spans.workflow_tracers.routed_to(provider)
    routed.__enter__()
    try:
        with cmbagent_otel.workflow("decode", mode="planning-control", task="t"):
            with cmbagent_otel.phase("planning"):
                pass
            with cmbagent_otel.phase("control"), cmbagent_otel.step(1, "goal", agent="engineer") as st:
                st.set_attribute("custom.list", ["a", "b"])
                st.set_attribute("custom.float", 1.5)
                st.set_attribute("custom.bool", True)
                try:
                    with cmbagent_otel.redo(1, 1, "retry"):
                        raise RuntimeError("boom")
                except RuntimeError:
                    pass
        tracer = provider.get_tracer("other.scope", "9.9", schema_url="https://example/schema")
        root = exporter.get_finished_spans()[-1]
        links = [Link(root.context, {"why": "x"})]
        with tracer.start_as_current_span("linked", kind=SpanKind.CLIENT, links=links) as sp:
            sp.add_event("evt", {"n": 3, "vals": [1, 2]})
            sp.set_status(Status(StatusCode.OK))
    finally:
        routed.__exit__(None, None, None)
        provider.shutdown()
    return list(exporter.get_finished_spans())


def assert_same(decoded: list[ReadableSpan], original: list[ReadableSpan]) -> None:
    assert len(decoded) == len(original)
    by_id = {s.context.span_id: s for s in decoded}
    for orig in original:
        got = by_id[orig.context.span_id]
        assert got.name == orig.name
        assert got.context.trace_id == orig.context.trace_id
        assert (got.parent.span_id if got.parent else None) == (orig.parent.span_id if orig.parent else None)
        assert dict(got.attributes) == {k: tuple(v) if isinstance(v, list | tuple) else v
                                        for k, v in orig.attributes.items()}
        assert got.kind == orig.kind
        assert got.status.status_code == orig.status.status_code
        assert got.status.description == orig.status.description
        assert got.start_time == orig.start_time and got.end_time == orig.end_time
        assert dict(got.resource.attributes) == dict(orig.resource.attributes)
        assert got.instrumentation_scope.name == orig.instrumentation_scope.name
        assert got.instrumentation_scope.version == orig.instrumentation_scope.version
        assert [(e.name, dict(e.attributes), e.timestamp) for e in got.events] == [
            (e.name, {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in e.attributes.items()},
             e.timestamp) for e in orig.events
        ]
        assert [(ln.context.trace_id, ln.context.span_id, dict(ln.attributes)) for ln in got.links] == [
            (ln.context.trace_id, ln.context.span_id, dict(ln.attributes)) for ln in orig.links
        ]


def test_protobuf_round_trip(workflow_spans: list[ReadableSpan]) -> None:
    request = encode_spans(workflow_spans)
    body = request.SerializeToString()
    batch = decode_protobuf(body)
    assert batch.rejected == 0
    assert_same(batch.spans, workflow_spans)
    failed = next(s for s in batch.spans if s.name.startswith("redo"))
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes[semconv.ERROR_TYPE] == "RuntimeError"
    assert failed.events[0].name == "exception"
    linked = next(s for s in batch.spans if s.name == "linked")
    assert linked.kind is SpanKind.CLIENT
    # the scope's schema URL as the encoder sent it: opentelemetry-exporter-otlp-proto-common 1.27 (the
    # oldest pyproject allows) writes none, later ones write it
    sent = {scope.schema_url for resource in request.resource_spans for scope in resource.scope_spans
            if scope.scope.name == linked.instrumentation_scope.name}
    assert sent <= {"https://example/schema", ""}
    assert (linked.instrumentation_scope.schema_url or "") == sent.pop()


def test_json_round_trip(workflow_spans: list[ReadableSpan]) -> None:
    body = json.dumps(otlp_json(workflow_spans)).encode()
    batch = decode_json(body)
    assert batch.rejected == 0
    assert_same(batch.spans, workflow_spans)


def test_json_any_value_kinds_and_unknown_fields() -> None:
    doc = {
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "js"}}]},
            "futureField": {"ignored": True},
            "scopeSpans": [{
                "scope": {"name": "s", "version": "1", "attributes": [{"key": "a", "value": {"intValue": "1"}}]},
                "spans": [{
                    "traceId": "5b8efff798038103d269b633813fc60c",
                    "spanId": "eee19b7ec3c1b174",
                    "parentSpanId": "eee19b7ec3c1b173",
                    "name": "all kinds",
                    "kind": 3,
                    "startTimeUnixNano": "1544712660000000000",
                    "endTimeUnixNano": "1544712661000000000",
                    "attributes": [
                        {"key": "s", "value": {"stringValue": "x"}},
                        {"key": "i", "value": {"intValue": "9007199254740993"}},
                        {"key": "d", "value": {"doubleValue": 0.25}},
                        {"key": "b", "value": {"boolValue": False}},
                        {"key": "bytes", "value": {"bytesValue": base64.b64encode(b"\x00\x01").decode()}},
                        {"key": "arr", "value": {"arrayValue": {"values": [{"intValue": 1}, {"stringValue": "two"}]}}},
                        {"key": "kv",
                         "value": {"kvlistValue": {"values": [{"key": "k", "value": {"boolValue": True}}]}}},
                        {"key": "empty", "value": {}},
                    ],
                    "events": [{"timeUnixNano": "1544712660500000000", "name": "e",
                                "attributes": [{"key": "n", "value": {"intValue": 2}}]}],
                    "links": [{"traceId": "5b8efff798038103d269b633813fc60d", "spanId": "eee19b7ec3c1b175"}],
                    "status": {"code": 2, "message": "bad"},
                }],
            }],
        }],
    }
    batch = decode_json(json.dumps(doc).encode())
    assert batch.rejected == 0
    (span,) = batch.spans
    assert span.context.trace_id == 0x5B8EFFF798038103D269B633813FC60C
    assert span.parent is not None and span.parent.span_id == 0xEEE19B7EC3C1B173
    assert span.kind is SpanKind.CLIENT
    assert dict(span.attributes) == {
        "s": "x", "i": 9007199254740993, "d": 0.25, "b": False, "bytes": b"\x00\x01",
        "arr": (1, "two"), "kv": {"k": True},
    }
    assert span.events[0].timestamp == 1544712660500000000 and span.events[0].attributes == {"n": 2}
    assert span.links[0].context.span_id == 0xEEE19B7EC3C1B175
    assert span.status.status_code is StatusCode.ERROR and span.status.description == "bad"
    assert span.resource.attributes["service.name"] == "js"
    assert span.instrumentation_scope.attributes == {"a": 1}


def test_invalid_spans_are_rejected_not_fatal() -> None:
    good = {"traceId": "01" * 16, "spanId": "02" * 8, "name": "ok"}
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [
        good,
        {"traceId": "00" * 16, "spanId": "02" * 8, "name": "zero trace"},
        {"traceId": "01" * 15, "spanId": "02" * 8, "name": "short trace"},
        {"traceId": "01" * 16, "spanId": "03" * 8, "name": ""},
    ]}]}]}
    batch = decode_json(json.dumps(doc).encode())
    assert [s.name for s in batch.spans] == ["ok"]
    assert batch.rejected == 3
    response = ExportTraceServiceResponse()
    response.ParseFromString(encode_response("protobuf", batch.rejected, batch.error_message))
    assert response.partial_success.rejected_spans == 3
    assert "trace_id" in response.partial_success.error_message
    as_json = json.loads(encode_response("json", batch.rejected, batch.error_message))
    assert int(as_json["partialSuccess"]["rejectedSpans"]) == 3


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"resourceSpans": {}}',
    b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
    b"\xff\xfe",  # (a span json_format refuses, {"name": 5}, is rejected alone: test_json_poison_span.py)
])
def test_malformed_json(body: bytes) -> None:
    with pytest.raises(MalformedPayload):
        decode_json(body)


@pytest.mark.parametrize("body", [b"\x0a\xff\xff\xff\xff\x0f", b"\x0b", b"\x0a\x05abc"])
def test_malformed_protobuf(body: bytes) -> None:
    with pytest.raises(MalformedPayload):
        decode_protobuf(body)


def test_empty_bodies_are_empty_batches() -> None:
    assert decode_protobuf(b"").spans == []
    assert decode_json(b"{}").spans == []
    assert encode_response("protobuf") == b""


@pytest.mark.parametrize("limits", [None, "default", "tiny"])
def test_attributes_decode_each_value_as_any_value_does(limits: str | None) -> None:
    """The scalar shortcut of attribute decoding gives what ``any_value`` gives for every kind."""
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

    from cmbagent_otel.otlp_decode import Limits, _attributes, _cut, any_value

    chosen = {None: None, "default": Limits.default(),
              "tiny": Limits(**{**Limits.default().__dict__, "max_value_length": 20})}[limits]
    values = [AnyValue(string_value="short"), AnyValue(string_value="x" * 5000), AnyValue(string_value=""),
              AnyValue(int_value=-(2**63)), AnyValue(bool_value=False), AnyValue(double_value=float("inf")),
              AnyValue(bytes_value=b"\x00\xff"), AnyValue(),
              AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a" * 40), AnyValue(int_value=3)])),
              AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="k", value=AnyValue(double_value=1.5))]))]
    items = [KeyValue(key=f"key.{i}" + "y" * (30 * (i % 2)), value=v) for i, v in enumerate(values)]
    expected = {}
    for kv in items:
        decoded = any_value(kv.value, json_safe=True, limits=chosen)
        if decoded is not None:
            expected[_cut(kv.key, chosen.max_value_length) if chosen is not None else kv.key] = decoded
    assert _attributes(items, True, chosen) == expected


def _wire_test_request() -> bytes:
    """A request whose spans carry every AnyValue kind, repeated attributes, events and links."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

    values = [AnyValue(string_value="short"), AnyValue(string_value="x" * 5000), AnyValue(string_value=""),
              AnyValue(int_value=-(2**63)), AnyValue(bool_value=False), AnyValue(double_value=float("inf")),
              AnyValue(bytes_value=b"\x00\xff"), AnyValue(),
              AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a" * 40), AnyValue(int_value=3)])),
              AnyValue(array_value=ArrayValue(values=[AnyValue(array_value=ArrayValue(
                  values=[AnyValue(bool_value=True)]))])),
              AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="k", value=AnyValue(double_value=1.5))]))]
    attributes = [KeyValue(key=f"key.{i}" + "y" * (30 * (i % 2)), value=v) for i, v in enumerate(values)]
    attributes += [KeyValue(key="key.0", value=AnyValue(string_value="again")), KeyValue(key="", value=values[0]),
                   KeyValue(key="empty", value=AnyValue())]
    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    # the same attributes in every span (the later ones decode from the memo), and each span field
    # the common case leaves at its default set in one span
    variants = [{}, {"parent_span_id": bytes(7) + b"\x07"}, {"flags": 0x301, "parent_span_id": b"\x01" * 8},
                {"flags": 0x100}, {"trace_state": "k=v"}, {"status": {"code": 1, "message": "ok"}},
                {"status": {"code": 2, "message": "boom"}},
                {"status": {"code": 2, "message": "m" * 5000}}, {"status": {"code": 2}}, {"status": {"code": -1}},
                {"status": {"code": 7}},
                {"kind": 3}, {"kind": 9}, {"name": "n" * 5000}, {"end_time_unix_nano": 0},
                {"start_time_unix_nano": 5}, {"parent_span_id": bytes(8)}, {"parent_span_id": b"\x01" * 5},
                {"span_id": bytes(8)}, {"trace_id": b"\x01" * 15}, {"links": True}, {"events": ["e" * 5000, ""]},
                {"name": ""}]
    for n, variant in enumerate(variants):
        fields = {"trace_id": bytes(15) + b"\x01", "span_id": bytes(7) + bytes([n + 1]), "name": f"s{n}",
                  "start_time_unix_nano": 1, "end_time_unix_nano": 2,
                  **{k: v for k, v in variant.items() if k not in ("links", "events")}}
        span = scope_spans.spans.add(**fields)
        span.attributes.extend(attributes)
        for event_name in variant.get("events", ["e"]):
            span.events.add(name=event_name, time_unix_nano=1).attributes.extend(attributes[::-1])
        if variant.get("links"):
            span.links.add(trace_id=bytes(15) + b"\x02", span_id=bytes(7) + b"\x09").attributes.extend(attributes[:4])
    return request.SerializeToString()


def _described(spans: list[ReadableSpan]) -> list[object]:
    def context(ctx: object) -> object:
        return None if ctx is None else (*ctx, type(ctx.trace_flags), dict(ctx.trace_state))  # type: ignore[attr-defined]

    return [(s.name, context(s.context), context(s.parent), dict(s.attributes), s.kind, s.status.status_code,
             s.status.description, s.start_time, s.end_time, s.resource, s.instrumentation_scope,
             [(e.name, dict(e.attributes), e.timestamp) for e in s.events],
             [(context(ln.context), dict(ln.attributes)) for ln in s.links]) for s in spans]


@pytest.mark.parametrize("limits", [None, "default", "tiny"])
@pytest.mark.parametrize("json_safe", [False, True])
def test_attributes_from_wire_bytes_decode_as_parsed_ones(limits: str | None, json_safe: bool) -> None:
    """The protobuf path reads spans with their attributes as encodings (memoised); what it gives,
    spans and rejections, is what the parsed ``Span`` gives, the first time and from the memo."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from cmbagent_otel.otlp_decode import Limits, spans_from_request

    chosen = {None: None, "default": Limits.default(),
              "tiny": Limits(**{**Limits.default().__dict__, "max_value_length": 20})}[limits]
    body = _wire_test_request()
    general = spans_from_request(ExportTraceServiceRequest.FromString(body), json_safe=json_safe, limits=chosen)
    assert general.rejected == 7  # the empty name, zero ids, short ids, unknown kind, end before start
    for _ in range(2):
        batch = decode_protobuf(body, json_safe=json_safe, limits=chosen)
        assert (batch.rejected, batch.errors) == (general.rejected, general.errors)
        assert _described(batch.spans) == _described(general.spans)


@pytest.mark.parametrize("limits", [None, "default"])
def test_attributes_all_from_the_memo_decode_as_parsed_ones(limits: str | None) -> None:
    """A span whose attributes are all memoised takes them in one step: the same keys in the same
    order, a repeated key's last value in its first place, an empty value left out (never kept in
    the memo), as the parsed ``Span`` gives them."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue

    from cmbagent_otel.otlp_decode import Limits, spans_from_request

    chosen = Limits.default() if limits else None
    small = [KeyValue(key="a", value=AnyValue(string_value="one")), KeyValue(key="", value=AnyValue(int_value=7)),
             KeyValue(key="b", value=AnyValue(array_value=ArrayValue(values=[AnyValue(bool_value=True)]))),
             KeyValue(key="a", value=AnyValue(string_value="again")),
             KeyValue(key="c", value=AnyValue(double_value=0.5))]
    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    for n, attributes in enumerate([small, small, [*small, KeyValue(key="empty", value=AnyValue())], small[::-1],
                                    [small[3], small[0]], []]):
        span = scope_spans.spans.add(trace_id=bytes(15) + b"\x01", span_id=bytes(7) + bytes([n + 1]), name=f"s{n}",
                                     start_time_unix_nano=1, end_time_unix_nano=2)
        span.attributes.extend(attributes)
        span.events.add(name="e", time_unix_nano=1).attributes.extend(attributes[::-1])
    body = request.SerializeToString()
    general = spans_from_request(ExportTraceServiceRequest.FromString(body), json_safe=True, limits=chosen)
    for _ in range(2):
        spans = decode_protobuf(body, json_safe=True, limits=chosen).spans
        assert _described(spans) == _described(general.spans)
        assert [list(s.attributes) for s in spans] == [list(s.attributes) for s in general.spans]
    assert list(spans[0].attributes.items()) == [("a", "again"), ("", 7), ("b", (True,)), ("c", 0.5)]


def _scope_spans_variants() -> list[bytes]:
    """``ScopeSpans`` encodings: as exporters write them, reordered, repeated, with lengths of one to
    three bytes (a span under 2 MiB), with unknown fields, and cut or damaged anywhere."""
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    from cmbagent_otel.otlp_decode import _encode_varint

    def field(number: int, value: bytes) -> bytes:
        return _encode_varint(number << 3 | 2) + _encode_varint(len(value)) + value

    scope = InstrumentationScope(name="lib", version="1.0").SerializeToString()
    spans = [Span(trace_id=b"\x01" * 16, span_id=bytes([n + 1]) * 8, name="s" * size).SerializeToString()
             for n, size in enumerate([1, 200, 20_000, 300_000])]
    span_fields = b"".join(field(2, span) for span in spans)
    plain = [field(1, scope) + span_fields + field(3, b"https://schema/1"),
             span_fields, field(1, scope), field(3, b"") + field(1, b""),
             span_fields + field(1, scope) + field(3, b"s1") + field(2, spans[0]) + field(1, b"") + field(3, b"s2")]
    odd = [field(1, scope) + b"\x20\x05" + span_fields,  # an unknown varint field
           field(1, scope) + b"\x92\x00\x00",  # a span field with a two-byte key
           field(1, scope) + b"\x12\x80\x80\x80\x80\x00",  # a five-byte length
           field(1, scope) + field(2, b"s" * 3_000_000),  # a four-byte length (declined)
           b"\x02\x00"]  # field number 0
    cut = [variant[:size] for variant in plain[:1] for size in (1, 2, 3, 40, len(variant) - 1)]
    damaged = [plain[0][:30] + b"\xff" + plain[0][31:], field(1, scope)[:-1] + b"\x12\xff\xff\xff"]
    return plain + odd + cut + damaged


@pytest.mark.parametrize("variant", range(len(_scope_spans_variants())))
def test_skimmed_scope_spans_agree_with_the_field_walk(variant: int) -> None:
    """The skim of a ``ScopeSpans`` finds the scope and schema URL the field walk finds (the scope, the
    last schema URL), or declines (None) and leaves the walk to read it, merge a repeated scope or word
    what is wrong; where it accepts, the spans' places it lists and the ones ``_skimmed_spans`` finds
    are the walk's, in its order."""
    from cmbagent_otel.otlp_decode import _fields, _skim_scope_spans, _skimmed_spans

    body = b"\x00" + _scope_spans_variants()[variant] + b"\x00"  # not at the start of the buffer
    start, end = 1, len(body) - 1
    spans: list[tuple[int, int]] = []
    try:
        walked: tuple[int, int, int, int] | None = (0, 0, 0, 0)
        for number, wire, value_start, value_end, _ in _fields(body, start, end):
            if wire == 2 and number == 2:
                spans.append((value_start, value_end))
            if wire == 2 and number == 1:
                if walked[1]:  # type: ignore[index]
                    walked = None  # a repeated scope: merged by the walk alone
                    break
                walked = (value_start, value_end, *walked[2:])  # type: ignore[index]
            elif wire == 2 and number == 3:
                walked = (*walked[:2], value_start, value_end)  # type: ignore[index]
            elif wire != 2 or number != 2:
                walked = None  # read by the walk alone
                break
    except MalformedPayload:
        walked = None
    places: list[tuple[int, int]] = []
    skimmed = _skim_scope_spans(body, start, end, places)
    assert skimmed == _skim_scope_spans(body, start, end)
    assert skimmed is None or skimmed == walked
    if variant < 4:  # as exporters write them: skimmed
        assert skimmed == walked is not None
    if skimmed is not None:
        assert places == spans == list(_skimmed_spans(body, start, end))


@pytest.mark.parametrize("extra", [-1, 0, 1, 600])
def test_spans_past_the_skims_list_decode_as_parsed_ones(extra: int) -> None:
    """A ``ScopeSpans`` with more spans than one skim lists (``_MOST_PLACES``) has the rest found by
    ``_skimmed_spans``: every span decoded, in order, as the parsed request gives them, one of them
    rejected where it stands."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from cmbagent_otel.otlp_decode import _MOST_PLACES, Limits, iter_protobuf, spans_from_request

    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    scope_spans.scope.name = "lib"
    count = _MOST_PLACES + extra
    for n in range(count):
        scope_spans.spans.add(trace_id=bytes(15) + b"\x01", span_id=(n + 1).to_bytes(8, "big"),
                              name="" if n == count - 2 else f"s{n}", start_time_unix_nano=1, end_time_unix_nano=2)
    body = request.SerializeToString()
    general = spans_from_request(ExportTraceServiceRequest.FromString(body), json_safe=True, limits=Limits.default())
    batches = list(iter_protobuf(body, json_safe=True, limits=Limits.default(), chunk=1000))
    assert [len(b.spans) for b in batches] == [1000, count - 1001]  # chunks of 1000, one span rejected
    assert sum(b.rejected for b in batches) == general.rejected == 1
    assert _described([s for b in batches for s in b.spans]) == _described(general.spans)


@pytest.mark.parametrize("limits", [None, "default"])
def test_repeated_scope_and_resource_merge_as_protobuf_parses_them(limits: str | None) -> None:
    """A scope or resource given twice in its ``ScopeSpans`` / ``ResourceSpans`` (after the spans,
    empty, with other attributes) is merged, as protobuf's own parse of the request reads it: the lazy
    decoder took the last occurrence, so a trailing empty scope stored the spans without their
    scope's name, version and attributes (fails on e66d960: scope name '' instead of 'lib')."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    from cmbagent_otel.otlp_decode import Limits, _encode_varint, spans_from_request

    def field(number: int, value: bytes) -> bytes:
        return _encode_varint(number << 3 | 2) + _encode_varint(len(value)) + value

    def attribute(key: str, value: str) -> KeyValue:
        return KeyValue(key=key, value=AnyValue(string_value=value))

    scope = InstrumentationScope(name="lib", version="1.0", attributes=[attribute("a", "1")]).SerializeToString()
    more = InstrumentationScope(attributes=[attribute("b", "2")]).SerializeToString()
    resource = PbResource(attributes=[attribute("service.name", "svc")]).SerializeToString()
    span = field(2, Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="s", start_time_unix_nano=1,
                         end_time_unix_nano=2).SerializeToString())
    version = InstrumentationScope(version="2").SerializeToString()
    scope_spans = [field(1, scope) + span + field(1, b""), field(1, scope) + field(1, more) + span,
                   span + field(1, scope) + field(3, b"s1") + field(1, version)]
    body = field(1, field(1, resource) + b"".join(field(2, ss) for ss in scope_spans)
                 + field(1, PbResource(attributes=[attribute("host", "h")]).SerializeToString()))
    bound = Limits.default() if limits else None

    def seen(spans: list[ReadableSpan]) -> list[tuple[object, ...]]:
        return [(s.instrumentation_scope.name, s.instrumentation_scope.version, s.instrumentation_scope.schema_url,
                 dict(s.instrumentation_scope.attributes or {}), dict(s.resource.attributes)) for s in spans]

    decoded = seen(decode_protobuf(body, limits=bound).spans)
    assert decoded == seen(spans_from_request(ExportTraceServiceRequest.FromString(body), limits=bound).spans)
    assert decoded[0] == ("lib", "1.0", "", {"a": "1"}, {"service.name": "svc", "host": "h"})
    assert decoded[1][3] == {"a": "1", "b": "2"}
    assert decoded[2][:3] == ("lib", "2", "s1")


def test_memoised_map_values_are_not_shared() -> None:
    """A map value is a ``dict``: each span gets its own, never one shared through the memo."""
    from cmbagent_otel.otlp_decode import Limits

    body = _wire_test_request()
    first = decode_protobuf(body, limits=Limits.default()).spans
    mapped = first[0].attributes["key.10"]
    assert mapped is not first[1].attributes["key.10"]
    mapped["k"] = "changed"
    assert decode_protobuf(body, limits=Limits.default()).spans[0].attributes["key.10"] == {"k": 1.5}


def _with_bad_attribute(where: str) -> bytes:
    """A span with one attribute more than the default limit allows (or one event more), whose
    last attribute's string is not UTF-8: parsed whole, the span is unreadable."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    from cmbagent_otel.otlp_decode import Limits

    limits = Limits.default()
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add(
        trace_id=bytes(15) + b"\x01", span_id=bytes(7) + b"\x01", name="bad", start_time_unix_nano=1)
    bad = KeyValue(key="k", value=AnyValue(string_value="Z")).SerializeToString().replace(b"Z", b"\xff")
    count = {"within": 1, "past attributes": limits.max_attributes + 1, "past events": 1}[where]
    span.attributes.extend(KeyValue(key=f"a{i}", value=AnyValue(int_value=i)) for i in range(count - 1))
    if where == "past events":
        for _ in range(limits.max_events):
            span.events.add(name="e")
        event = span.events.add(name="last")
        wire = span.SerializeToString()
        # the last event's last attribute (field 3 of Event) is the bad one
        encoded_event = event.SerializeToString()
        event_with_bad = encoded_event + b"\x1a" + bytes([len(bad)]) + bad
        span.ParseFromString(wire.replace(b"\x5a" + bytes([len(encoded_event)]) + encoded_event, b""))
        return _request_with_span(span.SerializeToString() + b"\x5a" + bytes([len(event_with_bad)]) + event_with_bad)
    return _request_with_span(span.SerializeToString() + b"\x4a" + bytes([len(bad)]) + bad)


def _request_with_span(span: bytes) -> bytes:
    def field(number: int, payload: bytes) -> bytes:
        size, out = len(payload), bytearray()
        while size >= 0x80:
            out.append(size & 0x7F | 0x80)
            size >>= 7
        out.append(size)
        return bytes([number << 3 | 2]) + bytes(out) + payload

    return field(1, field(2, field(2, span)))


@pytest.mark.parametrize("where", ["within", "past attributes", "past events"])
def test_attribute_bytes_are_checked_as_a_whole_parse_checks_them(where: str) -> None:
    """An attribute that is not valid protobuf (a string that is not UTF-8) makes its span unreadable,
    with the message parsing the span whole gives, even past the limits (where it is not kept)."""
    from cmbagent_otel.otlp_decode import Limits

    batch = decode_protobuf(_with_bad_attribute(where), limits=Limits.default())
    assert (batch.spans, batch.rejected) == ([], 1)
    assert batch.errors == [f"unreadable span: {_span_parse_error()}"]


def _span_parse_error() -> str:
    """What protobuf says parsing a Span whose attribute string is not UTF-8 (its wording varies with
    the protobuf release: 4.25, which opentelemetry-proto 1.27 takes, says less than 5.x and 6.x)."""
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    bad = KeyValue(key="k", value=AnyValue(string_value="Z")).SerializeToString().replace(b"Z", b"\xff")
    try:
        Span.FromString(bytes([9 << 3 | 2, len(bad)]) + bad)  # field 9: Span.attributes
    except DecodeError as exc:
        return str(exc)
    raise AssertionError("protobuf parsed a string that is not UTF-8")
