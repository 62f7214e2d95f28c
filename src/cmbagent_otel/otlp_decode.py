"""Decode OTLP trace export requests (protobuf or OTLP/JSON) into SDK ``ReadableSpan`` objects.

The ingest server feeds the result to the same DAG writer the in-process exporter uses, so
a span that travelled over OTLP is stored exactly like one exported locally.

OTLP/JSON differs from the canonical proto3 JSON mapping in one way that matters here:
``traceId``, ``spanId`` and ``parentSpanId`` are hex strings, not base64. They are
converted before handing the document to ``json_format``, which already accepts
lowerCamelCase names, integer enums and 64-bit integers written as strings. Unknown
fields are ignored, as the OTLP specification requires of receivers.

Memory stays bounded by the body, whatever the body holds. Protobuf's parser has no lazy
or bounded mode, and an OTLP message costs up to ~100 times its wire size once parsed (an
empty ``Span`` is 2 bytes on the wire and ~200 in memory: 10 MiB of them take 950 MiB).
So the three outer levels (request, resource spans, scope spans) are walked here on the
wire format, without parsing, and each span is parsed on its own; a span larger than
64 KiB is first trimmed on the wire to the :class:`Limits` (attribute, event, link and
array counts, AnyValue depth), so its parsed form is bounded too. A span's attributes are
read from their own encodings, memoised (see ``_raw_attributes``). OTLP/JSON cannot be
parsed piecewise by the standard library: :func:`json_cost` estimates the memory
``json.loads`` would take from the body's structural characters, and the ingest server
admits a JSON body only within its memory budget.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope as SdkScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from . import redaction

__all__ = [
    "DecodedBatch",
    "Limits",
    "MalformedPayload",
    "any_value",
    "decode_json",
    "decode_protobuf",
    "decode_request",
    "encode_response",
    "iter_json",
    "iter_protobuf",
    "json_cost",
    "spans_from_request",
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

MAX_ANY_VALUE_DEPTH = 32  # AnyValue nesting (arrays and maps inside arrays and maps)
# json_format counts message levels: three per AnyValue level (AnyValue > KeyValueList >
# KeyValue), plus request > resource spans > scope spans > span > event > key value.
_JSON_FORMAT_DEPTH = 3 * MAX_ANY_VALUE_DEPTH + 16
_SMALL_SPAN = 64 * 1024  # parsed as is: at most ~100x its size in memory
_MIN_SPAN = 28  # a trace id (18 bytes with its key) and a span id (10) at least
MAX_REJECTED = 10_000  # past this many unreadable spans a request is malformed, not partly valid


class MalformedPayload(ValueError):
    """The request body is not a valid OTLP ``ExportTraceServiceRequest``."""


@dataclass
class DecodedBatch:
    """Spans decoded from one request, plus the spans that had to be rejected."""

    spans: list[ReadableSpan] = field(default_factory=list)
    rejected: int = 0
    errors: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        # the reason goes back to the client and into the server's log: a rejected span's values
        # (a parser's message quotes the value it refused) are scrubbed like stored ones
        reason = _CONTROLS.sub(_escaped, redaction.redact(reason) or "")
        self.rejected += 1
        if len(self.errors) < 5 and reason not in self.errors:
            self.errors.append(reason)

    @property
    def error_message(self) -> str:
        return "; ".join(self.errors)

    def merge(self, other: DecodedBatch) -> None:
        """Add ``other``'s spans and rejections to this batch."""
        self.spans.extend(other.spans)
        self.rejected += other.rejected
        for reason in other.errors:
            if len(self.errors) < 5 and reason not in self.errors:
                self.errors.append(reason)


@dataclass(frozen=True)
class Limits:
    """Bounds applied to decoded spans, like the SDK's span limits.

    Every string (attribute values, array elements, map keys and values, span and event
    names, status messages) is cut to ``max_value_length`` characters (marked
    ``...[truncated]``); an array or map value holds at most ``max_array_length`` elements
    and ``max_value_length`` characters in all, like one string; a span keeps its first
    ``max_attributes`` attributes, ``max_events`` events and ``max_links`` links. A value
    nested deeper than ``max_depth`` AnyValue levels rejects its span.
    """

    max_value_length: int = 4096
    max_array_length: int = 128
    max_attributes: int = 128
    max_events: int = 128
    max_links: int = 128
    max_depth: int = MAX_ANY_VALUE_DEPTH

    @classmethod
    def default(cls) -> Limits:
        """The limits with ``max_value_length`` from ``CMBAGENT_OTEL_MAX_ATTRIBUTE_LENGTH``."""
        from .redaction import max_length

        return cls(max_value_length=max_length())


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(limit - 14, 0)] + "...[truncated]"


