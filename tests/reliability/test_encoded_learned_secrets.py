"""A secret learned at run time never reaches telemetry hex-, base64- or base32-encoded.

The eighth campaign registered the encoded forms of registered keys (``llm_config``, the
environment) only. A password the model passes in a tool call's arguments is learned before the
tool runs, but a tool that returns it encoded (a session blob, a ``user:password`` pair in
base64, a hex dump) and code that prints it encoded had it stored in the tool's result, the code
output, every later message quoting them and the rows, content capture on (the code output with
capture off too). The encoded forms of the most recently learned values are now looked for in
tool results and code output, and a form found is learned there.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest

import cmbagent_otel
from cmbagent_otel import redaction

from .conftest import group_chat
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize("capture", [True, False])
def test_a_learned_password_returned_or_printed_encoded_is_redacted(
        sink: Sink, caplog: pytest.LogCaptureFixture, tmp_path: Path, capture: bool) -> None:  # noqa: F811
    password = f"Pw{secrets.token_urlsafe(15)}"
    raw = password.encode()
    hexed, b64, b32 = raw.hex(), base64.b64encode(b"svc:" + raw).decode(), base64.b32encode(raw).decode()
    script = [
        {"tool_calls": [{"id": "call_enc_pw", "name": "peak_position",
                         "arguments": {"multipole": 2, "password": password}}]},
        f"```python\nimport binascii\nprint('dump', binascii.hexlify({password!r}.encode()).decode())\n```",
    ]

    def tool(multipole: int, password: str = "") -> str:
        secret = password.encode()
        return (f"peak {multipole}; session {base64.b64encode(b'svc:' + secret).decode()} "
                f"seed {base64.b32encode(secret).decode()} dump {secret.hex()}")

    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture, instrument_cmbagent=False)
    group_chat(tmp_path / "chat", message="go", engineer_script=script, tool=tool)
    assert_clean(sink, caplog, password, hexed, b64[8:-4], b32[:-8])
    recorded = "\n".join(text for _, text in sink.texts())
    assert "dump" in recorded and ("; session" in recorded or not capture)  # what was recorded


def test_encoded_forms_are_looked_for_only_in_tool_results_and_code_output() -> None:
    # (letters beyond ASCII between short runs: hex of 12 bytes of text in a row is decoded wherever it stands, glued
    # inside a longer run too since session 47, and would be found without the learned forms)
    password = "\u00e9".join(["Pw", *(secrets.token_urlsafe(3) for _ in range(4))])
    redaction.learn_secrets_in({"password": password})
    # inside bytes that are no text (hex of text is decoded wherever it stands: test_attack45_encoded_text.py)
    blob = (b"\x80\x81" + password.encode()).hex()
    assert redaction.redact(f"x {blob}") == f"x {blob}"  # not yet: a prose text pays nothing for it
    redaction.learn_encoded_in(f"dump {blob}")
    assert blob not in (redaction.redact(f"later: {blob}") or "")
