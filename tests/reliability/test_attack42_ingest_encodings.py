"""Session 42 (40th attack campaign): an ingest client's bytes holding text that is not UTF-8, nor UTF-16 with a
byte order mark.

Session 41 read bytes as UTF-8 text, or as UTF-16 when a byte order mark starts them. UTF-16 without one (.NET's
``Encoding.Unicode.GetBytes``, Java's ``UTF_16LE``, Windows' ``WideCharToMultiByte`` callers), UTF-32 (with a mark:
read as UTF-16, a NUL between every letter) and Latin-1 (a Windows or ISO-8859-1 program's text with a letter past
ASCII) were stored as the base64 of the bytes sent: a key or ``password=...`` in them readable by anyone decoding it,
and an ``api_key`` sent so was learned as bytes, so ``echo <it>`` in UTF-8 was shown. UTF-16 of ASCII letters is even
valid UTF-8 (with NULs): stored as sent. Now such bytes are redacted and learned as their text, stored as the base64
of the redacted text in the encoding sent (as sent when nothing is secret); binary data stays as sent. Through
OTLP/JSON, OTLP/protobuf over HTTP and gRPC, a real ``IngestServer`` and SQLite.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest

from ._attack_helpers import PROTOCOLS, ingested, rows_holding

pytestmark = pytest.mark.usefixtures("isolated_secrets")

BINARY = b"\x00\xff\xfe\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
ENCODED = {  # attribute -> the encoding its text is sent in (none with a byte order mark but utf-32)
    "custom.utf16le": "utf-16-le", "custom.utf16be": "utf-16-be", "custom.utf32": "utf-32",
    "custom.utf32le": "utf-32-le", "custom.latin1": "latin-1",
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_text_in_other_encodings_sent_as_bytes_is_redacted(tmp_path: Path, protocol: str) -> None:
    """Fails on 4a0d79e in all three protocols: each text stored as the bytes sent (the password and the key in
    their base64), and ``echo <learned>`` shown (the UTF-16 ``api_key`` learned as bytes)."""
    key, learned = "sk-proj-" + secrets.token_hex(24), secrets.token_hex(12)
    passwords = {name: f"Pq{secrets.token_hex(6)}" for name in ENCODED}
    texts = {name: f"se\u00f1or password={passwords[name]} for {name}" for name in ENCODED}
    texts["custom.utf16be"] = f"here {key} please"
    values: dict[str, object] = {name: texts[name].encode(ENCODED[name]) for name in ENCODED}
    values |= {
        "api_key": learned.encode("utf-16-le"),
        "custom.echo": f"echo {learned}".encode(),
        "custom.plain16": "the spectrum peaks at l=220".encode("utf-16-le"),
        "custom.plain1": "Fourier coefficients, se\u00f1al".encode("latin-1"),
        "custom.binary": BINARY,
    }
    db, attributes = ingested(tmp_path, values, protocol)
    assert attributes["api_key"] == "[REDACTED]" and attributes["custom.echo"] == "echo [REDACTED]"
    for name, encoding in ENCODED.items():
        stored = base64.b64decode(attributes[name]).decode(encoding)
        assert stored == texts[name].replace(passwords[name], "[REDACTED]").replace(key, "[REDACTED]"), name
    for name in ("custom.plain16", "custom.plain1", "custom.binary"):  # nothing secret, or no text: as sent
        assert base64.b64decode(attributes[name]) == values[name], name
    sent = [base64.b64encode(values[name]).decode() for name in (*ENCODED, "api_key")]  # type: ignore[arg-type]
    for needle in (key, learned, *passwords.values(), *sent):
        assert rows_holding(db, needle) == [], needle