class _Budget:
    """What is left of one attribute value's character allowance."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


def any_value(value: AnyValue, *, json_safe: bool = False, limits: Limits | None = None, _depth: int = 0,
              _budget: _Budget | None = None) -> Any:
    """The Python value of an OTLP ``AnyValue``.

    Scalars map to ``str``/``bool``/``int``/``float``, ``bytes_value`` to ``bytes`` (a
    base64 ``str``, a :class:`~cmbagent_otel.redaction.SentBytes`, with ``json_safe``, so the
    value can be stored in a JSON column and its bytes redacted),
    ``array_value`` to a ``tuple`` and ``kvlist_value`` to a ``dict``; an empty value is
    ``None``. With ``limits``, strings, arrays and maps are bounded (see :class:`Limits`).
    Raises ``ValueError`` for a value nested deeper than ``limits.max_depth`` (default
    :data:`MAX_ANY_VALUE_DEPTH`) levels.
    """
    if _depth > (limits.max_depth if limits is not None else MAX_ANY_VALUE_DEPTH):
        raise ValueError("attribute value nested too deeply")
    if limits is not None and _budget is None:
        _budget = _Budget(limits.max_value_length)
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        items = value.array_value.values
        if limits is None:
            return tuple(any_value(item, json_safe=json_safe, _depth=_depth + 1) for item in items)
        out = []
        for item in items[: limits.max_array_length]:
            if _budget is not None and _budget.left <= 0:
                break
            out.append(any_value(item, json_safe=json_safe, limits=limits, _depth=_depth + 1, _budget=_budget))
        return tuple(out)
    if which == "kvlist_value":
        pairs = value.kvlist_value.values
        if limits is None:
            return {kv.key: any_value(kv.value, json_safe=json_safe, _depth=_depth + 1) for kv in pairs}
        mapping: dict[str, Any] = {}
        for kv in pairs[: limits.max_array_length]:
            if _budget is not None and _budget.left <= 0:
                break
            key = _bounded_str(kv.key, _budget)
            mapping[key] = any_value(kv.value, json_safe=json_safe, limits=limits, _depth=_depth + 1,
                                     _budget=_budget)
        return mapping
    if which == "bytes_value":
        raw = value.bytes_value
        if _budget is not None:
            raw = raw[: max(_budget.left, 0)]
            _budget.left -= len(raw)
        # its base64 text: marked, so that the redaction reads the bytes (see redaction.SentBytes)
        return redaction.SentBytes(base64.b64encode(raw).decode("ascii")) if json_safe else raw
    if which == "string_value":
        return _bounded_str(value.string_value, _budget)
    if _budget is not None:
        _budget.left -= 1
    return getattr(value, which)


def _bounded_str(text: str, budget: _Budget | None) -> str:
    if budget is None:
        return text
    text = _cut(text, max(budget.left, 14))
    budget.left -= len(text)
    return text


def _attributes(items: Iterable[KeyValue], safe: bool, limits: Limits | None = None,
                count: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if limits is not None:
        items = list(items)[: count if count is not None else limits.max_attributes]
        cut = limits.max_value_length
        scalars = limits.max_depth >= 0  # else any_value refuses every value
    else:
        cut, scalars = 0, True
    for kv in items:
        # scalars (nearly every attribute) as any_value decodes them, without its per-value set-up
        value = kv.value
        which = value.WhichOneof("value") if scalars else None
        if which == "string_value":
            decoded: Any = value.string_value
            if limits is not None:
                decoded = _cut(decoded, max(cut, 14))
        elif which in _SCALAR_FIELDS:
            decoded = getattr(value, which)
        else:
            decoded = any_value(value, json_safe=safe, limits=limits)
        if decoded is not None:
            out[_cut(kv.key, cut) if limits is not None else kv.key] = decoded
    return out


_SCALAR_FIELDS = frozenset({"bool_value", "int_value", "double_value"})


# --- attributes from their wire bytes, memoised ---------------------------------------------
# The protobuf path parses each span with a mirror of ``Span`` whose attribute fields (the
# span's, its events' and links') are ``bytes``: every KeyValue arrives as its own encoding.
# Most of them repeat from span to span (an agent's name, a span kind, a model: 180 distinct
# among the 946 of one demo run), so the decoded (key, value) is memoised by those bytes and a
# repeated attribute costs a dict lookup instead of a KeyValue, an AnyValue, a WhichOneof and
# the bounds. Only small attributes with scalar values or short arrays of them are kept (a map
# is a dict each span may change), in a bounded memo.
_MEMO_MAX_BYTES = 256  # a KeyValue's encoding: larger ones are decoded every time
_MEMO_ENTRIES = 4096  # per (limits, json_safe); emptied when full (< 4 MiB)
_MISSING = (None, None)


class _Unbounded(ValueError):
    """A span with more attributes, events or links than the limits: decoded the general way."""


_memos: dict[tuple[Limits | None, bool], dict[bytes, tuple[str | None, Any]]] = {}


def _memo(limits: Limits | None, safe: bool) -> dict[bytes, tuple[str | None, Any]]:
    memo = _memos.get((limits, safe))
    if memo is None:
        if len(_memos) >= 8:  # a server has one set of limits; tests and callers a few more
            _memos.clear()
        memo = _memos[(limits, safe)] = {}
    return memo


def _memoisable(value: Any) -> bool:
    if isinstance(value, tuple):
        return len(value) <= 8 and not any(isinstance(item, (tuple, dict)) for item in value)
    return not isinstance(value, dict)


def _raw_attributes(items: Any, safe: bool, limits: Limits | None = None, count: int | None = None,
                    memo: dict[bytes, tuple[str | None, Any]] | None = None) -> dict[str, Any]:
    """:func:`_attributes` of KeyValues given as their wire encodings (the mirror span's)."""
    if limits is not None and len(items) > (count if count is not None else limits.max_attributes):
        # parsing the span whole also checks the attributes past the bound: decode it that way
        raise _Unbounded("more attributes than the limit")
    if memo is None:
        memo = _memo(limits, safe)
    try:
        # every attribute seen before (most spans): their pairs in order, in C; a repeated key
        # keeps its first place and its last value, as the loop below
        return dict(map(memo.__getitem__, items))
    except KeyError:
        pass
    get = memo.get
    out: dict[str, Any] = {}
    for raw in items:
        key, decoded = get(raw, _MISSING)
        if key is None:
            # a KeyValue decodes to at most one attribute; an empty value to none (not memoised:
            # the memo holds only pairs to keep)
            one = _attributes((_attribute_at_depth(raw),), safe, limits, 1)
            key, decoded = next(iter(one.items())) if one else ("", None)
            if decoded is not None and len(raw) <= _MEMO_MAX_BYTES and _memoisable(decoded):
                if len(memo) >= _MEMO_ENTRIES:
                    memo.clear()
                memo[raw] = (key, decoded)
        if decoded is not None:
            out[key] = decoded
    return out


# --- protobuf's depth limit, counted from the request ------------------------------------------
# protobuf refuses a request nesting messages and groups more than _GROUP_DEPTH deep (its recursion limit); a
# message the decoder parses alone (a span, an attribute, the resource, the scope) would get the whole limit to
# itself. Each is parsed inside an envelope of as many messages as it stands deep in a request, ``Nest { Nest
# nest = 1; T value = 2; }``, so that protobuf counts its depth as in the request (and refuses what that parse
# refuses); a span or an attribute only when its parse alone could differ (the hot path: _parse,
# _attribute_at_depth).
_GROUP_DEPTH = 100
# how deep in a request each message parsed alone stands (the request is 0); attributes: 4 or 5
_DEPTHS = {"resource": 2, "scope": 3, "span": 3}
_ATTRIBUTE_DEPTH = 5
_NEST_KEY = b"\x0a"  # Nest.nest
_VALUE_KEY = b"\x12"  # Nest.value


def _add_nest(file: Any, name: str, value_type: str) -> None:
    from google.protobuf import descriptor_pb2

    fields = descriptor_pb2.FieldDescriptorProto
    message = file.message_type.add(name=name)
    message.field.add(name="nest", number=1, label=fields.LABEL_OPTIONAL, type=fields.TYPE_MESSAGE,
                      type_name=f".{file.package}.{name}")
    message.field.add(name="value", number=2, label=fields.LABEL_OPTIONAL, type=fields.TYPE_MESSAGE,
                      type_name=value_type)


def _nest_classes() -> dict[Any, Any]:
    """``{message class: its Nest class}`` for the OTLP messages parsed alone (in protobuf's default pool,
    where their own classes are)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.Default()
    package = "cmbagent_otel.otlp_nest"
    targets = {"Span": PbSpan, "KeyValue": KeyValue, "Resource": PbResource, "Scope": InstrumentationScope}
    try:
        pool.FindMessageTypeByName(f"{package}.NestSpan")
    except KeyError:
        file = descriptor_pb2.FileDescriptorProto(
            name="cmbagent_otel/otlp_nest.proto", package=package, syntax="proto3",
            dependency=sorted({cls.DESCRIPTOR.file.name for cls in targets.values()}))
        for name, cls in targets.items():
            _add_nest(file, f"Nest{name}", "." + cls.DESCRIPTOR.full_name)
        pool.Add(file)
    return {cls: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Nest{name}"))
            for name, cls in targets.items()}


def _skipped_nothing(message: Any, size: int) -> bool:
    """Whether protobuf's parse of ``size`` bytes into ``message`` skipped nothing (no unknown field, so no group):
    what it read then re-encodes to those bytes (an encoding protobuf writes otherwise only ever shrinks). The
    unknown fields are dropped (the decoder reads none)."""
    message.DiscardUnknownFields()
    return bool(message.ByteSize() == size)


# an encoding shorter than this cannot nest past protobuf's limit where an attribute stands (each level, a
# message or a group, takes 2 bytes at least)
_SHALLOW_BYTES = 2 * (_GROUP_DEPTH - _ATTRIBUTE_DEPTH)
_CONTAINERS = ("array_value", "kvlist_value")


def _attribute_at_depth(raw: bytes) -> Any:
    """A span's, event's or link's attribute (a ``KeyValue``), parsed as protobuf parses it in a request, where
    it stands 4 or 5 messages deep: taken as 5 (what it decodes to then holds at either; one refused there makes
    its span be read whole, each attribute at its own depth). Alone when it is too short to nest that deep, or
    protobuf skipped nothing in it and its value holds no array or map (a map nests 3 messages per level: one
    32 levels deep passes ``Limits.max_depth`` and not protobuf); else in its envelope."""
    attribute = KeyValue.FromString(raw)
    if len(raw) < _SHALLOW_BYTES or (_skipped_nothing(attribute, len(raw))
                                     and attribute.value.WhichOneof("value") not in _CONTAINERS):
        return attribute
    return _nested(KeyValue, raw, _ATTRIBUTE_DEPTH)


def _nested(cls: Any, raw: bytes | memoryview, depth: int) -> Any:
    """``raw`` parsed as a ``cls`` standing ``depth`` messages deep in a request (see :data:`_NESTS`)."""
    size = len(raw)
    heads = [_VALUE_KEY + _encode_varint(size)]
    size += len(heads[0])
    for _ in range(depth - 1):
        head = _NEST_KEY + _encode_varint(size)
        heads.append(head)
        size += len(head)
    heads.reverse()
    heads.append(raw)
    nest = _NESTS[cls]
    try:
        message = nest.FromString(b"".join(heads))
    except DecodeError as exc:  # worded as a parse of the message alone words it (the type named is its own)
        raise DecodeError(str(exc).replace(nest.DESCRIPTOR.full_name, cls.DESCRIPTOR.full_name)) from None
    for _ in range(depth - 1):
        message = message.nest
    return message.value


def _raw_span_class() -> tuple[Any, Any]:
    """``Span`` with its attributes (and its events' and links') as ``bytes`` fields, same numbers; and its
    ``Nest`` (see :func:`_nested`)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto()
    PbSpan.DESCRIPTOR.file.CopyToProto(file)
    package = "cmbagent_otel.otlp_raw"
    kept = descriptor_pb2.FileDescriptorProto(name="cmbagent_otel/otlp_raw.proto", package=package,
                                              syntax=file.syntax)
    for message in file.message_type:
        if message.name not in ("Span", "Status"):
            continue
        copy = kept.message_type.add()
        copy.CopyFrom(message)
        for fields in [copy.field, *(nested.field for nested in copy.nested_type)]:
            for fd in fields:
                if fd.type_name == ".opentelemetry.proto.common.v1.KeyValue":
                    fd.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                    fd.ClearField("type_name")
                elif fd.type_name.startswith(".opentelemetry.proto.trace.v1."):
                    fd.type_name = "." + package + fd.type_name[len(".opentelemetry.proto.trace.v1"):]
    _add_nest(kept, "NestSpan", f".{package}.Span")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(kept)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))  # type: ignore[return-value]
                 for name in ("Span", "NestSpan"))


