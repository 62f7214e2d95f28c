"""A key the application puts in the environment after ``instrument()`` never reaches telemetry.

Found by the seventh campaign: secret-looking environment variables were read at import and by
``instrument()`` only. An application that loads its ``.env`` late, or asks for a key at run time,
and then runs code that prints it (or a tool that returns it) had the key stored whole: in the
code span's ``code.output`` (content capture off too), the messages of every later model call and
the DB rows. Environment variables are now looked at again (one dict comparison when nothing
changed) before a code execution's output and a tool's result are recorded.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

import cmbagent_otel

from .conftest import group_chat, needs_custom_client
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)


@needs_custom_client
@pytest.mark.parametrize("capture_content", [False, True], ids=["capture-off", "capture-on"])
def test_a_key_set_after_instrument_and_printed_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capture_content: bool) -> None:
    printed, returned = f"late{secrets.token_hex(12)}", f"late{secrets.token_hex(12)}"
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture_content,
                             instrument_cmbagent=False)
    monkeypatch.setenv("WANDB_API_KEY", printed)  # after instrument(): a .env loaded late
    script = [
        {"tool_calls": [{"id": "call_late_1", "name": "peak_position", "arguments": {"multipole": 2}}]},
        "```python\nimport os\nprint('using', os.environ['WANDB_API_KEY'])\n```",
    ]

    def tool(multipole: int) -> str:
        import os

        os.environ["SERVICE_TOKEN"] = returned  # set, then returned, by the tool itself
        return f"peak {multipole}, token {os.environ['SERVICE_TOKEN']}"

    try:
        result = group_chat(tmp_path / "chat", engineer_script=script, tool=tool)
    finally:
        monkeypatch.delenv("SERVICE_TOKEN", raising=False)
    assert printed in str(result.chat_history) and returned in str(result.chat_history)  # the app's own view
    assert_clean(sink, caplog, printed, returned)
