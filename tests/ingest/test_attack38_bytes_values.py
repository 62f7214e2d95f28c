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
import secrets
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel.ingest import IngestServer
from tests.reliability._attack_helpers import ingested, otlp_doc, otlp_span, rows_holding

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


@pytest.mark.parametrize("protocol", ["json", "protobuf"])
def test_secrets_in_bytes_values_of_an_ingest_client_are_redacted(tmp_path: Path, protocol: str) -> None:
    key, learned = "sk-proj-" + secrets.token_hex(24), secrets.token_hex(12)
    values = _values(key, learned)
    db, attributes = ingested(tmp_path, values, protocol)  # (the OTLP exporter encodes a bytes attribute as bytesValue)
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
        assert rows_holding(db, needle) == []


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
        return otlp_span({**sent, "cmbagent.span.kind": kind}, name=kind, trace_id=trace_id, span_id=span_id,
                         parent=parent)

    doc = otlp_doc([span(root, "workflow", None), span(secrets.token_hex(8), "agent", root)], "cmbagent_otel")
    db = tmp_path / "ingest.db"
    with IngestServer(f"sqlite:///{db}", host="127.0.0.1", port=0, grpc_port="off") as srv:
        status, answer = post_json(srv, doc)
        assert status == 200 and "partialSuccess" not in answer, answer
    assert "workflow_runs.agent" in rows_holding(db, "planner-carry40")
    assert "execution_events.agent_name" in rows_holding(db, "engineer-carry40")
    assert "workflow_runs.meta" in rows_holding(db, "cmb pipeline carry40")  # (no column of its own)
    assert "workflow_runs.task_description" in rows_holding(db, "fit with [REDACTED]")
    for needle in (key, *(base64.b64encode(v).decode() for k, v in sent.items() if k != "cmbagent.workflow.model")):
        assert rows_holding(db, needle) == [], needle
    assert rows_holding(db, base64.b64encode(sent["cmbagent.workflow.model"]).decode())  # no text: as sent
