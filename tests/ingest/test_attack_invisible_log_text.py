"""Eighteenth campaign (attacks): invisible characters in what the ingest answers and logs.

A span the ingest rejects has its reason (a parser's message quoting the client's value) sent back
to the client and logged at INFO. Control and bidirectional characters in it were escaped (sixth
campaign), invisible ones were not: zero-width characters, a BOM, a soft hyphen, a Hangul filler
and Unicode tags (U+E0000-E007F, which spell ASCII invisibly) reached the log and its reader as
text nobody sees. They are escaped now, as the CLI escapes them.
"""

from __future__ import annotations

import http.client
import json
import logging
from pathlib import Path

import pytest

from cmbagent_otel.ingest import IngestServer

INVISIBLE = "\u200b\u200d\u2060\ufeff\u00ad\u3164\U000e0041\U000e0042"


def test_a_rejected_value_shows_its_invisible_characters_escaped(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    span = {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "f" * 16, "name": "hider",
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
            "attributes": [{"key": "x", "value": {"doubleValue": f"1 seen{INVISIBLE}unseen"}}]}
    body = json.dumps({"resourceSpans": [{"resource": {}, "scopeSpans": [{"scope": {}, "spans": [span]}]}]},
                      ensure_ascii=False)
    with IngestServer(f"sqlite:///{tmp_path}/ingest.db", host="127.0.0.1", port=0, grpc_port=None) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("POST", "/v1/traces", body=body.encode(), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            status, answer = response.status, json.loads(response.read().decode())
        finally:
            conn.close()
    assert status == 200 and answer["partialSuccess"]["rejectedSpans"] == "1"
    logged = "\n".join(r.getMessage() for r in caplog.records if "rejected" in r.getMessage())
    assert "seen" in logged and "unseen" in logged
    shown = [hex(ord(c)) for c in INVISIBLE if c in logged or c in answer["partialSuccess"]["errorMessage"]]
    assert not shown, shown
