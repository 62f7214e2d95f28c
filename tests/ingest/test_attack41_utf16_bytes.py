"""Session 41 (39th attack campaign): an ingest client's bytes attribute holding UTF-16 text.

Session 40 stores bytes that are UTF-8 text as that text, redacted, and other bytes as their base64, where only the
encoded forms of registered secrets (of their UTF-8 bytes) were looked for. Text in UTF-16 with a byte order mark
(what Windows tools and .NET write) is no UTF-8: a key or ``password=...`` in it was stored as the base64 of the
bytes sent, readable by anyone who decodes it, and a secret-named key's UTF-16 bytes were learned as those bytes,
not as their text. Such bytes are now redacted as their text (stored as the base64 of the redacted text, in
UTF-16) and learned as their text; UTF-16 bytes that hold nothing secret are kept as sent.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest

from tests.reliability._attack_helpers import ingested, rows_holding


@pytest.mark.parametrize("protocol", ["json", "protobuf"])
def test_utf16_text_sent_as_bytes_is_redacted(tmp_path: Path, protocol: str) -> None:
    """Fails on 3c387d5 in both protocols: the UTF-16 bytes stored as sent (the key and the password in their
    base64), and ``echo <learned>`` shown (the api_key's bytes learned as bytes, not as their text)."""
    key, learned, password = "sk-proj-" + secrets.token_hex(24), secrets.token_hex(12), secrets.token_hex(10)
    values = {
        "api_key": learned.encode("utf-16"),
        "custom.echo": f"echo {learned}".encode(),
        "custom.note": f"here {key}".encode("utf-16"),
        "custom.config": f"password={password}".encode("utf-16"),
        "custom.plain": "the spectrum peaks at l=220".encode("utf-16"),
    }
    db, attributes = ingested(tmp_path, values, protocol)
    assert attributes["api_key"] == "[REDACTED]" and attributes["custom.echo"] == "echo [REDACTED]"
    assert base64.b64decode(attributes["custom.note"]).decode("utf-16") == "here [REDACTED]"
    assert base64.b64decode(attributes["custom.config"]).decode("utf-16") == "password=[REDACTED]"
    assert base64.b64decode(attributes["custom.plain"]) == values["custom.plain"]  # nothing secret: as sent
    sent = [base64.b64encode(values[k]).decode() for k in ("api_key", "custom.note", "custom.config")]
    for needle in (key, learned, password, *sent):
        assert rows_holding(db, needle) == []
