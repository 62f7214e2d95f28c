"""A secret split across messages that are not next to each other, or split while escaped.

The split search looked at consecutive texts only, and at the texts as written: a key whose
start ends one message and whose rest opens a later one, with another message in between (a
group chat: another agent speaks before the sender goes on), and a key written ``%XX``-escaped
in a URL and cut across two texts, left their pieces in the recorded messages and rows. A text
ending in the start of a key shape is now continued by any of the next texts of the same call
whose start holds a digit, as a key's random part does (a word that merely completes the shape
is neither learned nor closes it); texts with escapes are searched decoded too. The escaped
whole key was already caught, except that when one half had been learned as written the
decoded form hid more with as many ``[REDACTED]`` marks and was not chosen.
"""

from __future__ import annotations

import secrets
import urllib.parse

import pytest

from cmbagent_otel import redaction
from tests.conftest import client_key

from .test_secrets import Sink, assert_clean, instrument, sink  # noqa: F401  (fixture)
from .test_split_secrets import _assistant, _distinct_marker, _recorded_content, _secret_and_assistant


@pytest.mark.parametrize("cut", [8, 12])
@pytest.mark.parametrize("which", ["shaped", "registered"])
def test_secret_split_across_messages_apart_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                         which: str, cut: int) -> None:
    secret, assistant = _secret_and_assistant(sink, which)
    first, second = secret[:cut], secret[cut:]
    messages = [{"role": "user", "content": f"my key: {first}"},
                {"role": "assistant", "content": "wait, let me look that up"},
                {"role": "user", "content": "and the plot?"},
                {"role": "user", "content": f"{second} is the rest"}]
    assistant.generate_reply(messages=messages)
    assert_clean(sink, caplog, first, second)
    content = _recorded_content(sink)
    assert "look that up" in content and "and the plot?" in content and "is the rest" in content


@pytest.mark.parametrize("which", ["shaped", "registered"])
def test_escaped_secret_split_across_two_texts_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                            which: str) -> None:
    secret = (f"sk-proj-{secrets.token_hex(20)}" if which == "shaped"
              else f"QZXW{secrets.token_urlsafe(18)}+/=WXZQ")  # a key with characters URLs escape
    if which == "registered":
        redaction.register_secret(secret)
    instrument(sink)
    assistant = _assistant({"model": "scripted", client_key(): "ScriptedModelClient"})
    escaped = urllib.parse.quote(secret, safe="").replace("-", "%2D")
    half = len(escaped) // 2
    if escaped[half - 1] == "%" or escaped[half - 2] == "%":
        half += 2  # never inside an escape
    first, second = escaped[:half], escaped[half:]
    messages = [{"role": "user", "content": f"GET https://api.example.org/v1?key_id=7&k={first}"},
                {"role": "user", "content": f"{second}&limit=5 failed"}]
    assistant.generate_reply(messages=messages)
    pieces = [urllib.parse.unquote(first)[-8:], urllib.parse.unquote(second)[:8], first[-8:], second[:8]]
    assert_clean(sink, caplog, *pieces)
    assert "failed" in _recorded_content(sink)


def test_a_word_completing_a_shape_apart_is_not_learned() -> None:
    """Only a continuation that looks random counts when other texts are in between."""
    fragment = "sk-" + _distinct_marker(False)[:9]
    redaction.learn_split_secrets([f"try {fragment}", "ok then", "and one more question", "Thanksgiving plots"])
    assert redaction.redact("Thanksgiving plots") == "Thanksgiving plots"
