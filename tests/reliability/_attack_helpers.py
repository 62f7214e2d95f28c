"""Helpers of the attack tests that send attribute values to a real ``IngestServer`` and read what it stored.

Sessions 38 and 41 (``tests/ingest/test_attack38_bytes_values.py``, ``test_attack41_utf16_bytes.py``) each built
the OTLP/JSON body, sent the same values through the OpenTelemetry SDK's protobuf exporter and read the stored
``meta`` by hand; the column tests (``test_attack35_column_secrets.py``, ``test_attack37_key_value_lists.py``)
searched every row of the SQLite file the same way. One copy here.
"""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROTOCOLS = ("json", "protobuf", "grpc")
"""The ways an ingest client sends spans: OTLP/JSON and OTLP/protobuf over HTTP, OTLP over gRPC."""


def any_value(value: Any) -> dict[str, Any]:
    """OTLP/JSON's ``AnyValue`` of a Python attribute value: bytes as ``bytesValue`` (base64), a tuple or list as
    ``arrayValue``, a dict as ``kvlistValue``, text as ``stringValue``, a bool, int or float as their kind."""
    if isinstance(value, (bytes, bytearray)):
        return {"bytesValue": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (tuple, list)):
        return {"arrayValue": {"values": [any_value(item) for item in value]}}
    if isinstance(value, Mapping):
        return {"kvlistValue": {"values": [{"key": k, "value": any_value(v)} for k, v in value.items()]}}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": value}


def otlp_span(attributes: Mapping[str, Any], *, name: str = "span", trace_id: str | None = None,
              span_id: str | None = None, parent: str | None = None) -> dict[str, Any]:
    """One OTLP/JSON span (fresh ids unless given) with ``attributes`` as Python values (see :func:`any_value`)."""
    return {"traceId": trace_id or secrets.token_hex(16), "spanId": span_id or secrets.token_hex(8),
            **({"parentSpanId": parent} if parent else {}), "name": name, "kind": 1,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
            "attributes": [{"key": k, "value": any_value(v)} for k, v in attributes.items()]}


def otlp_doc(spans: Sequence[dict[str, Any]], scope: str = "client") -> dict[str, Any]:
    """An OTLP/JSON export request holding ``spans`` under one scope."""
    return {"resourceSpans": [{"scopeSpans": [{"scope": {"name": scope}, "spans": list(spans)}]}]}


CONTENT = ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.tool.call.arguments", "gen_ai.tool.call.result")
"""The attributes that hold message content (recorded only with content capture on)."""


class LoginRejected(Exception):
    """What the tool of a tool-surface attack test raises, its message holding the values under test."""


def assert_no_content(sink: Any, phrase: str) -> None:
    """Content capture off: no span of ``sink`` (``test_secrets.Sink``) holds a content attribute, and no text it
    recorded holds ``phrase`` (said only in the chat's messages and the tool's arguments)."""
    recorded = {key for span in sink.memory.get_finished_spans() for key in (span.attributes or {})}
    assert not recorded & set(CONTENT)
    assert not [where for where, text in sink.texts() if phrase in text]


def send_attributes(srv: Any, attributes: Mapping[str, Any], protocol: str) -> None:
    """Send one span with ``attributes`` (Python values) to the in-process ``IngestServer`` ``srv`` as an ingest
    client would: a hand-built OTLP/JSON body (``json``), or the OpenTelemetry SDK's span through its OTLP/HTTP
    protobuf exporter (``protobuf``) or its gRPC exporter (``grpc``: the server needs a gRPC port). The JSON body
    encodes text as JSON does; the SDK's exporters encode bytes as ``bytesValue``."""
    if protocol == "json":
        from tests.ingest.conftest import post_json

        status, answer = post_json(srv, otlp_doc([otlp_span(attributes)]))
        assert status == 200 and "partialSuccess" not in answer, answer
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.get_tracer("client").start_span("span", attributes=dict(attributes)).end()
    provider.shutdown()
    exporter: Any = HttpExporter(endpoint=srv.endpoint) if protocol == "protobuf" else \
        GrpcExporter(endpoint=f"127.0.0.1:{srv.grpc_port}", insecure=True)
    try:
        assert exporter.export(memory.get_finished_spans()).name == "SUCCESS"
    finally:
        exporter.shutdown()


