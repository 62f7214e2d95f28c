"""Decode OTLP trace export requests (protobuf or OTLP/JSON) into SDK ``ReadableSpan`` objects.

The ingest server feeds the result to the same DAG writer the in-process exporter uses, so
a span that travelled over OTLP is stored exactly like one exported locally.

OTLP/JSON differs from the canonical proto3 JSON mapping in one way that matters here:
``traceId``, ``spanId`` and ``parentSpanId`` are hex strings, not base64. They are
converted before handing the document to ``json_format``, which already accepts
lowerCamelCase names, integer enums and 64-bit integers written as strings. Unknown
fields are ignored, as the OTLP specification requires of receivers.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope as SdkScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

__all__ = [
    "DecodedBatch",
    "MalformedPayload",
    "any_value",
    "decode_json",
    "decode_protobuf",
    "decode_request",
    "encode_response",
]

# Span.flags bits (opentelemetry/proto/trace/v1/trace.proto, SpanFlags)
_FLAGS_TRACE_FLAGS_MASK = 0xFF
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200

# proto Span.SpanKind -> SDK SpanKind (proto 0 = unspecified is read as internal)
_KINDS = {
    0: SpanKind.INTERNAL,
    1: SpanKind.INTERNAL,
    2: SpanKind.SERVER,
    3: SpanKind.CLIENT,
    4: SpanKind.PRODUCER,
    5: SpanKind.CONSUMER,
}
_STATUS = {0: StatusCode.UNSET, 1: StatusCode.OK, 2: StatusCode.ERROR}

_MAX_JSON_DEPTH = 64


class MalformedPayload(ValueError):
    """The request body is not a valid OTLP ``ExportTraceServiceRequest``."""


@dataclass
class DecodedBatch:
    """Spans decoded from one request, plus the spans that had to be rejected."""

    spans: list[ReadableSpan] = field(default_factory=list)
    rejected: int = 0
    errors: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        if len(self.errors) < 5 and reason not in self.errors:
            self.errors.append(reason)

    @property
    def error_message(self) -> str:
        return "; ".join(self.errors)


def any_value(value: AnyValue, *, json_safe: bool = False, _depth: int = 0) -> Any:
    """The Python value of an OTLP ``AnyValue``.

    Scalars map to ``str``/``bool``/``int``/``float``, ``bytes_value`` to ``bytes`` (a
    base64 ``str`` with ``json_safe``, so the value can be stored in a JSON column),
    ``array_value`` to a ``tuple`` and ``kvlist_value`` to a ``dict``; an empty value is
    ``None``.
    """
    if _depth > _MAX_JSON_DEPTH:
        raise MalformedPayload("AnyValue nested too deeply")
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return tuple(any_value(item, json_safe=json_safe, _depth=_depth + 1) for item in value.array_value.values)
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value, json_safe=json_safe, _depth=_depth + 1)
                for kv in value.kvlist_value.values}
    if which == "bytes_value" and json_safe:
        return base64.b64encode(value.bytes_value).decode("ascii")
    return getattr(value, which)


def _attributes(items: Iterable[KeyValue], safe: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in items:
        decoded = any_value(kv.value, json_safe=safe)
        if decoded is not None:
            out[kv.key] = decoded
    return out


def _id(raw: bytes, size: int, what: str) -> int:
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(raw)}")
    value = int.from_bytes(raw, "big")
    if value == 0:
        raise ValueError(f"{what} is all zeros")
    return value


def _trace_state(header: str) -> TraceState:
    if not header:
        return TraceState()
    return TraceState.from_header([header])


def _trace_flags(flags: int) -> TraceFlags:
    # Most SDKs leave the low byte unset; a span that was exported was sampled.
    low = flags & _FLAGS_TRACE_FLAGS_MASK
    return TraceFlags(low if low else TraceFlags.SAMPLED)


def _is_remote(flags: int) -> bool:
    return bool(flags & _FLAGS_HAS_IS_REMOTE and flags & _FLAGS_IS_REMOTE)


def _scope(scope: InstrumentationScope, schema_url: str, safe: bool) -> SdkScope:
    return SdkScope(
        scope.name,
        scope.version or None,
        schema_url or None,
        _attributes(scope.attributes, safe) or None,
    )


def _span(pb: PbSpan, resource: Resource, scope: SdkScope, safe: bool) -> ReadableSpan:
    trace_id = _id(pb.trace_id, 16, "trace_id")
    span_id = _id(pb.span_id, 8, "span_id")
    flags = _trace_flags(pb.flags)
    context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags,
                          trace_state=_trace_state(pb.trace_state))
    parent = None
    if pb.parent_span_id:
        parent = SpanContext(trace_id, _id(pb.parent_span_id, 8, "parent_span_id"),
                             is_remote=_is_remote(pb.flags), trace_flags=flags)
    events = [Event(ev.name, _attributes(ev.attributes, safe), ev.time_unix_nano or None) for ev in pb.events]
    links = []
    for ln in pb.links:
        link_ctx = SpanContext(
            _id(ln.trace_id, 16, "link trace_id"), _id(ln.span_id, 8, "link span_id"),
            is_remote=_is_remote(ln.flags), trace_flags=_trace_flags(ln.flags),
            trace_state=_trace_state(ln.trace_state),
        )
        links.append(Link(link_ctx, _attributes(ln.attributes, safe)))
    code = _STATUS.get(pb.status.code, StatusCode.UNSET)
    # The SDK refuses a description on non-error statuses; keep it only where it is allowed.
    status = Status(code, pb.status.message or None) if code is StatusCode.ERROR else Status(code)
    kind = _KINDS.get(pb.kind)
    if kind is None:
        raise ValueError(f"unknown span kind {pb.kind}")
    if not pb.name:
        raise ValueError("span name is empty")
    if pb.end_time_unix_nano and pb.end_time_unix_nano < pb.start_time_unix_nano:
        raise ValueError("span ends before it starts")
    return ReadableSpan(
        name=pb.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=_attributes(pb.attributes, safe),
        events=events,
        links=links,
        kind=kind,
        status=status,
        start_time=pb.start_time_unix_nano or None,
        end_time=pb.end_time_unix_nano or None,
        instrumentation_scope=scope,
    )


def spans_from_request(request: ExportTraceServiceRequest, *, json_safe: bool = False) -> DecodedBatch:
    """Convert a parsed request into ``ReadableSpan`` objects; invalid spans are rejected, not fatal.

    ``json_safe`` turns ``bytes`` attribute values into base64 strings (see :func:`any_value`).
    """
    batch = DecodedBatch()
    for resource_spans in request.resource_spans:
        resource = Resource(_attributes(resource_spans.resource.attributes, json_safe),
                            resource_spans.schema_url or None)
        for scope_spans in resource_spans.scope_spans:
            scope = _scope(scope_spans.scope, scope_spans.schema_url, json_safe)
            for pb in scope_spans.spans:
                try:
                    batch.spans.append(_span(pb, resource, scope, json_safe))
                except (ValueError, TypeError) as exc:
                    batch.reject(f"span {pb.name!r}: {exc}")
    return batch


def decode_protobuf(body: bytes, *, json_safe: bool = False) -> DecodedBatch:
    """Decode an ``application/x-protobuf`` request body."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise MalformedPayload(f"invalid protobuf ExportTraceServiceRequest: {exc}") from None
    return spans_from_request(request, json_safe=json_safe)


