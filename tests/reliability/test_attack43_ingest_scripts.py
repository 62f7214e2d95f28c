"""Session 43 (41st attack campaign): an ingest client's UTF-16 bytes, without a byte order mark, of text in another
script than Latin (Cyrillic, Greek, CJK).

Session 42 read UTF-16 without a mark by its NULs: the high byte of ASCII and Latin-1 letters, in every other byte
for at least half the text. Cyrillic (high byte 04), Greek (03) or CJK (4E-9F) text with a key, ``password=...`` or
a few ASCII words in it has fewer: stored as the base64 of the bytes sent, the secret readable by anyone decoding
it. Now bytes whose NULs fall on one side of the pairs are read as UTF-16 when the text is one script's (with ASCII,
Latin letters and shared punctuation), and redacted as text; stored as the base64 of the redacted text in the
encoding sent (as sent when nothing is secret). Latin-1 text and binary data are read as before. Through OTLP/JSON,
OTLP/protobuf over HTTP and gRPC, a real ``IngestServer`` and SQLite.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path

import pytest

from ._attack_helpers import PROTOCOLS, ingested, rows_holding

pytestmark = pytest.mark.usefixtures("isolated_secrets")

TEXTS = {  # attribute -> (text holding {v}, the encoding it is sent in: no byte order mark)
    "custom.cyrillic": ("ваш новый пароль для входа в систему: password={v}", "utf-16-le"),
    "custom.greek": ("\u03bf \u03ba\u03c9\u03b4\u03b9\u03ba\u03cc\u03c2 \u03c3\u03b1\u03c2"
                     " \u03b5\u03af\u03bd\u03b1\u03b9 password={v}", "utf-16-be"),  # escaped: ruff's look-alikes
    "custom.cjk": ("请勿外传。请使用以下密码登录数据库服务器\uff1apassword={v}", "utf-16-le"),
    "custom.japanese": ("データベースのパスワードは password={v} です", "utf-16-be"),
    # (not "la contraseña: password=<v>": since the 46th campaign that reads as contraseña's value, all redacted)
    "custom.latin1": ("se\u00f1ora, el servidor: password={v}", "latin-1"),
}
PLAIN = {  # nothing secret, or no text: stored as sent
    "custom.plain_cyrillic": "спектр мощности реликтового излучения".encode("utf-16-le"),
    "custom.plain_cjk": "宇宙微波背景辐射功率谱".encode("utf-16-le"),
    "custom.plain_latin1": "se\u00f1ora".encode("latin-1"),
    "custom.digest": hashlib.sha256(b"cmb").digest(),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_utf16_text_of_other_scripts_sent_as_bytes_is_redacted(tmp_path: Path, protocol: str) -> None:
    """Fails on 5d6278f in all three protocols: the Cyrillic, Greek, CJK and Japanese texts stored as the bytes sent,
    their passwords readable in the base64; the Cyrillic ``api_key`` learned as bytes, ``echo <it>`` shown."""
    passwords = {name: f"Pq{secrets.token_hex(6)}" for name in TEXTS}
    learned = "".join(secrets.choice("абвгдежзиклмнопрстуфхцчшщэюя") for _ in range(12)) + "42"  # a Cyrillic password
    values: dict[str, object] = {name: text.format(v=passwords[name]).encode(encoding)
                                 for name, (text, encoding) in TEXTS.items()}
    values |= PLAIN | {"api_key": learned.encode("utf-16-le"), "custom.echo": f"echo {learned}".encode()}
    db, attributes = ingested(tmp_path, values, protocol)
    assert attributes["api_key"] == "[REDACTED]" and attributes["custom.echo"] == "echo [REDACTED]"
    for name, (text, encoding) in TEXTS.items():
        assert base64.b64decode(attributes[name]).decode(encoding) == text.format(v="[REDACTED]"), name
    for name, raw in PLAIN.items():
        assert base64.b64decode(attributes[name]) == raw, name
    sent = [base64.b64encode(values[name]).decode() for name in (*TEXTS, "api_key")]  # type: ignore[arg-type]
    for needle in (learned, *passwords.values(), *sent):
        assert rows_holding(db, needle) == [], needle
