"""Session 40 (carried over): a quoted name in prose taken for a secret-named key.

The ingest logs a span it rejects as ``span 'int password': Failed to parse ...`` (the span's name quoted,
then the decoder's message). The key/value scan read ``password'`` + ``: `` as a secret-named key and learned
the message's first word, "Failed", as a secret; the process then redacted it in every later text, inside
longer words too (which twice made CI red: a later test's "FailedX" came out as ``[REDACTED]X``). The same
for any quoted name after a word: ``attribute "api_key": not a string``. A quoted key is data's key where its
opening quote starts a line or follows ``{ [ ( , ; : =`` (a dict, JSON, YAML, a call's arguments); after a
word it is a label, whose message (more words on its line) is redacted where it stands and not learned (a
value alone on its line after it is learned). Keys stay keys: the second half
of the file pins the other direction.
"""

from __future__ import annotations

import http.client
import json
import logging
import secrets

import pytest

from cmbagent_otel import redaction
from cmbagent_otel.ingest import IngestServer
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _word() -> str:
    return unlearned_word("Zq")


@pytest.mark.parametrize("template", [
    "span 'int password': {w} to parse value field",
    "span 'password': {w} to parse value field",
    "span 'get_token': {w} to parse",
    'attribute "api_key": {w} is not a string',
    "rejected span 'db.secret'={w} while decoding",
    'span \\"auth token\\": {w} to parse',  # the same inside escaped JSON
])
def test_a_quoted_label_in_prose_teaches_no_secret(template: str) -> None:
    """Fails on 86547de: the word after the quoted name is redacted in a later text that holds nothing secret."""
    word = _word()
    redaction.safe_text(template.format(w=word))
    later = f"the archive said {word}; retrying"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("template", ["setting 'db_password': {w}", 'loaded "api_key": {w}',
                                      "rejected span 'db.secret'={w}"])
def test_a_value_alone_after_a_quoted_label_is_learned(template: str) -> None:
    """A label's value alone on its line may be the secret itself (found by x-attack40 on this rule's first form,
    which learned no value after a label: the value was redacted there and shown in a later text)."""
    word = _word()
    assert word not in (redaction.safe_text(template.format(w=word)) or "")
    assert word not in (redaction.safe_text(f"later: {word}") or "")


def test_the_ingest_log_of_a_rejected_span_teaches_no_secret(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """The real case: a span rejected by the ingest's decoder, its log line read by the redacting log filter.
    Fails on 86547de: "Failed" learned, ``FailedCarry40`` later shown as ``[REDACTED]Carry40``."""
    caplog.set_level(logging.DEBUG)
    span = {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "a" * 16, "name": "int password",
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
            "attributes": [{"key": "db.password", "value": {"intValue": "QZXW" + secrets.token_hex(8)}}]}
    body = json.dumps({"resourceSpans": [{"resource": {}, "scopeSpans": [{"scope": {}, "spans": [span]}]}]})
    with IngestServer(f"sqlite:///{tmp_path / 'ingest.db'}", host="127.0.0.1", port=0, grpc_port=None) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("POST", "/v1/traces", body=body.encode(), headers={"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read())
        finally:
            conn.close()
    assert answer["partialSuccess"]["rejectedSpans"] == "1"
    assert "span 'int password': " in "\n".join(r.getMessage() for r in caplog.records)
    later = "FailedCarry40 to reach the archive"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("template", [
    "password: {w}",
    "the password: {w}",
    "api_key='{w}'",
    "OPENAI_API_KEY={w}",
    "Authorization: Bearer {w}",
    '{{"token": "{w}"}}',
    '{{\\"token\\": \\"{w}\\"}}',
    "{{'db password': '{w}'}}",
    "{{'user': 'ann', 'password': {w}}}",
    "  'db password': {w}",
    "headers: 'X-Api-Key': {w}",
    "config=('secret', 1), 'secret'={w}",
])
def test_keys_of_data_stay_keys(template: str) -> None:
    """What must not change: a key of data (bare, or quoted where data's keys stand) hides its value there and
    the value is learned (redacted in a later text)."""
    word = _word()
    out = redaction.safe_text(template.format(w=word)) or ""
    assert word not in out and redaction.REDACTED in out
    assert word not in (redaction.safe_text(f"elsewhere {word}") or "")


def test_a_quoted_labels_value_is_still_redacted_where_it_stands() -> None:
    word = _word()
    out = redaction.safe_text(f"span 'db password': {word} to parse") or ""
    assert word not in out and redaction.REDACTED in out