def _hex_to_b64(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        raise MalformedPayload(f"{where} must be a hex string")
    if value == "":
        return value
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise MalformedPayload(f"{where} is not valid hex: {value[:40]!r}") from None
    return base64.b64encode(raw).decode("ascii")


_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _fix_ids(obj: dict[str, Any], where: str) -> None:
    for key in _ID_KEYS:
        if key in obj:
            obj[key] = _hex_to_b64(obj[key], f"{where}.{key}")


def _items(obj: dict[str, Any], camel: str, snake: str, where: str) -> list[Any]:
    value = obj.get(camel, obj.get(snake, []))
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedPayload(f"{where}.{camel} must be an array")
    return value


def _require_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedPayload(f"{where} must be an object")
    return value


def decode_json(body: bytes, *, json_safe: bool = False) -> DecodedBatch:
    """Decode an ``application/json`` (OTLP/JSON encoding) request body."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedPayload(f"invalid JSON: {exc}") from None
    doc = _require_object(doc, "request")
    for i, rs in enumerate(_items(doc, "resourceSpans", "resource_spans", "request")):
        rs = _require_object(rs, f"resourceSpans[{i}]")
        for j, ss in enumerate(_items(rs, "scopeSpans", "scope_spans", f"resourceSpans[{i}]")):
            ss = _require_object(ss, f"resourceSpans[{i}].scopeSpans[{j}]")
            for k, span in enumerate(_items(ss, "spans", "spans", f"resourceSpans[{i}].scopeSpans[{j}]")):
                where = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                span = _require_object(span, where)
                _fix_ids(span, where)
                for n, link in enumerate(_items(span, "links", "links", where)):
                    _fix_ids(_require_object(link, f"{where}.links[{n}]"), f"{where}.links[{n}]")
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, request, ignore_unknown_fields=True, max_recursion_depth=_MAX_JSON_DEPTH)
    except (json_format.ParseError, ValueError, TypeError, binascii.Error, RecursionError) as exc:
        raise MalformedPayload(f"invalid OTLP/JSON ExportTraceServiceRequest: {exc}") from None
    return spans_from_request(request, json_safe=json_safe)


def decode_request(body: bytes, content_type: str, *, json_safe: bool = False) -> DecodedBatch:
    """Decode ``body`` according to ``content_type`` (``protobuf`` or ``json``)."""
    if content_type == "protobuf":
        return decode_protobuf(body, json_safe=json_safe)
    if content_type == "json":
        return decode_json(body, json_safe=json_safe)
    raise ValueError(f"unknown content type {content_type!r}")


def encode_response(content_type: str, rejected: int = 0, error_message: str = "") -> bytes:
    """An ``ExportTraceServiceResponse`` body; ``partial_success`` is set when spans were rejected."""
    response = ExportTraceServiceResponse()
    if rejected or error_message:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = error_message
    if content_type == "json":
        return json.dumps(json_format.MessageToDict(response)).encode()
    return response.SerializeToString()
