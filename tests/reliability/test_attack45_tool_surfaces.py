"""Session 45 (45th attack campaign): this campaign's forms through a real AG2 group chat.

A model (AG2's scripted client) calls a tool with a note holding base64 of ``password=<v>`` and hex of ``api_key:
sk-proj-...``; an environment variable named with dashes (``my-api-key``) holds a key. The tool returns the values
alone or fails with them in its message; then code (run by AG2's real executor) prints base64 of ``token=<w>`` and,
on its next line, ``<w>`` alone. Nothing secret, and no encoded run holding one, may reach a span's name, status,
attribute or event, the DAG's SQLite rows (a real ``DagSpanExporter``) or our loggers, with content capture on
(redacted) or off (no message content recorded at all).
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest

import cmbagent_otel
from tests.conftest import unlearned_word

from ._attack_helpers import LoginRejected, assert_no_content
from .conftest import group_chat, needs_custom_client
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: a fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@needs_custom_client
@pytest.mark.parametrize(("fails", "capture"), [(False, True), (True, True), (False, False), (True, False)],
                         ids=["returns-capture", "raises-capture", "returns-no-capture", "raises-no-capture"])
def test_encoded_and_dashed_secrets_never_reach_telemetry(fails: bool, capture: bool, sink: Sink,  # noqa: F811
                                                          caplog: pytest.LogCaptureFixture, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails on main in all four cases: the password and the key reached the tool span's attributes (capture on)
    encoded and the tool's result or status alone; the dashed variable's key the tool's result or status (capture
    off too); the code's token its output, encoded and alone."""
    password, token = unlearned_word("Pz") + "4", unlearned_word("Tz") + "8"
    key, env_key = "sk-proj-" + secrets.token_hex(20), "Qv" + secrets.token_hex(12)
    monkeypatch.setenv("my-api-key", env_key)
    encoded_password = base64.b64encode(f"password={password}".encode()).decode()
    hex_key = f"api_key: {key}".encode().hex()
    encoded_token = base64.b64encode(f"token={token}".encode()).decode()
    code = ("```python\nimport base64\n"
            f"print(base64.b64encode(b'token={token}').decode())\nprint('then {token} alone')\n```")
    script = [{"tool_calls": [{"id": "call_att45", "name": "peak_position", "arguments": {
        "multipole": 1, "note": f"creds {encoded_password} and {hex_key}"}}]}, code]

    def tool(multipole: int, note: str = "") -> str:
        if fails:
            raise LoginRejected(f"login refused for {password}, {key} and {env_key}")
        return f"rejected {password}, {key} and {env_key}"

    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture, instrument_cmbagent=False)
    group_chat(tmp_path / "chat", engineer_script=script, tool=tool,
               order=["engineer", "executor", "engineer", "executor", "researcher"])
    assert_clean(sink, caplog, password, key, env_key, token, encoded_password, hex_key, encoded_token)
    if not capture:
        assert_no_content(sink, "creds ")
