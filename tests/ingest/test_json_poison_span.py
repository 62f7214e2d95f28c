"""One bad span in an OTLP/JSON request costs that span at most, never its batch-mates.

``json_format`` parses a request whole, so one span it refuses failed the request: 400 and
every span of the batch lost (an exporter does not retry a 400). Two real shapes:

* a lone surrogate, written by ``JSON.stringify`` as a ``\\udXXX`` escape: JavaScript strings
  hold them, e.g. a span name or attribute cut in the middle of an emoji by a length limit
  counting UTF-16 units. Now replaced by U+FFFD and the span stored;
* a value ``json_format`` cannot take (an ``intValue`` past 64 bits, a string where a number
  belongs): now that span alone is rejected (partial success, ``rejectedSpans``) and the
  others are stored, as the protobuf path always did.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from sqlalchemy import create_engine, text

from cmbagent_otel.dag.statements import decode_json
from cmbagent_otel.ingest import IngestServer

from .conftest import post_json


def _span(name: str, attributes: list[dict[str, Any]] | None = None) -> tuple[str, dict[str, Any]]:
    span_id = secrets.token_hex(8)
    return span_id, {
        "traceId": secrets.token_hex(16), "spanId": span_id, "name": name, "kind": 1,
        "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
        "attributes": attributes or [{"key": "k", "value": {"stringValue": "v"}}]}


def _stored(url: str) -> dict[str, str]:
    """span id -> the stored event row's meta, as JSON text."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT meta FROM execution_events")).all()
    finally:
        engine.dispose()
    return {meta["span_id"]: json.dumps(meta) for meta in (decode_json(r[0]) for r in rows)}


def test_one_poison_span_does_not_cost_its_batch_mates(db_url: str) -> None:
    good_id, good = _span("good")
    cut_id, cut = _span("cut emoji \ud83d", [{"key": "label \udc00", "value": {"stringValue": "x \ud83d"}}])
    big_id, big = _span("too big", [{"key": "n", "value": {"intValue": str(2**70)}}])
    wrong_id, wrong = _span("wrong type", [{"key": "n", "value": {"doubleValue": {"not": "a number"}}}])
    doc = {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [
        {"scope": {"name": "js"}, "spans": [good, cut, big, wrong]}]}]}
    with IngestServer(db_url, host="127.0.0.1", port=0, grpc_port="off") as srv:
        status, answer = post_json(srv, doc)
    assert status == 200, answer
    assert answer["partialSuccess"]["rejectedSpans"] == "2"
    assert "too big" in answer["partialSuccess"]["errorMessage"]
    stored = _stored(db_url)
    assert good_id in stored and cut_id in stored
    assert "\\ufffd" in stored[cut_id] and "\\ud83d" not in stored[cut_id]
    assert big_id not in stored and wrong_id not in stored


def test_a_lone_surrogate_deep_in_a_request_is_replaced_without_recursion(db_url: str) -> None:
    # json.loads takes nesting ~990 deep; a recursive walk for the surrogates ran out of
    # Python's recursion limit at ~500 and the RecursionError left the decoder unhandled
    nested: Any = "deep \ud83d"
    for _ in range(900):
        nested = {"a": nested}
    span_id, span = _span("nested \ud83d")
    span["unknownField"] = nested  # OTLP/JSON receivers ignore unknown fields
    doc = {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [
        {"scope": {"name": "js"}, "spans": [span]}]}]}
    with IngestServer(db_url, host="127.0.0.1", port=0, grpc_port="off") as srv:
        status, answer = post_json(srv, doc)
    assert status == 200, answer
    assert "\\ufffd" in _stored(db_url)[span_id]