def _probe_class() -> tuple[Any, Any]:
    """``ScopeSpans`` as protobuf needs to know it to walk every message and group its spans nest (a
    probe: its spans' events, links and status are messages with no fields, everything else unknown),
    and its ``Nest``. A ScopeSpans that parses as this at its depth in a request holds no span
    nesting past protobuf's limit there (see :func:`_shallow`)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fields = descriptor_pb2.FieldDescriptorProto
    package = "cmbagent_otel.otlp_probe"
    file = descriptor_pb2.FileDescriptorProto(name="cmbagent_otel/otlp_probe.proto", package=package,
                                              syntax="proto3")
    otlp = descriptor_pb2.FileDescriptorProto()
    PbSpan.DESCRIPTOR.file.CopyToProto(otlp)
    span = file.message_type.add(name="Span")
    for fd in next(message for message in otlp.message_type if message.name == "Span").field:
        # the mirror's message fields (events, links, status: its attributes are bytes)
        if fd.type == fields.TYPE_MESSAGE and fd.type_name != ".opentelemetry.proto.common.v1.KeyValue":
            file.message_type.add(name=f"Empty{fd.number}")
            span.field.add(name=fd.name, number=fd.number, label=fd.label, type=fields.TYPE_MESSAGE,
                           type_name=f".{package}.Empty{fd.number}")
    number = ScopeSpans.DESCRIPTOR.fields_by_name["spans"].number
    file.message_type.add(name="ScopeSpans").field.add(name="spans", number=number, label=fields.LABEL_REPEATED,
                                                       type=fields.TYPE_MESSAGE, type_name=f".{package}.Span")
    _add_nest(file, "NestScopeSpans", f".{package}.ScopeSpans")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))  # type: ignore[return-value]
                 for name in ("ScopeSpans", "NestScopeSpans"))


_RawSpan, _RawNest = _raw_span_class()
_ProbeScopeSpans, _ProbeNest = _probe_class()
# each message class parsed alone -> its Nest
_NESTS: dict[Any, Any] = {**_nest_classes(), _RawSpan: _RawNest, _ProbeScopeSpans: _ProbeNest}
_PROBE_BYTES = 1 << 20  # larger ScopeSpans are not probed (the probe holds a copy of what it skips)


def _shallow(body: bytes, start: int, end: int) -> bool:
    """Whether the ``ScopeSpans`` in ``body[start:end]`` (at most :data:`_PROBE_BYTES`) parses, at its depth
    in a request, as :func:`_probe_class`'s probe: then no message or group in its spans nests past
    protobuf's limit there, so each span's mirror parsed alone reads as in the request, and
    :func:`_parse` need not re-encode each to find out (one parse in C for them all)."""
    if end - start > _PROBE_BYTES:
        return False
    try:
        _nested(_ProbeScopeSpans, memoryview(body)[start:end], 2)
    except (DecodeError, RuntimeError, ValueError):
        return False
    return True


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


def _scope(scope: InstrumentationScope, schema_url: str, safe: bool, limits: Limits | None) -> SdkScope:
    return SdkScope(
        _text(scope.name, limits),
        _text(scope.version, limits) or None,
        schema_url or None,
        _attributes(scope.attributes, safe, limits) or None,
    )


def _text(value: str, limits: Limits | None) -> str:
    return _cut(value, limits.max_value_length) if limits is not None else value


def _span(pb: PbSpan, resource: Resource, scope: SdkScope, safe: bool, limits: Limits | None = None,
          attributes: Callable[..., dict[str, Any]] = _attributes) -> ReadableSpan:
    trace_id = _id(pb.trace_id, 16, "trace_id")
    span_id = _id(pb.span_id, 8, "span_id")
    flags = _trace_flags(pb.flags)
    context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags,
                          trace_state=_trace_state(pb.trace_state))
    parent = None
    if pb.parent_span_id:
        parent = SpanContext(trace_id, _id(pb.parent_span_id, 8, "parent_span_id"),
                             is_remote=_is_remote(pb.flags), trace_flags=flags)
    pb_events = pb.events if limits is None else list(pb.events)[: limits.max_events]
    events = [Event(_text(ev.name, limits), attributes(ev.attributes, safe, limits), ev.time_unix_nano or None)
              for ev in pb_events]
    links = []
    for ln in (pb.links if limits is None else list(pb.links)[: limits.max_links]):
        link_ctx = SpanContext(
            _id(ln.trace_id, 16, "link trace_id"), _id(ln.span_id, 8, "link span_id"),
            is_remote=_is_remote(ln.flags), trace_flags=_trace_flags(ln.flags),
            trace_state=_trace_state(ln.trace_state),
        )
        links.append(Link(link_ctx, attributes(ln.attributes, safe, limits)))
    code = _STATUS.get(pb.status.code, StatusCode.UNSET)
    # The SDK refuses a description on non-error statuses; keep it only where it is allowed.
    status = Status(code, _text(pb.status.message, limits) or None) if code is StatusCode.ERROR else Status(code)
    kind = _KINDS.get(pb.kind)
    if kind is None:
        raise ValueError(f"unknown span kind {pb.kind}")
    if not pb.name:
        raise ValueError("span name is empty")
    if pb.end_time_unix_nano and pb.end_time_unix_nano < pb.start_time_unix_nano:
        raise ValueError("span ends before it starts")
    return ReadableSpan(
        name=_text(pb.name, limits),
        context=context,
        parent=parent,
        resource=resource,
        attributes=attributes(pb.attributes, safe, limits),
        events=events,
        links=links,
        kind=kind,
        status=status,
        start_time=pb.start_time_unix_nano or None,
        end_time=pb.end_time_unix_nano or None,
        instrumentation_scope=scope,
    )


_EMPTY_TRACE_STATE = TraceState()
_FLAGS_OF_LOW_BYTE = tuple(TraceFlags(low if low else TraceFlags.SAMPLED) for low in range(256))  # _trace_flags
_STATUS_UNSET, _STATUS_OK = Status(StatusCode.UNSET), Status(StatusCode.OK)


def _raw_span(pb: Any, resource: Resource, scope: SdkScope, safe: bool, limits: Limits | None,
              attributes: Callable[..., dict[str, Any]]) -> ReadableSpan:
    """:func:`_span` of a mirror span (``_RawSpan``), the common case with less work: anything
    unusual (a bad id or kind, a trace state, links, an unknown status...) raises, and the span is
    decoded by :func:`_span`, which words the rejection or takes the general way."""
    raw_trace, raw_span, raw_parent = pb.trace_id, pb.span_id, pb.parent_span_id
    name, start, end = pb.name, pb.start_time_unix_nano, pb.end_time_unix_nano
    kind = _KINDS.get(pb.kind)
    status_code = pb.status.code
    cut = limits.max_value_length if limits is not None else None
    if (len(raw_trace) != 16 or len(raw_span) != 8 or (raw_parent and len(raw_parent) != 8) or kind is None
            or not name or (end and end < start) or pb.trace_state or pb.links or status_code not in (0, 1, 2)
            or (cut is not None and len(name) > cut)):
        raise _Unbounded("decoded the general way")
    trace_id = int.from_bytes(raw_trace, "big")
    span_id = int.from_bytes(raw_span, "big")
    parent_id = int.from_bytes(raw_parent, "big") if raw_parent else None
    if not trace_id or not span_id or parent_id == 0:
        raise _Unbounded("decoded the general way")
    flags = pb.flags
    trace_flags = _FLAGS_OF_LOW_BYTE[flags & _FLAGS_TRACE_FLAGS_MASK]
    # SpanContext(...) without its checks: the ids are non-zero and of the right size, so valid
    context = tuple.__new__(SpanContext, (trace_id, span_id, False, trace_flags, _EMPTY_TRACE_STATE, True))
    parent = None
    if parent_id is not None:
        parent = tuple.__new__(SpanContext, (trace_id, parent_id, bool(flags & _FLAGS_HAS_IS_REMOTE and flags
                                                                      & _FLAGS_IS_REMOTE), trace_flags,
                                             DEFAULT_TRACE_STATE, True))
    events = [Event(_text(ev.name, limits), attributes(ev.attributes, safe, limits), ev.time_unix_nano or None)
              for ev in pb.events] if pb.events else []
    return ReadableSpan(
        name=name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=attributes(pb.attributes, safe, limits),
        events=events,
        links=[],
        kind=kind,
        status=(_STATUS_UNSET, _STATUS_OK)[status_code] if status_code < 2
        else Status(StatusCode.ERROR, _text(pb.status.message, limits) or None),
        start_time=start or None,
        end_time=end or None,
        instrumentation_scope=scope,
    )


def spans_from_request(request: ExportTraceServiceRequest, *, json_safe: bool = False,
                       limits: Limits | None = None) -> DecodedBatch:
    """Convert a parsed request into ``ReadableSpan`` objects; invalid spans are rejected, not fatal.

    ``json_safe`` turns ``bytes`` attribute values into base64 strings (see :func:`any_value`);
    ``limits`` bounds what is kept (see :class:`Limits`; ``None``: nothing is cut).
    """
    batch = DecodedBatch()
    for part in _iter_request(request, json_safe, limits, None):
        batch.merge(part)
    return batch


def _iter_request(request: ExportTraceServiceRequest, safe: bool, limits: Limits | None,
                  chunk: int | None) -> Iterator[DecodedBatch]:
    batch = DecodedBatch()
    for resource_spans in request.resource_spans:
        resource = None  # built for the first span: empty containers cost no resource or scope each
        for scope_spans in resource_spans.scope_spans:
            if not scope_spans.spans:
                continue
            if resource is None:
                resource = Resource(_attributes(resource_spans.resource.attributes, safe, limits),
                                    resource_spans.schema_url or None)
            scope = _scope(scope_spans.scope, scope_spans.schema_url, safe, limits)
            for pb in scope_spans.spans:
                try:
                    batch.spans.append(_span(pb, resource, scope, safe, limits))
                except (ValueError, TypeError) as exc:
                    batch.reject(f"span {_cut(pb.name, 100)!r}: {exc}")
                if chunk and len(batch.spans) >= chunk:
                    yield batch
                    batch = DecodedBatch()
    yield batch


# --- the protobuf wire format, walked without parsing ------------------------------------------

def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedPayload("invalid protobuf: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int, depth: int = 0) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field number, wire type, value start, value end, field start)`` of each field of
    the message in ``buf[start:end]``, nested ``depth`` messages deep in the request; only
    length-delimited values have a meaningful start."""
    pos = start
    while pos < end:
        first = pos
        key = buf[pos]
        if key < 0x80:  # one-byte keys and lengths (up to 16 KiB) inline: the spans' own
            pos += 1
        else:
            key, pos = _key(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise MalformedPayload("invalid protobuf: field number 0")
        if wire == 2:
            if pos < end and buf[pos] < 0x80:
                size = buf[pos]
                pos += 1
            elif pos + 1 < end and buf[pos + 1] < 0x80:
                size = buf[pos] & 0x7F | buf[pos + 1] << 7
                pos += 2
            else:
                size, pos = _varint(buf, pos, end)
            if size > end - pos:
                raise MalformedPayload("invalid protobuf: length exceeds the message")
            yield number, wire, pos, pos + size, first
            pos += size
        elif wire == 0:
            _, pos = _varint(buf, pos, end)
            yield number, wire, pos, pos, first
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise MalformedPayload("invalid protobuf: truncated fixed-width field")
            yield number, wire, pos, pos, first
        elif wire == 3:  # a group (deprecated, not OTLP): an unknown field, skipped as protobuf does
            pos = _skip_group(buf, pos, end, number, _GROUP_DEPTH - depth)
            yield number, wire, pos, pos, first
        elif wire == 4:
            raise MalformedPayload(f"invalid protobuf: end of group {number} without its start")
        else:  # 6 and 7 do not exist
            raise MalformedPayload(f"invalid protobuf: wire type {wire}")


def _key(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A field's key as protobuf reads it: a varint of at most 5 bytes and 32 bits (its field numbers end at
    2^29 - 1)."""
    key, after = _varint(buf, pos, end)
    if key > _MAX_KEY:
        raise MalformedPayload(f"invalid protobuf: field number {key >> 3} past 2^29 - 1")
    if after - pos > 5:
        raise MalformedPayload("invalid protobuf: field key longer than 5 bytes")
    return key, after


_MAX_KEY = 0xFFFFFFFF



def _skip_group(buf: bytes, pos: int, end: int, number: int, most: int) -> int:
    """The position after the end of the group ``number`` whose start tag ends at ``pos``: its
    fields (groups nested in it too) are walked, as protobuf skips an unknown group, without
    recursion. Raises :class:`MalformedPayload` for a group cut short, ended by another field's
    end tag, nested more than ``most`` deep or holding a field protobuf would refuse."""
    open_groups = [number]
    while pos < end:
        key, pos = _key(buf, pos, end)
        number, wire = key >> 3, key & 7
        # a field number 0 inside a group is skipped as protobuf's parser (upb) skips it
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if size > end - pos:
                raise MalformedPayload("invalid protobuf: length exceeds the message")
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise MalformedPayload("invalid protobuf: truncated fixed-width field")
        elif wire == 3:
            if len(open_groups) >= most:
                raise MalformedPayload(f"invalid protobuf: groups nested more than {most} deep")
            open_groups.append(number)
        elif wire == 4:
            if open_groups.pop() != number:
                raise MalformedPayload(f"invalid protobuf: group ended by the end tag of field {number}")
            if not open_groups:
                return pos
        else:
            raise MalformedPayload(f"invalid protobuf: wire type {wire}")
    raise MalformedPayload("invalid protobuf: group without its end")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# message -> {field number: (child message, Limits attribute bounding its count or None)}
_TRIM: dict[str, dict[int, tuple[str, str | None]]] = {
    "span": {9: ("kv", "max_attributes"), 11: ("event", "max_events"), 13: ("link", "max_links")},
    "event": {3: ("kv", "max_attributes")},
    "link": {4: ("kv", "max_attributes")},
    "resource": {1: ("kv", "max_attributes")},
    "scope": {3: ("kv", "max_attributes")},
    "kv": {2: ("any", None)},
    "any": {5: ("array", None), 6: ("kvlist", None)},
    "array": {1: ("any", "max_array_length")},
    "kvlist": {1: ("kv", "max_array_length")},
}


def _trim(buf: bytes, start: int, end: int, message: str, limits: Limits, depth: int = 0) -> bytes:
    """The message in ``buf[start:end]`` with its repeated fields cut to ``limits``, so that
    parsing it allocates a bounded amount; raises ``ValueError`` past ``limits.max_depth``."""
    rules = _TRIM[message]
    out = bytearray()
    counts: dict[int, int] = {}
    for number, wire, value_start, value_end, field_start in _fields(buf, start, end):
        rule = rules.get(number) if wire == 2 else None
        if rule is None:
            out += buf[field_start:value_end]
            continue
        child, bound = rule
        if bound is not None:
            seen = counts.get(number, 0)
            if seen >= getattr(limits, bound):
                continue
            counts[number] = seen + 1
        child_depth = depth + 1 if message == "any" else depth
        if child_depth > limits.max_depth:
            raise ValueError("attribute value nested too deeply")
        inner = _trim(buf, value_start, value_end, child, limits, child_depth)
        out += _encode_varint(number << 3 | 2) + _encode_varint(len(inner)) + inner
    return bytes(out)



def _parse(cls: Any, buf: bytes, start: int, end: int, message: str, limits: Limits | None,
           shallow: bool = False) -> Any:
    """``buf[start:end]`` parsed as ``cls`` as protobuf parses it where ``message`` stands in a request;
    ``shallow``: a span of a ScopeSpans :func:`_shallow` accepted."""
    if limits is not None and end - start > _SMALL_SPAN:
        raw = _trim(buf, start, end, message, limits)
    else:
        raw = buf[start:end]
    if cls is not _RawSpan:  # the resource, the scope, a span read whole: in their envelope (see _nested)
        return _nested(cls, raw, _DEPTHS[message])
    span = cls.FromString(raw)
    if shallow:  # nothing in it nests past the limit at its depth (its trimmed form neither): alone is the same
        return span
    # a span's mirror, alone when protobuf skipped nothing in it (_skipped_nothing written out): its
    # messages then nest 2 deep (events, links, status; attributes are bytes), far within the limit
    span.DiscardUnknownFields()
    if span.ByteSize() == len(raw):
        return span
    return _nested(cls, raw, _DEPTHS[message])


def _utf8(buf: bytes, start: int, end: int, what: str) -> str:
    try:
        return buf[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPayload(f"invalid protobuf: {what} is not UTF-8") from None


def _resource_at(body: bytes, start: int, end: int, safe: bool, limits: Limits | None) -> Resource:
    """The resource of the ``ResourceSpans`` message in ``body[start:end]``."""
    parts: list[tuple[int, int]] = []
    schema = ""
    for number, wire, value_start, value_end, _ in _fields(body, start, end, 1):
        if number == 1 and wire == 2:
            parts.append((value_start, value_end))
        elif number == 3 and wire == 2:
            schema = _utf8(body, value_start, value_end, "schema_url")
    resource_pb = _merged(PbResource, body, parts, "resource", limits)
    return Resource(_attributes(resource_pb.attributes, safe, limits), schema or None)


def _merged(cls: Any, body: bytes, parts: list[tuple[int, int]], message: str, limits: Limits | None) -> Any:
    """The message given at ``parts`` of ``body``: a field given more than once is merged, as protobuf
    parses it (the last name or version given; the attributes of all), not replaced by its last
    occurrence. Their encodings joined parse as that merge, once (trimmed to ``limits``), however many."""
    if not parts:
        return cls()
    if len(parts) == 1:
        return _parse(cls, body, parts[0][0], parts[0][1], message, limits)
    joined = b"".join([body[part_start:part_end] for part_start, part_end in parts])
    return _parse(cls, joined, 0, len(joined), message, limits)


_MOST_PLACES = 1024  # spans whose places one skim lists (~120 KiB): the rest are found again by _skimmed_spans


def _skim_scope_spans(buf: bytes, start: int, end: int,
                      places: list[tuple[int, int]] | None = None) -> tuple[int, int, int, int] | None:
    """Where the scope and the schema URL of the ``ScopeSpans`` in ``buf[start:end]`` are (the
    schema URL's last occurrence; ``(0, 0)`` for one absent), when it holds only its three
    length-delimited fields with lengths under 2 MiB and one scope at most, as exporters write it;
    ``None`` for anything else (then :func:`_fields` walks it, merges repeated scopes and words
    what is wrong). Each span costs a few comparisons here, not a generator step; ``places``, when
    given, gets the first :data:`_MOST_PLACES` spans' ``(start, end)`` (meaningful only when the
    skim accepts), so that they are not walked again to be read."""
    scope_start = scope_end = schema_start = schema_end = 0
    room = _MOST_PLACES if places is not None else 0
    add = places.append if places is not None else None
    pos = start
    try:
        while pos < end:
            key = buf[pos]
            size = buf[pos + 1]
            if size < 0x80:
                pos += 2
            else:
                high = buf[pos + 2]
                if high < 0x80:
                    size = size & 0x7F | high << 7
                    pos += 3
                else:
                    third = buf[pos + 3]
                    if third >= 0x80:
                        return None
                    size = size & 0x7F | (high & 0x7F) << 7 | third << 14
                    pos += 4
            if pos + size > end:
                return None
            if key == 0x12:  # a span
                if room:
                    add((pos, pos + size))  # type: ignore[misc]
                    room -= 1
                pos += size
            elif key == 0x0A:  # the scope
                if scope_end:
                    return None  # repeated: protobuf merges the occurrences, which the walk does
                scope_start, scope_end = pos, pos + size
                pos = scope_end
            elif key == 0x1A:  # schema_url
                schema_start, schema_end = pos, pos + size
                pos = schema_end
            else:
                return None
    except IndexError:  # a key or length cut by the end of the body
        return None
    return (scope_start, scope_end, schema_start, schema_end) if pos == end else None


def _skimmed_spans(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each span of the ``ScopeSpans`` in ``buf[start:end]``, which
    :func:`_skim_scope_spans` accepted: its fields are then spans, a scope or a schema URL, each with
    a length of one to three bytes that fits, so only those lengths are read (what :func:`_fields`
    would yield for them, without its general checks, once per span)."""
    pos = start
    while pos < end:
        key = buf[pos]
        size = buf[pos + 1]
        if size < 0x80:
            pos += 2
        elif buf[pos + 2] < 0x80:
            size = size & 0x7F | buf[pos + 2] << 7
            pos += 3
        else:
            size = size & 0x7F | (buf[pos + 2] & 0x7F) << 7 | buf[pos + 3] << 14
            pos += 4
        if key == 0x12:
            yield pos, pos + size
        pos += size


def _walked_spans(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each span of the ``ScopeSpans`` in ``buf[start:end]``, by the field walk
    (anything the skim declines; raises :class:`MalformedPayload` where the walk finds it)."""
    for number, wire, value_start, value_end, _ in _fields(buf, start, end, 2):
        if number == 2 and wire == 2:
            yield value_start, value_end


def _scope_at(body: bytes, start: int, end: int, safe: bool, limits: Limits | None,
              skimmed: tuple[int, int, int, int] | None = None) -> SdkScope:
    """The instrumentation scope of the ``ScopeSpans`` message in ``body[start:end]`` (``skimmed``:
    what :func:`_skim_scope_spans` found in it, when it was run already)."""
    schema = ""
    if skimmed is None:
        skimmed = _skim_scope_spans(body, start, end)
    if skimmed is not None:
        scope_start, scope_end, schema_start, schema_end = skimmed
        if schema_end:
            schema = _utf8(body, schema_start, schema_end, "schema_url")
        parts = [(scope_start, scope_end)] if scope_end else []
        return _scope(_merged(InstrumentationScope, body, parts, "scope", limits), schema, safe, limits)
    parts = []
    for number, wire, value_start, value_end, _ in _fields(body, start, end, 2):
        if number == 1 and wire == 2:
            parts.append((value_start, value_end))  # a repeated scope: merged (see _merged)
        elif number == 3 and wire == 2:
            schema = _utf8(body, value_start, value_end, "schema_url")
    return _scope(_merged(InstrumentationScope, body, parts, "scope", limits), schema, safe, limits)


def iter_protobuf(body: bytes, *, json_safe: bool = False, limits: Limits | None = None,
                  chunk: int | None = None) -> Iterator[DecodedBatch]:
    """Decode an ``application/x-protobuf`` request body lazily, ``chunk`` spans at a time
    (``None``: one batch). Raises :class:`MalformedPayload` when the request's structure is
    unreadable; a span that cannot be read is rejected (counted in the batch)."""
    batch = DecodedBatch()
    earlier = 0  # spans rejected in batches already yielded
    attributes = functools.partial(_raw_attributes, memo=_memo(limits, json_safe))
    size = len(body)
    try:
        for number, wire, rs_start, rs_end, _ in _fields(body, 0, size):
            if number != 1 or wire != 2:
                continue  # unknown field: ignored, as OTLP receivers must
            # the resource and each scope are built for their first span: a flood of empty
            # containers (2 bytes each) cost one SDK Resource or scope each, ~30 s of CPU per 16 MiB
            resource = None
            for n2, w2, ss_start, ss_end, _ in _fields(body, rs_start, rs_end, 1):
                if n2 != 2 or w2 != 2:
                    continue
                scope = None
                shallow = False
                # the spans' places: as exporters write a ScopeSpans, by the skim's few comparisons per
                # span (validated whole first), not a step of the general walk each; a ScopeSpans too
                # short to hold a span is left to the walk (no skim for a flood of empty containers)
                places: list[tuple[int, int]] = []
                skimmed = _skim_scope_spans(body, ss_start, ss_end, places) if ss_end - ss_start > _MIN_SPAN \
                    else None
                if skimmed is None:
                    spans: Iterable[tuple[int, int]] = _walked_spans(body, ss_start, ss_end)
                elif len(places) < _MOST_PLACES:
                    spans = places
                else:
                    spans = _skimmed_spans(body, ss_start, ss_end)
                for start, end in spans:
                    if earlier + batch.rejected >= MAX_REJECTED:
                        raise MalformedPayload(f"more than {MAX_REJECTED} invalid spans: {batch.error_message}")
                    if end - start < _MIN_SPAN:  # cheaply: a flood of empty spans must not cost a parse each
                        batch.reject("span without trace_id and span_id")
                        continue
                    if scope is None:
                        if resource is None:
                            resource = _resource_at(body, rs_start, rs_end, json_safe, limits)
                        scope = _scope_at(body, ss_start, ss_end, json_safe, limits, skimmed)
                        shallow = skimmed is not None and _shallow(body, ss_start, ss_end)
                    try:
                        pb = _parse(_RawSpan, body, start, end, "span", limits, shallow)
                        if limits is not None and (len(pb.events) > limits.max_events
                                                   or len(pb.links) > limits.max_links):
                            raise _Unbounded("more events or links than the limits")
                        span = _raw_span(pb, resource, scope, json_safe, limits, attributes)
                    except (ValueError, TypeError, DecodeError, RuntimeError, MalformedPayload):
                        # what parsing the span whole says: its own error, or the one an attribute's
                        # bytes gave (invalid UTF-8, a malformed value), worded as that parse words it
                        try:
                            pb = _parse(PbSpan, body, start, end, "span", limits)
                        except (DecodeError, RuntimeError, ValueError, MalformedPayload) as exc:
                            batch.reject(f"unreadable span: {_cut(str(exc), 200)}")
                            continue
                        try:
                            span = _span(pb, resource, scope, json_safe, limits)
                        except (ValueError, TypeError) as exc:
                            batch.reject(f"span {_cut(pb.name, 100)!r}: {exc}")
                            continue
                    batch.spans.append(span)
                    if chunk and len(batch.spans) >= chunk:
                        earlier += batch.rejected
                        yield batch
                        batch = DecodedBatch()
    except (DecodeError, RuntimeError, ValueError) as exc:
        if isinstance(exc, MalformedPayload):
            raise
        raise MalformedPayload(f"invalid protobuf ExportTraceServiceRequest: {_cut(str(exc), 200)}") from None
    yield batch


def decode_protobuf(body: bytes, *, json_safe: bool = False, limits: Limits | None = None) -> DecodedBatch:
    """Decode an ``application/x-protobuf`` request body (see :func:`iter_protobuf`)."""
    batch = DecodedBatch()
    for part in iter_protobuf(body, json_safe=json_safe, limits=limits):
        batch.merge(part)
    return batch


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


def json_cost(body: bytes) -> int:
    """Bytes of memory ``json.loads`` and the protobuf conversion may take for ``body``: an
    upper estimate from its structural characters (an object costs ~200 bytes as a dict, a
    string ~50 as ``str``, however short they are on the wire)."""
    return (len(body) + 240 * body.count(b"{") + 100 * body.count(b"[") + 40 * body.count(b'"')
            + 16 * body.count(b","))


def _too_deep(value: Any, max_depth: int) -> bool:
    """Whether an OTLP/JSON AnyValue nests arrays/maps deeper than ``max_depth`` levels."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict):
            continue
        for key in ("arrayValue", "array_value", "kvlistValue", "kvlist_value"):
            inner = item.get(key)
            values = inner.get("values") if isinstance(inner, dict) else None
            if not isinstance(values, list) or not values:
                continue
            if depth + 1 > max_depth:
                return True
            kv = key.startswith("kv")
            stack.extend((v.get("value") if kv and isinstance(v, dict) else v, depth + 1) for v in values)
    return False


def _attributes_too_deep(obj: dict[str, Any], max_depth: int) -> bool:
    attributes = obj.get("attributes")
    if not isinstance(attributes, list):
        return False
    return any(isinstance(kv, dict) and _too_deep(kv.get("value"), max_depth) for kv in attributes)


def _span_too_deep(span: dict[str, Any], max_depth: int) -> bool:
    if _attributes_too_deep(span, max_depth):
        return True
    for key in ("events", "links"):
        items = span.get(key)
        if isinstance(items, list) and any(isinstance(i, dict) and _attributes_too_deep(i, max_depth)
                                           for i in items):
            return True
    return False


# a \uD800-\uDFFF escape: half of a pair (joined by json.loads) or a lone one (which protobuf refuses)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_lone_surrogates(doc: Any) -> Any:
    """``doc`` with each lone surrogate in its strings (keys too) replaced by U+FFFD, in place.

    JavaScript strings may hold them (a span name cut in the middle of an emoji by a length
    limit counting UTF-16 units) and ``JSON.stringify`` writes them as ``\\udXXX`` escapes;
    one such string made ``json_format`` refuse the whole request. Walked with a stack, not
    recursion: ``json.loads`` accepts documents nested deeper than Python's recursion limit
    allows a recursive walk (the depth limits are checked after this)."""
    clean = _LONE_SURROGATE.sub
    if isinstance(doc, str):
        return clean("\ufffd", doc)
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            items = list(node.items())
            node.clear()
            for key, value in items:
                if isinstance(value, str):
                    value = clean("\ufffd", value)
                elif isinstance(value, (dict, list)):
                    stack.append(value)
                node[clean("\ufffd", key)] = value
        elif isinstance(node, list):
            for i, value in enumerate(node):
                if isinstance(value, str):
                    node[i] = clean("\ufffd", value)
                elif isinstance(value, (dict, list)):
                    stack.append(value)
    return doc


# control and bidirectional characters: a parser's message quotes the client's value, and the
# reason is logged (a newline forges log lines, ESC sequences drive the reader's terminal); and
# invisible ones, as the CLI escapes them (zero-width, BOM, soft hyphen, Hangul fillers, Unicode tags:
# text the log's reader does not see)
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f"
                       "\u2028-\u202e\u2060-\u2064\u2066-\u206f\u3164\ufeff\uffa0\ufff9-\ufffb"
                       "\U000e0000-\U000e007f]")


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def _learn_attribute_secrets(span: Any) -> None:
    """Learn the values of a JSON span's secret-named attributes (its own, its events' and links'),
    whatever their type: the span is rejected, and the parser's message quotes the value it refused."""
    stack, seen = [span], 0
    while stack and seen < 10_000:
        node = stack.pop()
        seen += 1
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            key = node.get("key")
            if isinstance(key, str) and "value" in node and redaction.is_secret_key(key):
                values, found = [node["value"]], []
                while values and len(found) < 64:
                    value = values.pop()
                    if isinstance(value, dict):
                        values.extend(value.values())
                    elif isinstance(value, list):
                        values.extend(value)
                    elif value is not None:
                        found.append(str(value))
                for value in found:
                    redaction.learn_secret(value)
            else:
                stack.extend(v for v in node.values() if isinstance(v, (dict, list)))


def _drop_unparsable_spans(doc: dict[str, Any], batch: DecodedBatch) -> bool:
    """Remove from ``doc`` each span ``json_format`` cannot parse on its own (an integer out of
    range, a wrong type, an unknown enum name...), rejecting it in ``batch``; True when any was.
    Its batch-mates are then stored (partial success) instead of the request failing whole."""
    dropped = False
    for rs in _items(doc, "resourceSpans", "resource_spans", "request"):
        for ss in _items(rs, "scopeSpans", "scope_spans", "resourceSpans"):
            spans = _items(ss, "spans", "spans", "scopeSpans")
            kept = []
            for span in spans:
                try:
                    json_format.ParseDict(span, PbSpan(), ignore_unknown_fields=True,
                                          max_recursion_depth=_JSON_FORMAT_DEPTH)
                except (json_format.ParseError, ValueError, TypeError, binascii.Error, RecursionError) as exc:
                    _learn_attribute_secrets(span)
                    batch.reject(f"span {_cut(str(span.get('name')), 100)!r}: {_cut(str(exc), 200)}")
                    dropped = True
                    continue
                kept.append(span)
            if len(kept) != len(spans):
                ss["spans"] = kept
    return dropped


def _prepare_json(body: bytes, limits: Limits | None, batch: DecodedBatch) -> ExportTraceServiceRequest:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedPayload(f"invalid JSON: {_cut(str(exc), 200)}") from None
    if _SURROGATE_ESCAPE.search(body):
        doc = _without_lone_surrogates(doc)
    doc = _require_object(doc, "request")
    max_depth = limits.max_depth if limits is not None else MAX_ANY_VALUE_DEPTH
    resource_spans = _items(doc, "resourceSpans", "resource_spans", "request")
    kept_resources = []
    for i, rs in enumerate(resource_spans):
        rs = _require_object(rs, f"resourceSpans[{i}]")
        resource = rs.get("resource")
        if isinstance(resource, dict) and _attributes_too_deep(resource, max_depth):
            raise MalformedPayload(f"resourceSpans[{i}].resource: attribute value nested too deeply")
        scope_spans = _items(rs, "scopeSpans", "scope_spans", f"resourceSpans[{i}]")
        kept_scopes = []
        for j, ss in enumerate(scope_spans):
            ss = _require_object(ss, f"resourceSpans[{i}].scopeSpans[{j}]")
            scope = ss.get("scope")
            if isinstance(scope, dict) and _attributes_too_deep(scope, max_depth):
                raise MalformedPayload(f"resourceSpans[{i}].scopeSpans[{j}].scope: attribute value nested too deeply")
            spans = _items(ss, "spans", "spans", f"resourceSpans[{i}].scopeSpans[{j}]")
            kept = []
            for k, span in enumerate(spans):
                where = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                span = _require_object(span, where)
                if not (span.get("traceId") or span.get("trace_id")):
                    # cheaply, as protobuf's empty spans: "{}," each cost json_format ~15 us, and
                    # past MAX_REJECTED the request is malformed, as in protobuf
                    if batch.rejected >= MAX_REJECTED:
                        raise MalformedPayload(f"more than {MAX_REJECTED} invalid spans: {batch.error_message}")
                    batch.reject(f"span {_cut(str(span.get('name', '')), 100)!r}: trace_id must be 16 bytes, got 0")
                    continue
                if _span_too_deep(span, max_depth):
                    name = span.get("name")
                    batch.reject(f"span {_cut(str(name), 100)!r}: attribute value nested too deeply")
                    continue
                _fix_ids(span, where)
                for n, link in enumerate(_items(span, "links", "links", where)):
                    _fix_ids(_require_object(link, f"{where}.links[{n}]"), f"{where}.links[{n}]")
                kept.append(span)
            if len(kept) != len(spans):
                ss["spans"] = kept
            if kept or ss.get("scope"):
                kept_scopes.append(ss)
        if kept_scopes or rs.get("resource"):
            scope_spans[:] = kept_scopes
            kept_resources.append(rs)
    # empty containers are dropped before parsing: each cost json_format ~8 us (and an SDK Resource
    # or scope), 3 bytes of "{}," each; one with a resource or a scope is parsed (a wrong type there
    # fails the request) but builds nothing without spans
    resource_spans[:] = kept_resources
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, request, ignore_unknown_fields=True, max_recursion_depth=_JSON_FORMAT_DEPTH)
    except (json_format.ParseError, ValueError, TypeError, binascii.Error, RecursionError) as exc:
        if not _drop_unparsable_spans(doc, batch):  # the request's own structure: nothing to keep
            raise MalformedPayload(f"invalid OTLP/JSON ExportTraceServiceRequest: {_cut(str(exc), 300)}") from None
        request = ExportTraceServiceRequest()
        try:
            json_format.ParseDict(doc, request, ignore_unknown_fields=True, max_recursion_depth=_JSON_FORMAT_DEPTH)
        except (json_format.ParseError, ValueError, TypeError, binascii.Error, RecursionError) as again:
            raise MalformedPayload(
                f"invalid OTLP/JSON ExportTraceServiceRequest: {_cut(str(again), 300)}") from None
    return request


