"""An ingest client's attribute values sent as key/value lists (37th attack campaign).

OTLP's ``kvlistValue`` decodes to a dict. The 35th campaign made the ingest redact the attributes that
fill row columns (``mapping.redact_columns``), but only their text and tuples of text: a column
attribute sent as a key/value list (or an array of them) kept its texts, and the mapping wrote the
dict's text into ``workflow_runs``, ``dag_nodes`` and ``session_states`` columns. And ``scrub`` (the
meta's redaction) redacted a dict's values but kept its keys as sent: any attribute of an ingest
client's span holding a key/value list whose key held a secret put it into ``execution_events.meta``.
Now a column attribute of any other shape is scrubbed as the meta is, and ``scrub`` redacts keys as
text.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel.ingest import IngestServer
from cmbagent_otel.redaction import scrub
from tests.reliability._attack_helpers import otlp_doc, rows_holding
from tests.reliability.test_attack35_column_secrets import COLUMN_KEYS, KEY

from .conftest import post_json


def _text(value: str) -> dict[str, Any]:
    return {"stringValue": value}


def _kvlist(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"kvlistValue": {"values": [{"key": key, "value": value}]}}


SHAPES = {
    "key/value list": lambda label: _kvlist("x", _text(f"{label} {KEY}")),
    "key in a key/value list": lambda label: _kvlist(f"{label} {KEY}", {"intValue": "1"}),
    "array of key/value lists": lambda label: {"arrayValue": {"values": [_kvlist("x", _text(f"{label} {KEY}"))]}},
    "nested key/value list": lambda label: _kvlist("x", _kvlist(f"{label} {KEY}", _text("y"))),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_key_value_list_attributes_of_an_ingest_client_are_redacted(tmp_path: Path, shape: str) -> None:
    make = SHAPES[shape]
    trace_id, root = secrets.token_hex(16), secrets.token_hex(8)
    spans = []
    for index, kind in enumerate(["workflow", "phase", "step", "agent", "conversation", "handoff", None]):
        attributes = [{"key": k, "value": make(k)} for k in [*COLUMN_KEYS, "custom.note"]]
        attributes += [{"key": "cmbagent.dag.node", "value": make(f"n{index}")},
                       {"key": "cmbagent.dag.node_type", "value": _text("agent")}]
        if kind is not None:
            attributes.append({"key": "cmbagent.span.kind", "value": _text(kind)})
        spans.append({
            "traceId": trace_id, "spanId": root if index == 0 else secrets.token_hex(8),
            **({"parentSpanId": root} if index else {}), "name": "span", "kind": 1,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
            "attributes": attributes,
            "events": [{"timeUnixNano": "1700000000500000000", "name": "cmbagent.handoff", "attributes": [
                {"key": "cmbagent.span.kind", "value": _text("speaker_selection")},
                {"key": "cmbagent.handoff.from", "value": make("a")},
                {"key": "cmbagent.handoff.to", "value": make("b")},
                {"key": "custom.note", "value": make("c")}]}]})
    doc = otlp_doc(spans, "cmbagent_otel")
    db = tmp_path / "ingest.db"
    with IngestServer(f"sqlite:///{db}", host="127.0.0.1", port=0, grpc_port="off") as srv:
        status, answer = post_json(srv, doc)
    assert status == 200 and "partialSuccess" not in answer, answer
    # before: 9 to 18 columns held it (workflow_runs.agent/.model/.task_description/.meta, dag_nodes.agent,
    # session_states.current_phase, execution_events.agent_name/.meta, sessions.id ...)
    assert rows_holding(db, KEY[8:24]) == []
    assert rows_holding(db, "[REDACTED]")  # the rows are there


def test_scrub_redacts_keys_and_keeps_ordinary_ones() -> None:
    value = {f"note {KEY}": 1, "plain": {KEY: [f"v {KEY}"]}, "api_key": "hidden"}
    assert scrub(value) == {"note [REDACTED]": 1, "plain": {"[REDACTED]": ["v [REDACTED]"]},
                            "api_key": "[REDACTED]"}
