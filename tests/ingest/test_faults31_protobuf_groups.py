"""Groups (protobuf wire types 3 and 4) in an OTLP/protobuf request, against protobuf's own parse.

OTLP never writes a group, but a request holding one is a valid protobuf message: protobuf skips
a group it does not know as any unknown field, so the request's spans are read. The lazy decoder's
field walk refused the whole request instead (``invalid protobuf: wire type 3``, an error its
client sees, its spans dropped). The class: an unknown field of any wire type is skipped as
protobuf skips it, and what protobuf refuses (an unterminated group, a mismatched end, groups
nested past its limit) is refused with a clear reason.
"""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import ReadableSpan

from cmbagent_otel.otlp_decode import Limits, MalformedPayload, _encode_varint, decode_protobuf, spans_from_request


def _tag(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _field(number: int, value: bytes) -> bytes:
    return _tag(number, 2) + _encode_varint(len(value)) + value


def _group(number: int, *inner: bytes) -> bytes:
    return _tag(number, 3) + b"".join(inner) + _tag(number, 4)


# a group holding one field of every wire type (numbered 0 too, which protobuf skips in a group)
# and a group nested in a group
_GROUP = _group(9, _tag(1, 0) + _encode_varint(300), b"\x00\x00", b"\x03\x04", _tag(2, 1) + bytes(8),
                _field(3, b"text"), _tag(4, 5) + bytes(4), _group(5, _tag(1, 0) + b"\x01"), _group(9))


def _attribute(key: str, value: str) -> bytes:
    return KeyValue(key=key, value=AnyValue(string_value=value)).SerializeToString()


def _body(group: bytes) -> bytes:
    """A request with ``group`` as an unknown field of every message on the way to a span's
    attribute, before and after the known fields (the span large enough to be trimmed)."""
    scope = InstrumentationScope(name="lib", version="1").SerializeToString() + group
    resource = _field(1, _attribute("service.name", "svc")) + group
    attributes = b"".join(_field(9, _attribute(f"k{i}", "v" * 1200)) for i in range(60))
    span = group + Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="s", start_time_unix_nano=1,
                        end_time_unix_nano=2).SerializeToString() + attributes + group
    bad_attribute = _field(9, _attribute("g", "x") + group)  # a group in a KeyValue too
    scope_spans = group + _field(1, scope) + _field(2, span + bad_attribute) + group + _field(2, span)
    resource_spans = _field(1, resource) + group + _field(2, scope_spans) + group
    return group + _field(1, resource_spans) + group


def _seen(spans: list[ReadableSpan]) -> list[tuple[object, ...]]:
    return [(s.name, s.context.span_id, s.instrumentation_scope.name, s.instrumentation_scope.version,
             dict(s.resource.attributes), dict(s.attributes or {})) for s in spans]


@pytest.mark.parametrize("limits", [None, "default", "few"])
@pytest.mark.parametrize("group", [_GROUP, _group(1), _group(2, _field(2, b"\x0a\x00"))],
                         ids=["every-wire-type", "empty-on-field-1", "on-field-2-holding-a-span-like-field"])
def test_unknown_groups_are_skipped_as_protobuf_skips_them(limits: str | None, group: bytes) -> None:
    """A group anywhere in the request (top level, ``ResourceSpans``, ``ScopeSpans``, resource,
    scope, span, attribute) is skipped: the spans are those protobuf's own parse of the same bytes
    gives (a field numbered 0 inside a group too: protobuf's parser skips it there).
    Fails on 5bc025a with ``MalformedPayload: invalid protobuf: wire type 3``."""
    chosen = {None: None, "default": Limits.default(),
              "few": Limits(**{**Limits.default().__dict__, "max_attributes": 10})}[limits]
    body = _body(group)
    expected = spans_from_request(ExportTraceServiceRequest.FromString(body), limits=chosen)
    batch = decode_protobuf(body, limits=chosen)
    assert _seen(batch.spans) == _seen(expected.spans)
    assert (batch.rejected, batch.errors) == (expected.rejected, expected.errors)
    assert len(batch.spans) == 2
    assert batch.spans[0].resource.attributes["service.name"] == "svc"
    assert batch.spans[0].instrumentation_scope.name == "lib"


def _nested(depth: int) -> bytes:
    return _tag(9, 3) * depth + _tag(9, 4) * depth


_MALFORMED = {
    "unterminated": _tag(9, 3) + _tag(1, 0) + b"\x05",
    "ended-by-another-field": _tag(9, 3) + _tag(8, 4),
    "end-without-start": _tag(9, 4),
    "nested-end-mismatch": _tag(9, 3) + _tag(2, 3) + _tag(9, 4) + _tag(2, 4),
    "length-past-the-end-inside": _tag(9, 3) + _tag(3, 2) + b"\x7f",
    "truncated-fixed-inside": _tag(9, 3) + _tag(2, 1) + bytes(3),
    "wire-type-6-inside": _tag(9, 3) + _tag(2, 6) + _tag(9, 4),
    "wire-type-7": _tag(9, 7),
}


@pytest.mark.parametrize("where", ["top", "resource_spans", "scope_spans"])
@pytest.mark.parametrize("name", sorted(_MALFORMED))
def test_malformed_groups_are_refused_as_protobuf_refuses_them(where: str, name: str) -> None:
    """What protobuf refuses in a group is refused, with a reason naming what is wrong."""
    bad = _MALFORMED[name]
    span = _field(2, Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="s", start_time_unix_nano=1,
                          end_time_unix_nano=2).SerializeToString())
    body = {"top": _field(1, _field(2, span)) + bad, "resource_spans": _field(1, _field(2, span) + bad),
            "scope_spans": _field(1, _field(2, span + bad))}[where]
    with pytest.raises(Exception, match="Error parsing message"):
        ExportTraceServiceRequest.FromString(body)
    with pytest.raises(MalformedPayload, match=r"^invalid protobuf: (group|end of group|length|"
                                               r"truncated|wire type)"):
        decode_protobuf(body)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_groups_nest_as_deep_as_protobuf_allows(level: int) -> None:
    """Groups nested to protobuf's recursion limit (counted from the request, so less deep inside
    a ``ScopeSpans``) are skipped; one level more is refused, by protobuf and by the decoder."""
    span = _field(2, Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="s", start_time_unix_nano=1,
                          end_time_unix_nano=2).SerializeToString())

    def body(depth: int) -> bytes:
        groups = _nested(depth)
        return {0: groups + _field(1, _field(2, span)), 1: _field(1, groups + _field(2, span)),
                2: _field(1, _field(2, groups + span))}[level]

    deepest = 100 - level
    assert len(ExportTraceServiceRequest.FromString(body(deepest)).resource_spans) == 1
    assert len(decode_protobuf(body(deepest)).spans) == 1
    with pytest.raises(Exception, match="Error parsing message"):
        ExportTraceServiceRequest.FromString(body(deepest + 1))
    with pytest.raises(MalformedPayload, match="groups nested more than"):
        decode_protobuf(body(deepest + 1))
