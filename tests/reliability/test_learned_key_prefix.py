"""A learned piece that is only the start of a key shape must not hide later keys from it.

A key cut right after its fixed start (``my key: sk-proj-`` | ``4bfc…``) has that start learned
as a secret (a piece of 6 or more characters of a split key). Known secrets are replaced before
key shapes are looked for, so from then on every other key of that shape, in any text, lost only
its start: ``[REDACTED]QzgEM6sx…``, the random part shown whole in exception events, statuses,
messages and rows (found when this campaign's tests ran after the split-key tests). A key shape
overlapping a known secret is now replaced together with it.
"""

from __future__ import annotations

import secrets

import pytest
from autogen import ConversableAgent

from cmbagent_otel import redaction
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

from .test_secrets import Sink, assert_clean, instrument, sink  # noqa: F401  (fixture)
from .test_split_secrets import _assistant


class Refused(Exception):
    pass


@pytest.mark.parametrize("start", ["sk-proj-", "glpat-", "github_pat_"])
def test_a_key_after_its_start_was_learned_is_redacted_whole(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                             start: str) -> None:
    body = lambda: secrets.token_hex(12) + "_" + secrets.token_urlsafe(16).replace("-", "x")  # noqa: E731
    first = start + body()
    instrument(sink)
    assistant = _assistant({"model": "scripted", client_key(): "ScriptedModelClient"})
    assistant.generate_reply(messages=[{"role": "user", "content": f"my key: {first[:len(start)]}"},
                                       {"role": "user", "content": f"{first[len(start):]} is the rest"}])
    assert redaction.redact(f"x {start} y") != f"x {start} y"  # the start was learned as a secret

    second = start + body()  # another key of the same shape, later
    script_reply = f"use {second} for the next call"

    class Echoing(ScriptedModelClient):
        def create(self, params: dict) -> object:
            raise Refused(f"the upstream refused {second}")

    other = ConversableAgent("other", llm_config={"config_list": [
        {"model": "scripted", client_key(): "Echoing"}], "cache_seed": None}, human_input_mode="NEVER")
    other.register_model_client(Echoing)
    with pytest.raises(Refused):
        other.generate_reply(messages=[{"role": "user", "content": script_reply}])
    tail = second[len(start):]
    assert_clean(sink, caplog, first[len(start):], tail, tail[:10], tail[-10:])
    assert redaction.redact(f"key={second}") == "key=[REDACTED]"
    assert redaction.redact(f"my {second} here") == "my [REDACTED] here"
    # escaped, in a text with escapes of both kinds (each decoding replaces the known secrets first)
    escaped = "".join(f"\\u{ord(c):04x}" if c in "-_s" else c for c in second)
    assert tail not in (redaction.redact(f'{{"note": "{escaped}"}} ; https://x.example/?q=a%2Bb') or "")


def test_a_known_secret_next_to_a_shape_is_replaced_as_before() -> None:
    password = f"PW{secrets.token_hex(8)}"
    redaction.register_secret(password)
    key = "sk-" + secrets.token_hex(16)
    assert redaction.redact(f"{password} {key}") == "[REDACTED] [REDACTED]"
    assert redaction.redact(f"{password}:{key}") == "[REDACTED]:[REDACTED]"
