"""Session 39, carried-over limits: the size of a registered secret (configuration, trusted).

Learned secrets were bounded in session 37 (``test_attack33_learned_sizes.py``); registered ones were
not. A value registered from a configuration (an ``llm_config`` ``api_key``, ``register_secret``)
joined the pattern every text is searched with, with its hex, base64 and base32 forms (~15 times its
length) for the first 32: a 1 MB value cost 51 s of CPU and 2.9 GB to register on d1ab575, and was never
found in a text anyway (no more than 64 KiB of one is read). The sizes are asserted here (the
characters compiled), not times.
"""

from __future__ import annotations

import base64
import logging
import secrets

import pytest
from autogen import ConversableAgent

from cmbagent_otel import redaction
from cmbagent_otel.instrumentation import _content

from .test_attack33_learned_sizes import _compiled_chars

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def test_a_configured_key_longer_than_what_is_read_is_not_compiled(caplog: pytest.LogCaptureFixture) -> None:
    """Fails on d1ab575: 1.5 M characters compiled (the value and its encoded forms)."""
    before = _compiled_chars()
    value = "K" + secrets.token_hex(50_000)  # 100,001 characters, past the 64 KiB read of a text
    agent = ConversableAgent("assistant", llm_config={"config_list": [{"model": "gpt-4o", "api_key": value}]})
    with caplog.at_level(logging.WARNING, logger="cmbagent_otel.redaction"):
        _content.register_agent_secrets(agent)
    assert _compiled_chars() - before < 1024
    assert not redaction.is_registered(value)
    said = [r.getMessage() for r in caplog.records if r.name == "cmbagent_otel.redaction"]
    assert said and "100001 characters" in said[0] and value[:64] not in said[0]
    # still redacted under its key, where a configuration holds it
    assert value[:100] not in (redaction.safe_text({"api_key": value}) or "")


def test_encoded_forms_are_kept_for_keys_not_documents() -> None:
    """Fails on d1ab575: the encoded forms of a 20 K character secret (~300 K characters) compiled."""
    pem = "-----BEGIN PRIVATE KEY-----" + secrets.token_urlsafe(3000)[:4000] + "-----END"  # 4,035 characters
    redaction.register_secret(pem)
    with_pem = _compiled_chars()
    document = "D" + secrets.token_hex(10_000)  # 20,001 characters: registered, its encoded forms not
    redaction.register_secret(document)
    assert _compiled_chars() - with_pem < 2 * len(document)
    out = redaction.safe_text(f"config: {document} end")
    assert out is not None and document[:64] not in out and redaction.REDACTED in out
    # a key of up to 4,096 characters is still caught base64-encoded
    encoded = base64.b64encode(pem.encode()).decode()
    out = redaction.safe_text(f"secret.yaml: {encoded}")
    assert out is not None and encoded[8:72] not in out and redaction.REDACTED in out