def ingested(tmp_path: Path, attributes: Mapping[str, Any], protocol: str) -> tuple[Path, dict[str, Any]]:
    """Send one span with ``attributes`` (see :func:`send_attributes`) to a real ``IngestServer`` writing the SQLite
    file ``tmp_path / "ingest.db"`` (a gRPC port only for ``grpc``): (that file, the attributes it stored)."""
    from cmbagent_otel.ingest import IngestServer

    db = tmp_path / "ingest.db"
    with IngestServer(f"sqlite:///{db}", host="127.0.0.1", port=0, grpc_port=0 if protocol == "grpc" else "off") \
            as srv:
        send_attributes(srv, attributes, protocol)
    return db, stored_attributes(db)


def stored_attributes(db: Path) -> dict[str, Any]:
    """The attributes of the one span an ingest stored in the SQLite file ``db`` (its ``execution_events`` row)."""
    conn = sqlite3.connect(db)
    try:
        (meta,) = [row[0] for row in conn.execute("SELECT meta FROM execution_events")]
    finally:
        conn.close()
    return dict(json.loads(meta)["attributes"])


def rows_holding(path: Path, needle: str) -> list[str]:
    """``table.column`` of every value in the SQLite file ``path`` whose text holds ``needle`` (one per row)."""
    conn = sqlite3.connect(path)
    try:
        found = []
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            for row in conn.execute(f"SELECT * FROM {table}"):
                found += [f"{table}.{c}" for c, v in zip(columns, row, strict=True) if v and needle in str(v)]
        return found
    finally:
        conn.close()


def chat_with_a_tool_note(sink: Any, work_dir: Path, *, capture: bool, fails: bool, note: str,
                          values: Sequence[str], then: Sequence[Any] = (), order: Sequence[str] | None = None) -> None:
    """A real AG2 group chat (``conftest.group_chat``) instrumented into ``sink`` (``test_secrets.Sink``): the
    engineer's scripted model calls the tool with ``note`` and then says each of ``then``; the tool returns
    ``values`` or (``fails``) raises :class:`LoginRejected` quoting them."""
    import cmbagent_otel

    from .conftest import group_chat

    quoted = ", ".join(values)
    script = [{"tool_calls": [{"id": "call_attack", "name": "peak_position", "arguments": {
        "multipole": 2, "note": note}}]}, *then]

    def tool(multipole: int, note: str = "") -> str:
        if fails:
            raise LoginRejected(f"login refused for {quoted}")
        return f"rejected {quoted}"

    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture, instrument_cmbagent=False)
    group_chat(work_dir, engineer_script=script, tool=tool,
               order=order or ["engineer", "executor", "engineer", "executor", "researcher"])


def assert_replaced_and_learned(template: str) -> None:
    """``template`` with a fresh value of a password's shape for ``{v}``: ``safe_text`` replaces the value, and a
    later text quoting it alone is redacted (it was learned). Run under ``isolated_secrets``."""
    from cmbagent_otel import redaction
    from tests.conftest import unlearned_word

    value = unlearned_word("Sx") + "4"
    out = redaction.safe_text(template.format(v=value)) or ""
    assert value not in out and "[REDACTED]" in out
    assert redaction.safe_text(f"later {value} again") == "later [REDACTED] again"


def assert_kept(text: str) -> None:
    """``safe_text`` keeps ``text`` as written and learns nothing from it. Run under ``isolated_secrets``."""
    from cmbagent_otel import redaction

    assert redaction.safe_text(text) == text
    assert not redaction._learned
