"""Thirty-second attack campaign: text holding lone surrogates against the length bound and redaction.

``safe_text`` escaped lone surrogates after cutting text to its bound, and names were escaped after
:func:`redaction.bounded_name` cut them: an escape is 4 to 6 characters, so a text of surrogates came
out up to 6 times its bound. A secret whose bytes are not UTF-8 (an environment value, kept by Python as
surrogates) was registered only in that form: escaped as telemetry escapes it, as JSON escapes it,
decoded again with U+FFFD (a subprocess's output) or as Latin-1, hex-dumped or base64-encoded from its
bytes, it reached telemetry whole.
"""

from __future__ import annotations

import base64
import json
import os
import secrets

import pytest

from cmbagent_otel import redaction
from cmbagent_otel.redaction import safe_text

_SURROGATES = os.fsdecode(b"\xff" * 3000)


@pytest.mark.parametrize("limit", [None, 256, 1024])
@pytest.mark.parametrize("value", [_SURROGATES, [_SURROGATES], {"content": _SURROGATES}],
                         ids=["text", "list", "dict"])
def test_escaping_never_takes_safe_text_past_its_bound(value: object, limit: int | None) -> None:
    """Fails on 54dc9d7: 4054 characters for a 1024 bound (text), 6064 (a list rendered as JSON)."""
    out = safe_text(value, limit)
    assert out is not None
    out.encode("utf-8")
    assert len(out) <= (limit or redaction.attribute_bound())
    assert out.endswith("...[truncated]")


def test_escaping_never_takes_a_name_past_its_bound() -> None:
    """Fails on 54dc9d7: a model server's id of 300 lone surrogates came out 975 characters long."""
    out = redaction.redact_id(os.fsdecode(b"\xfe" * 300))
    out.encode("utf-8")
    assert len(out) <= redaction.MAX_NAME


@pytest.mark.parametrize("how", ["registered", "learned"])
def test_a_secret_whose_bytes_are_not_utf8_is_redacted_in_each_rendering(how: str) -> None:
    """Fails on 54dc9d7: every rendering below but the surrogate form itself came out whole (a secret
    registered from the environment, or learned from a secret-named key in data)."""
    raw = secrets.token_hex(8).encode() + b"\xff\xfe" + secrets.token_hex(8).encode()
    key = os.fsdecode(raw)
    if how == "registered":
        redaction.register_secret(key)
    else:
        assert redaction.learn_secret(key)
    assert_each_rendering_redacted(raw)


def renderings(raw: bytes) -> dict[str, str]:
    """The texts a secret of the bytes ``raw`` (not UTF-8) may be seen as in telemetry."""
    key = os.fsdecode(raw)
    return {
        "surrogates": key,
        "escaped": redaction.encodable(key),
        "json": json.dumps(key)[1:-1],
        "replaced": raw.decode("utf-8", "replace"),
        "latin-1": raw.decode("latin-1"),
        "hex": raw.hex(),
        "base64": base64.b64encode(raw).decode(),
    }


def assert_each_rendering_redacted(raw: bytes) -> None:
    """Each of :func:`renderings` of ``raw`` (16 hex digits, bytes that are not UTF-8, 16 hex digits) is
    redacted by ``safe_text``, in a text and in a message."""
    for name, shown in renderings(raw).items():
        for value in (f"out: {shown} end", {"content": f"out: {shown} end"}):
            out = safe_text(value)
            assert out is not None
            assert redaction.REDACTED in out, (name, out)
            assert secrets_left(out, raw) == [], (name, out)


def secrets_left(out: str, raw: bytes) -> list[str]:
    """The 8-character hex halves of the key still in ``out``."""
    return [half for half in (raw[:16].decode(), raw[-16:].decode()) if half in out]
