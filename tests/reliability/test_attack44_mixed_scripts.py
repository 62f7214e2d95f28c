"""Session 44 (44th attack campaign): an ingest client's UTF-16 bytes, without a byte order mark, of text mixing
scripts (Cyrillic with CJK, Greek with Japanese, Hebrew with Cyrillic).

Session 43 read such bytes as UTF-16 when the text was one script's (``_one_script``); a text mixing two was stored
as the base64 of the bytes sent, a ``password=<v>`` in it readable by anyone decoding it. Now a text of the scripts
``_SCRIPTS`` knows, mixed, is read as UTF-16 when it holds an ASCII word of 3 letters (a key's name): redacted as
text, stored as the base64 of the redacted text in the encoding sent. Random bytes are read so no more often than
before (about 0.3 % of 16-byte values, the ASCII word needs 6 bytes of letters and NULs). Through OTLP/JSON,
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
    "custom.cyrillic_cjk": ("ваш новый пароль от сервера базы данных "
                            "请勿外传请使用以下密码登录数据库服务器: password={v}", "utf-16-le"),
    "custom.greek_japanese": ("\u03bf \u03ba\u03c9\u03b4\u03b9\u03ba\u03cc\u03c2 \u03c3\u03b1\u03c2 \u03b5\u03af"
                              "\u03bd\u03b1\u03b9 データベースのパスワードはこちらです token={v}", "utf-16-be"),
    "custom.hebrew_cyrillic": ("\u05e1\u05d9\u05e1\u05de\u05d4 \u05d7\u05d3\u05e9\u05d4 \u05dc\u05de\u05e2\u05e8\u05db"
                               "\u05ea ваш новый пароль для входа в систему api_key={v}", "utf-16-le"),
}
PLAIN = {  # nothing secret, or no text: stored as sent
    "custom.plain_mixed": "спектр 宇宙微波背景 with lensing".encode("utf-16-le"),
    "custom.digest": hashlib.sha256(b"cmb44").digest(),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_utf16_text_mixing_scripts_sent_as_bytes_is_redacted(tmp_path: Path, protocol: str) -> None:
    """Fails on main in all three protocols: the mixed texts stored as the bytes sent, their secrets readable in the
    base64."""
    values = {name: f"Pq{secrets.token_hex(6)}" for name in TEXTS}
    sent: dict[str, object] = {name: text.format(v=values[name]).encode(encoding)
                               for name, (text, encoding) in TEXTS.items()}
    db, attributes = ingested(tmp_path, sent | PLAIN, protocol)
    for name, (text, encoding) in TEXTS.items():
        assert base64.b64decode(attributes[name]).decode(encoding) == text.format(v="[REDACTED]"), name
    for name, raw in PLAIN.items():
        assert base64.b64decode(attributes[name]) == raw, name
    for needle in (*values.values(), *(base64.b64encode(sent[name]).decode() for name in TEXTS)):  # type: ignore[arg-type]
        assert rows_holding(db, needle) == [], needle
