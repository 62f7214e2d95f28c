"""What held up in the twenty-sixth campaign (they pass on main c543977 and here).

The credential fields of other AG2 API types in a config entry (Anthropic's ``api_key``, Bedrock's
``aws_access_key``/``aws_secret_key``/``aws_session_token``, Gemini/Vertex ``credentials`` and
``google_application_credentials``) are secret-named, so the agent's ``llm_config`` walk registers
them; the provider variables AG2's clients read (``ANTHROPIC_API_KEY``, ``GEMINI_API_KEY``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``...) are secret-named too. A model client quoting
them all in its error leaves none in a span, an event, a status, a log record or a row. And a
server's 500 with a 1 MB HTML body gives bounded exception events, the app the server's error.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import Any

import pytest
from autogen import ConversableAgent

import cmbagent_otel
from cmbagent_otel import redaction
from cmbagent_otel.testing import FakeOpenAIServer
from tests.conftest import client_key

from .conftest import ON_CMBAGENT_AUTOGEN, needs_custom_client
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")

FIELDS = ("api_key", "aws_access_key", "aws_secret_key", "aws_session_token", "gcp_auth_token",
          "google_application_credentials")


class QuotingClient:
    """A model client whose provider refuses the call, quoting every credential of its config."""

    def __init__(self, config: dict[str, Any], **_: Any) -> None:
        self.config = config

    def create(self, params: dict[str, Any]) -> Any:
        quoted = [str(self.config.get(name)) for name in FIELDS]
        quoted += [str(v) for v in (self.config.get("credentials") or {}).values()]
        raise PermissionError("provider refused: " + " ".join(quoted))

    def message_retrieval(self, response: Any) -> list[str]:
        return []

    def cost(self, response: Any) -> float:
        return 0.0

    @staticmethod
    def get_usage(response: Any) -> dict[str, Any]:
        return {}


@needs_custom_client
@pytest.mark.skipif(ON_CMBAGENT_AUTOGEN, reason="cmbagent_autogen's config schema rejects the AWS and GCP credential "
                    "fields (aws_access_key, gcp_auth_token, credentials...): no application on it holds a key there")
def test_other_api_types_credentials_are_registered(sink: Sink, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    values = {name: f"Cr{secrets.token_hex(12)}" for name in FIELDS}
    private = f"PK{secrets.token_hex(16)}"
    entry = {"model": "m", client_key(): "QuotingClient", **values,
             "credentials": {"type": "service_account", "private_key_id": private}}
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=False, instrument_cmbagent=False)
    agent = ConversableAgent("assistant", llm_config={"config_list": [entry], "cache_seed": None},
                             human_input_mode="NEVER")
    agent.register_model_client(QuotingClient)
    with pytest.raises(PermissionError):
        agent.generate_reply(messages=[{"role": "user", "content": "hi"}])
    assert_clean(sink, caplog, private, *values.values())


@pytest.mark.parametrize("name", ["ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_GEMINI_API_KEY",
                                  "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY", "AWS_SESSION_TOKEN",
                                  "AZURE_OPENAI_API_KEY", "MISTRAL_API_KEY"])
def test_provider_variables_are_secret_named(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    value = f"Ev{secrets.token_hex(12)}"
    monkeypatch.setenv(name, value)
    redaction.reload_settings()
    assert redaction.redact(f"client failed with {value}") == f"client failed with {redaction.REDACTED}"


def test_a_huge_error_body_is_bounded(sink: Sink) -> None:  # noqa: F811
    body = b"<html>" + b"x" * (1 << 20) + b"</html>"
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=False, instrument_cmbagent=False)
    with FakeOpenAIServer(raw_responder=lambda b, h: (500, {"Content-Type": "text/html"}, body)) as server:
        agent = ConversableAgent("assistant", llm_config={"config_list": [
            {"model": "gpt-4o", "api_key": "unused", "base_url": server.base_url}],
            "cache_seed": None}, human_input_mode="NEVER")
        with pytest.raises(Exception) as raised:
            agent.generate_reply(messages=[{"role": "user", "content": "hi"}])
    assert type(raised.value).__name__ == "InternalServerError"
    events = [event for span in sink.memory.get_finished_spans() for event in span.events]
    assert events
    for span in sink.memory.get_finished_spans():
        assert len(span.status.description or "") <= 1024
        for event in span.events:
            for value in (event.attributes or {}).values():
                assert len(str(value)) <= 16384 + 64


def test_a_connection_reset_mid_body(sink: Sink, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """The server sends half a body quoting the key, then resets the connection (SO_LINGER 0)."""
    import socket
    import struct
    import threading

    key = f"QZ{secrets.token_hex(16)}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                             b'{"id": "' + key.encode())
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=True, instrument_cmbagent=False)
    try:
        base_url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        agent = ConversableAgent("assistant", llm_config={"config_list": [
            {"model": "gpt-4o", "api_key": key, "base_url": base_url}], "cache_seed": None},
            human_input_mode="NEVER")
        with pytest.raises(Exception) as raised:
            agent.generate_reply(messages=[{"role": "user", "content": "hi"}])
    finally:
        listener.close()
    assert type(raised.value).__name__ == "APIConnectionError"
    assert [span for span in sink.memory.get_finished_spans() if span.events]
    assert_clean(sink, caplog, key)
