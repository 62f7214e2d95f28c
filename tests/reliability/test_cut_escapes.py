"""A key escaped in a URL or in JSON and cut inside one of its escapes.

The eighth campaign searched texts with escapes decoded for a key split across two texts, each
text decoded alone: when the cut fell inside an escape (``…sk%2Dproj%2`` | ``D4bfc…``, or
``\\u00`` | ``2d…``), neither text decoded that escape, the key was in neither decoded text nor
in their join, and the second half of the key (its random part) reached the recorded messages
and rows whole. An escape cut by a text's end is now completed from the next text for the search.
"""

from __future__ import annotations

import secrets
import urllib.parse

import pytest

from cmbagent_otel import redaction
from tests.conftest import client_key

from .test_secrets import Sink, assert_clean, instrument, sink  # noqa: F401  (fixture)
from .test_split_secrets import _assistant, _recorded_content


def _escaped(secret: str, how: str) -> str:
    if how == "url":
        return urllib.parse.quote(secret, safe="").replace("-", "%2D")
    return secret.replace("-", "\\u002d")  # JSON written by an encoder escaping every non-word character


@pytest.mark.parametrize("inside", [1, 2, 3, 4])  # characters of the escape left in the first text
@pytest.mark.parametrize("how", ["url", "json"])
@pytest.mark.parametrize("which", ["shaped", "registered"])
def test_a_key_cut_inside_an_escape_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                which: str, how: str, inside: int) -> None:
    secret = (f"sk-proj-{secrets.token_hex(20)}" if which == "shaped"
              else f"QZXW{secrets.token_hex(6)}-{secrets.token_hex(14)}")
    if which == "registered":
        redaction.register_secret(secret)
    instrument(sink)
    assistant = _assistant({"model": "scripted", client_key(): "ScriptedModelClient"})
    escaped = _escaped(secret, how)
    mark = "%2D" if how == "url" else "\\u002d"
    at = escaped.rindex(mark) + min(inside, len(mark) - 1)  # the last escape, cut after `inside` characters
    first, second = escaped[:at], escaped[at:]
    messages = [{"role": "user", "content": f"GET https://api.example.org/v1?key_id=7&k={first}"},
                {"role": "user", "content": f"{second}&limit=5 failed"}]
    assistant.generate_reply(messages=messages)
    rest = secret[secret.rindex("-") + 1:]  # the key's random part after the cut escape
    assert_clean(sink, caplog, rest[:8], rest[-8:], rest)
    assert "failed" in _recorded_content(sink)


def test_texts_ending_in_a_percent_sign_are_kept() -> None:
    texts = ["the fit converged at 95%", "2D maps next", "and \\u00", "2d is not a key"]
    redaction.learn_split_secrets(texts)
    assert [redaction.redact(text) for text in texts] == texts
