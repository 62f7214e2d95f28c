"""An ingest client's attribute values sent as bytes (leftover of the 37th attack campaign).

OTLP's ``bytesValue`` decodes to base64 text (so it fits a JSON column), and the redaction read that
text as it was: a key in the bytes (one a pattern knows, ``password=...`` text, a secret learned from
the same span's ``api_key``) was stored base64-encoded, readable by anyone who decodes it. Now bytes
that are UTF-8 text are redacted as that text, and a secret-named key's bytes are learned as their text;
bytes that are no text are kept as their base64.

Session 40: the redacted text was stored as its base64 (a reader saw ``[REDACTED]`` only once they decoded
it), and a column attribute (a workflow's name, an agent) sent as bytes went into its column as base64. Bytes
that are text (UTF-8, no control characters but tab and line ends) are now stored as that text, redacted.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, text

from cmbagent_otel.ingest import IngestServer
from tests.reliability.test_attack35_column_secrets import _rows_holding

from .conftest import post_json

BINARY = b"\x00\xff\xfe a picture, no text"


def _values(key: str, learned: str) -> dict[str, Any]:
    """Attributes (Python values) holding secrets in bytes, and the secrets."""
    return {
        "api_key": learned.encode(),  # learned from this span: redacted elsewhere in it
        "custom.learned": f"echo {learned}".encode(),
        "custom.note": f"here {key}".encode(),  # a key the patterns know
        "custom.config": f"password={learned[::-1]}".encode(),  # key/value text
        "custom.list": (f"x {key}".encode(),),  # OTel attribute arrays hold one type: bytes here
        "custom.binary": BINARY,
        "custom.plain": b"the spectrum peaks at l=220",
    }


def _any_value(value: Any) -> dict[str, Any]:
    if isinstance(value, tuple):
        return {"arrayValue": {"values": [_any_value(v) for v in value]}}
    return {"bytesValue": base64.b64encode(value).decode()}


def _stored_attributes(db: Path) -> dict[str, Any]:
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            (meta,) = conn.execute(text("SELECT meta FROM execution_events")).scalars().all()
    finally:
        engine.dispose()
    return json.loads(meta)["attributes"]


@pytest.mark.parametrize("protocol", ["json", "protobuf"])
def test_secrets_in_bytes_values_of_an_ingest_client_are_redacted(tmp_path: Path, protocol: str) -> None:
    key, learned = "sk-proj-" + secrets.token_hex(24), secrets.token_hex(12)
    values = _values(key, learned)
    db = tmp_path / "ingest.db"
    with IngestServer(f"sqlite:///{db}", host="127.0.0.1", port=0, grpc_port="off") as srv:
        if protocol == "json":
            doc = {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "client"}, "spans": [{
                "traceId": secrets.token_hex(16), "spanId": secrets.token_hex(8), "name": "span", "kind": 1,
                "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
                "attributes": [{"key": k, "value": _any_value(v)} for k, v in values.items()]}]}]}]}
            status, answer = post_json(srv, doc)
            assert status == 200 and "partialSuccess" not in answer, answer
        else:  # the OTLP exporter encodes a bytes attribute as bytesValue
            memory = InMemorySpanExporter()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(memory))
            provider.get_tracer("client").start_span("span", attributes=values).end()
            provider.shutdown()
            exporter = HttpExporter(endpoint=srv.endpoint)
            assert exporter.export(memory.get_finished_spans()).name == "SUCCESS"
            exporter.shutdown()
    attributes = _stored_attributes(db)
    # before: each stored as the base64 of the bytes sent, the secret in it (then as the base64 of the
    # redacted text); text bytes are stored as their text
    assert {k: v for k, v in attributes.items() if k != "custom.binary"} == {
        "api_key": "[REDACTED]", "custom.learned": "echo [REDACTED]", "custom.note": "here [REDACTED]",
        "custom.config": "password=[REDACTED]", "custom.plain": "the spectrum peaks at l=220",
        "custom.list": ["x [REDACTED]"]}
    assert base64.b64decode(attributes["custom.binary"]) == BINARY  # no text: kept as sent
    secret_bytes = [v for k, v in values.items() if k not in ("custom.binary", "custom.plain", "custom.list")]
    sent = [base64.b64encode(v).decode() for v in [*secret_bytes, *values["custom.list"]]]
    for needle in (key, learned, learned[::-1], *sent):  # nor as the base64 of the bytes sent
        assert _rows_holding(db, needle) == []


def test_text_sent_as_bytes_is_stored_as_text_in_row_columns(tmp_path: Path) -> None:
    """A workflow's name and an agent sent as bytes fill their columns with their text, redacted; bytes that
    are no text (a control character) stay base64. Fails on 86547de: the columns held the base64 of the name
    (``workflow_runs.agent`` ``cGxhbm5lcm...``), and the redacted value was stored as base64 too."""
    key = "sk-proj-" + secrets.token_hex(24)
    trace_id, root = secrets.token_hex(16), secrets.token_hex(8)
    sent = {"cmbagent.workflow.name": b"cmb pipeline carry40", "cmbagent.workflow.agent": b"planner-carry40",
            "gen_ai.agent.name": b"engineer-carry40", "cmbagent.workflow.task": f"fit with {key}".encode(),
            "cmbagent.workflow.model": b"gpt\x01carry40"}

    def span(span_id: str, kind: str, parent: str | None) -> dict[str, Any]:
        attributes = [{"key": k, "value": _any_value(v)} for k, v in sent.items()]
        attributes.append({"key": "cmbagent.span.kind", "value": {"stringValue": kind}})
        return {"traceId": trace_id, "spanId": span_id, **({"parentSpanId": parent} if parent else {}),
                "name": kind, "kind": 1, "startTimeUnixNano": "1700000000000000000",
                "endTimeUnixNano": "1700000001000000000", "attributes": attributes}

    doc = {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "cmbagent_otel"}, "spans": [
        span(root, "workflow", None), span(secrets.token_hex(8), "agent", root)]}]}]}
    db = tmp_path / "ingest.db"
    with IngestServer(f"sqlite:///{db}", host="127.0.0.1", port=0, grpc_port="off") as srv:
        status, answer = post_json(srv, doc)
        assert status == 200 and "partialSuccess" not in answer, answer
    assert "workflow_runs.agent" in _rows_holding(db, "planner-carry40")
    assert "execution_events.agent_name" in _rows_holding(db, "engineer-carry40")
    assert "workflow_runs.meta" in _rows_holding(db, "cmb pipeline carry40")  # (no column of its own)
    assert "workflow_runs.task_description" in _rows_holding(db, "fit with [REDACTED]")
    for needle in (key, *(base64.b64encode(v).decode() for k, v in sent.items() if k != "cmbagent.workflow.model")):
        assert _rows_holding(db, needle) == [], needle
    assert _rows_holding(db, base64.b64encode(sent["cmbagent.workflow.model"]).decode())  # no text: as sent
