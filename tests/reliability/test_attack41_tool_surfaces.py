"""Session 41 (39th attack campaign): this campaign's names and sentences through a real AG2 group chat.

A model (AG2's scripted client) calls a tool with arguments named as session 41's rules now read them
(``db_pass``, ``openai_key``, ``github_pat``) and with a note holding a sentence (``set password: <w> for now``,
``--api-key <v>``); the tool fails quoting its arguments, or returns them. Nothing secret may reach a span's
name, status, attribute or event, the DAG's SQLite rows (a real ``DagSpanExporter``) or our loggers, with content
capture on (redacted) or off (no message content recorded at all).
"""

from __future__ import annotations

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
@pytest.mark.parametrize("capture", [True, False])
@pytest.mark.parametrize("fails", [False, True])
def test_credentials_named_in_any_case_never_reach_telemetry(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                              tmp_path: Path, fails: bool, capture: bool) -> None:
    """Fails on 3c387d5 with content capture on (both cases: ``db_pass``'s, ``openai_key``'s and ``github_pat``'s
    values, the word set as a password in the note and the option's argument reached the tool span's attributes,
    the messages, its status and the DAG's rows) and off when the tool fails (its status and error row)."""
    db_pass, openai_key, pat, option = (f"Tw{secrets.token_hex(6)}{i}" for i in range(4))
    word = unlearned_word("Tool")
    note = f"set password: {word} for now; then run cli --api-key {option} --verbose"
    script = [{"tool_calls": [{"id": "call_att41", "name": "peak_position", "arguments": {
        "multipole": 1, "db_pass": db_pass, "openai_key": openai_key, "github_pat": pat, "note": note}}]}]

    def tool(multipole: int, db_pass: str = "", openai_key: str = "", github_pat: str = "", note: str = "") -> str:
        said = f"login as admin with {db_pass}, {openai_key}, {github_pat}; {word} and {option} from the note"
        if fails:
            raise LoginRejected(said)
        return said

    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture, instrument_cmbagent=False)
    group_chat(tmp_path / "chat", engineer_script=script, tool=tool, order=["engineer", "executor", "researcher"])
    assert_clean(sink, caplog, db_pass, openai_key, pat, option, word)
    if not capture:
        # (an exception's message, redacted, is the span's status and the error row's: not message content)
        assert_no_content(sink, "then run cli")
