"""A span ``cmbagent-otel ingest`` rejects does not carry its secrets into the answer or the log.

A secret-named attribute of the wrong type (``{"key": "db.password", "value": {"intValue":
"<secret>"}}``) made ``json_format`` refuse the span with a message quoting the value, and that
message went back to the client as the partial success's ``errorMessage`` and into the server's
log (INFO) verbatim (found by the sixth campaign; stored spans were already scrubbed). So did
control characters in such a value: a newline forged log lines, ESC sequences reached the
terminal of whoever reads the log.
"""

from __future__ import annotations

import http.client
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from cmbagent_otel.ingest import IngestServer


def _span(span_id: str, name: str, attributes: list[dict[str, Any]], events: list[dict[str, Any]] | None = None
          ) -> dict[str, Any]:
    return {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": span_id, "name": name,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
            "attributes": attributes, "events": events or []}


def test_rejected_spans_secrets_reach_neither_the_answer_nor_the_log(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    marks = [f"QZXW{secrets.token_hex(10)}" for _ in range(4)]
    spans = [
        _span("a" * 16, "int password", [{"key": "db.password", "value": {"intValue": marks[0]}}]),
        _span("b" * 16, "double token", [{"key": "auth_token", "value": {"doubleValue": marks[1]}}]),
        _span("c" * 16, "event key", [], [{"timeUnixNano": "1700000000500000000", "name": "exception",
                                           "attributes": [{"key": "api_key", "value": {"intValue": marks[2]}}]}]),
        _span("d" * 16, "nested secret", [{"key": "request", "value": {"kvlistValue": {"values": [
            {"key": "password", "value": {"intValue": marks[3]}}]}}}]),
        _span("f" * 16, "forger", [{"key": "x", "value": {"doubleValue": "1\n[CRITICAL] forged\x1b]0;PWNED\x07"}}]),
        _span("e" * 16, "good span", [{"key": "http.method", "value": {"stringValue": "GET"}}]),
    ]
    body = json.dumps({"resourceSpans": [{"resource": {}, "scopeSpans": [{"scope": {}, "spans": spans}]}]})
    db = tmp_path / "ingest.db"
    with IngestServer(f"sqlite:///{db}", host="127.0.0.1", port=0, grpc_port=None) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("POST", "/v1/traces", body=body.encode(), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            status, answer = response.status, response.read().decode()
        finally:
            conn.close()
    assert status == 200
    assert json.loads(answer)["partialSuccess"]["rejectedSpans"] == "5"
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as c:
        names = [r[0] for r in c.execute(text("SELECT meta FROM execution_events"))]
    engine.dispose()
    assert len(names) == 1 and "good span" in names[0]  # its batch-mate is stored
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "rejected 5 span(s)" in logged
    leaks = [m for m in marks if m in answer or m in logged]
    assert not leaks, leaks
    assert "forged" in logged and "\n[CRITICAL]" not in logged and "\x1b" not in logged and "\x07" not in logged