def iter_json(body: bytes, *, json_safe: bool = False, limits: Limits | None = None,
              chunk: int | None = None) -> Iterator[DecodedBatch]:
    """Decode an ``application/json`` (OTLP/JSON encoding) request body, ``chunk`` spans at
    a time (``None``: one batch). A span whose attribute values nest deeper than
    ``limits.max_depth`` AnyValue levels is rejected (counted in the first batch)."""
    first = DecodedBatch()
    request = _prepare_json(body, limits, first)
    parts = _iter_request(request, json_safe, limits, chunk)
    head = next(parts)
    head.rejected += first.rejected
    for reason in first.errors:
        if len(head.errors) < 5 and reason not in head.errors:
            head.errors.append(reason)
    yield head
    yield from parts


def decode_json(body: bytes, *, json_safe: bool = False, limits: Limits | None = None) -> DecodedBatch:
    """Decode an ``application/json`` (OTLP/JSON encoding) request body (see :func:`iter_json`)."""
    batch = DecodedBatch()
    for part in iter_json(body, json_safe=json_safe, limits=limits):
        batch.merge(part)
    return batch


def decode_request(body: bytes, content_type: str, *, json_safe: bool = False,
                   limits: Limits | None = None) -> DecodedBatch:
    """Decode ``body`` according to ``content_type`` (``protobuf`` or ``json``)."""
    if content_type == "protobuf":
        return decode_protobuf(body, json_safe=json_safe, limits=limits)
    if content_type == "json":
        return decode_json(body, json_safe=json_safe, limits=limits)
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
