"""The ingest server's bearer token given as ``--token`` (or ``token=``) is a secret in what it stores.

Found by the twenty-first campaign. ``CMBAGENT_OTEL_INGEST_TOKEN`` is registered with redaction by
its name; a token given on the command line or in code was not: a client whose span quoted it
outside a secret-named attribute (a collector's config dump in a log-like attribute, a span name)
had it stored whole in the rows. The server now registers the token it is given.
"""

from __future__ import annotations

import http.client
import json
import secrets
import sqlite3
from pathlib import Path

import pytest

from cmbagent_otel.ingest import IngestServer

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def test_attack3_a_span_quoting_the_token_stores_none_of_it(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMBAGENT_OTEL_INGEST_TOKEN", raising=False)
    token = f"ingest{secrets.token_hex(12)}"
    span = {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "a" * 16,
            "name": f"deploy with {token}", "startTimeUnixNano": "1700000000000000000",
            "endTimeUnixNano": "1700000001000000000",
            "attributes": [{"key": "note", "value": {"stringValue": f"collector exporter set up with {token} ok"}}]}
    body = json.dumps({"resourceSpans": [{"resource": {}, "scopeSpans": [{"scope": {}, "spans": [span]}]}]})
    db = tmp_path / "ingest.db"
    with IngestServer(f"sqlite:///{db}", host="127.0.0.1", port=0, grpc_port=None, token=token) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("POST", "/v1/traces", body=body.encode(),
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            status = response.status
            response.read()
        finally:
            conn.close()
    assert status == 200
    rows = sqlite3.connect(db)
    try:
        stored = [repr(row) for (table,) in rows.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  for row in rows.execute(f'SELECT * FROM "{table}"')]
    finally:
        rows.close()
    assert any("collector exporter set up with" in row for row in stored)  # the span is stored
    assert not [row for row in stored if token in row]
