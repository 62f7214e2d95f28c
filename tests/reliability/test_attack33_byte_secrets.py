"""Thirty-third attack campaign: secrets given as bytes that are not UTF-8.

The thirty-second campaign made a registered or learned secret holding lone surrogates (an environment
value whose bytes are not UTF-8) redacted in each rendering of its bytes. Secrets that arrive as bytes
were decoded with U+FFFD instead (pydantic's ``SecretBytes``, httpx ``DigestAuth``'s password, a sent
header's value) or dropped (a Basic token whose ``user:password`` is not UTF-8, as a Latin-1 password
is; a key given as bytes under a secret-named key): only that one text was registered, and the bytes'
Latin-1 decoding (what a server quoting them shows), hex, base64 and ``\\xNN`` escapes reached telemetry
whole. They are now kept as surrogates (``redaction.secret_text``), so every rendering is registered.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import httpx
import pytest
from autogen import ConversableAgent
from pydantic import SecretBytes

import cmbagent_otel
from cmbagent_otel import redaction
from cmbagent_otel.testing import FakeOpenAIServer

from .test_attack5_credential_sources import SharedClient
from .test_attack32_surrogate_text import assert_each_rendering_redacted
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _raw() -> bytes:
    """16 hex digits, two bytes that are not UTF-8 (a Latin-1 "ä" and "ß"), 16 hex digits."""
    return secrets.token_hex(8).encode() + b"\xe4\xdf" + secrets.token_hex(8).encode()


@pytest.mark.parametrize("given", ["SecretBytes", "bytes"])
def test_a_config_secret_given_as_bytes_is_redacted_in_each_rendering(given: str) -> None:
    """Fails on e0732e2 with ('surrogates', 'out: ...\\xe4\\xdf... end'): SecretBytes registered with U+FFFD
    only, bytes not registered at all."""
    raw = _raw()
    value: Any = SecretBytes(raw) if given == "SecretBytes" else raw
    redaction.register_secrets_in({"config_list": [{"model": "gpt-4o", "api_key": value}],
                                   "default_headers": {"X-Api-Key": value}})
    assert_each_rendering_redacted(raw)


def _echo_latin1(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """A server refusing a Basic login, quoting the password as it decoded it (Latin-1, HTTP's old default)."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    password = base64.b64decode(token).decode("latin-1").partition(":")[2] if scheme == "Basic" else ""
    error = {"error": {"message": f"Incorrect password provided: {password}", "type": "invalid_request_error"}}
    return 401, {"Content-Type": "application/json"}, json.dumps(error).encode()


def test_a_basic_password_that_is_not_utf8_quoted_by_the_server_is_redacted(
        sink: Sink, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """Fails on e0732e2: the password (as the server decoded it) in the exception events, statuses and rows."""
    raw = _raw()
    shown = raw.decode("latin-1")
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=False, instrument_cmbagent=False)
    with FakeOpenAIServer(raw_responder=_echo_latin1) as server, pytest.raises(Exception) as raised:
        entry = {"model": "gpt-4o", "base_url": server.base_url, "api_key": "unused",
                 "http_client": SharedClient(auth=httpx.BasicAuth(b"lab", raw))}
        agent = ConversableAgent("assistant", llm_config={"config_list": [entry], "cache_seed": None},
                                 human_input_mode="NEVER")
        agent.generate_reply(messages=[{"role": "user", "content": "hi"}])
    assert type(raised.value).__name__ == "AuthenticationError" and shown in str(raised.value)
    assert [span for span in sink.memory.get_finished_spans() if span.events], "no exception recorded"
    assert_clean(sink, caplog, raw[:16].decode(), raw[-16:].decode())
