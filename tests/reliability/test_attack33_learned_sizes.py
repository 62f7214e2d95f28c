"""Thirty-third attack campaign: what a model's tool arguments make redaction compile.

A value under a secret-named key in a tool call's arguments is learned: it, its JSON form (and, for a
value holding lone surrogates, each rendering of its bytes, hex and base64 included) join the pattern
every text is searched with, compiled again with every new secret; its hex, base64 and base32 forms are
compiled for the search of tool results. Nothing bounded their size: a 1 MB password cost 4.8 s to learn,
3 s again with each later secret, and 46 s and 2.7 GB to compile its encoded forms, and it was never
redacted (no more than 64 KiB of a text is read); 64 K characters holding one surrogate cost 5 s with
each later secret. The sizes are asserted here (the characters compiled), not times.
"""

from __future__ import annotations

import json
import secrets

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _compiled_chars() -> int:
    """The characters of the patterns every text is searched with."""
    known = redaction._known_pattern
    patterns = known.patterns if isinstance(known, redaction._Patterns) else (known,) if known is not None else ()
    return sum(len(pattern.pattern) for pattern in patterns)


def _encoded_chars() -> int:
    return sum(len(form) for forms in redaction._learned_forms.values() for form in forms)


def test_a_value_longer_than_what_is_read_is_not_compiled() -> None:
    """Fails on e0732e2: 400 K characters compiled, 4 M of encoded forms."""
    before, encoded_before = _compiled_chars(), _encoded_chars()  # earlier tests' learned values stay
    value = "A" + secrets.token_hex(100_000)
    redaction.learn_secrets_in(json.dumps({"name": "login", "password": value}))
    redaction.learn_encoded_in("the tool's result")
    assert _compiled_chars() - before < 1024
    assert _encoded_chars() == encoded_before
    # still redacted under its key, where it was found
    assert value[:100] not in (redaction.safe_text({"password": value}) or "")


def test_learned_forms_stay_within_their_bound() -> None:
    """Fails on e0732e2: 615 K characters compiled (each value's 25 renderings of 4 K characters kept, the
    oldest forgotten by their count only), every later secret compiling them all again."""
    encoded_before = _encoded_chars()
    values = [f"{secrets.token_hex(2048)}\udcff{i}" for i in range(10)]
    for value in values:  # JSON's "\udcff" escape: json.loads makes it a lone surrogate, as a model may send it
        redaction.learn_secrets_in(json.dumps({"password": value}))
    redaction.learn_encoded_in("the tool's result")
    assert _compiled_chars() < 2 * 128 * 1024  # the bound (128 Ki characters), the newest value's kept whole
    assert _encoded_chars() - encoded_before < 20 * 1024  # encoded forms of values of up to 1,024 characters
    # the newest is redacted in its renderings; a password learned after them in all its forms
    out = redaction.safe_text(f"echo {redaction.encodable(values[-1])} end")
    assert out is not None and values[-1][:64] not in out
    password = f"Pw{secrets.token_urlsafe(15)}"
    redaction.learn_secrets_in(json.dumps({"password": password}))
    hexed = password.encode().hex()
    redaction.learn_encoded_in(f"dumped: {hexed}")
    for shown in (password, hexed):
        out = redaction.safe_text(f"echo {shown} end")
        assert out is not None and shown not in out and redaction.REDACTED in out
