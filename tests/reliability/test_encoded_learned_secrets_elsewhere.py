"""A learned secret first seen encoded outside a tool result or code output never reaches telemetry.

The ninth campaign looked for the encoded forms (hex, base64, base32) of learned secrets in tool
results and code output only, and left the rest open. Found again by the eleventh: a password
learned from a tool call's arguments that the model then quotes base64-encoded in its next
message, or that a tool's exception quotes hex-encoded (the exception event and the status, with
content capture off too), was recorded there and in the rows. The message texts the split-key
search looks at (every message with content capture on) and every exception recorded (its message
and its chained causes' in the stack trace) are now looked at for those forms as well.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent

import cmbagent_otel
from cmbagent_otel import redaction
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

from .conftest import group_chat, needs_custom_client
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


class Rejected(Exception):
    pass


def test_a_learned_password_quoted_encoded_by_the_model_is_redacted(
        sink: Sink, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:  # noqa: F811
    password = f"Pw{secrets.token_urlsafe(15)}"
    b64 = base64.b64encode(b"svc:" + password.encode()).decode()
    script = [
        {"tool_calls": [{"id": "call_enc_pw2", "name": "peak_position",
                         "arguments": {"multipole": 2, "password": password}}]},
        f"Logged in: the session header is Authorization-Blob {b64} (keep it).",
    ]

    def tool(multipole: int, password: str = "") -> str:
        return f"peak {multipole}: logged in"

    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=True, instrument_cmbagent=False)
    group_chat(tmp_path / "chat", message="go", engineer_script=script, tool=tool)
    assert_clean(sink, caplog, password, b64[8:-4])
    assert "keep it" in "\n".join(text for _, text in sink.texts())


@needs_custom_client
def test_a_learned_password_quoted_encoded_by_a_raised_exception_is_redacted(
        sink: Sink, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """Content capture off: the exception event, its stack trace (with the chained cause) and the
    status are recorded all the same."""
    password = f"Pw{secrets.token_urlsafe(15)}"
    raw = password.encode()
    hexed, b32 = raw.hex(), base64.b32encode(raw).decode().rstrip("=")
    redaction.learn_secrets_in(json.dumps({"multipole": 2, "password": password}))  # as a tool call's arguments

    class Refusing(ScriptedModelClient):
        def create(self, params: dict[str, Any]) -> Any:
            try:
                raise KeyError(f"no session for seed {b32}")
            except KeyError as cause:
                raise Rejected(f"login rejected for digest {hexed}") from cause

    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=False, instrument_cmbagent=False)
    assistant = ConversableAgent("assistant", llm_config={"config_list": [
        {"model": "scripted", client_key(): "Refusing"}], "cache_seed": None}, human_input_mode="NEVER")
    assistant.register_model_client(Refusing)
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    with pytest.raises(Rejected) as info:
        user.initiate_chat(assistant, message="log in", max_turns=1, silent=True)
    assert hexed in str(info.value)  # the application's exception is its own
    assert_clean(sink, caplog, password, hexed, b32[:-8])
    recorded = "\n".join(text for _, text in sink.texts())
    assert "login rejected" in recorded and "no session for seed" in recorded
