"""Session 44 (44th attack campaign): this campaign's forms through a real AG2 group chat.

A model (AG2's scripted client) calls a tool with a note holding an owner's password (``password for alice: <w>``), a
password with a participle's ending capitalised (``the password is <W>ing``) and a Sentry DSN's key is set in the
environment (``SENTRY_DSN=https://<k>@...``). The tool fails with a message whose first word after a name in prose
is quoted twice (``error reading token: <m> refused by the peer; <m> retried``), or returns the values alone. Then
code prints a Python annotation (``auth: AuthTypes | None = None``) and a sentence naming the class. Nothing secret
may reach a span's name, status, attribute or event, the DAG's SQLite rows (a real ``DagSpanExporter``) or our
loggers, with content capture on (redacted) or off (no message content recorded at all); the class's name stays
readable in the later line.
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
def test_this_campaigns_forms_never_reach_telemetry(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fails: bool,
                                                     capture: bool) -> None:
    """Fails on main in all four cases: the owner's password and the participle-like one reached the tool span's
    attributes and messages (capture on) and the tool's result or status; the DSN's key the tool's result or status
    (capture off too); the message's word its second place; and "AuthTypes" was learned from the code's output,
    then redacted in the sentence naming it."""
    owner, dsn_key = unlearned_word("Ow"), secrets.token_hex(16)
    participle, message = f"{unlearned_word('Bl')}ing", unlearned_word("Ms")
    monkeypatch.setenv("SENTRY_DSN", f"https://{dsn_key}@o1.ingest.sentry.io/42")
    note = f"password for alice: {owner}\nthe password is {participle}"
    code = ("```python\nprint('def f(auth: AuthTypes | None = None) -> None: ...')\n"
            "print('the AuthTypes union names every scheme')\n```")
    script = [{"tool_calls": [{"id": "call_att44", "name": "peak_position", "arguments": {
        "multipole": 1, "note": note}}]}, code]

    def tool(multipole: int, note: str = "") -> str:
        if fails:
            raise LoginRejected(f"error reading token: {message} refused by the peer; {message} retried "
                                f"({owner}, {participle}, {dsn_key})")
        return f"rejected {owner}, {participle} and {dsn_key}"

    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture, instrument_cmbagent=False)
    group_chat(tmp_path / "chat", engineer_script=script, tool=tool,
               order=["engineer", "executor", "engineer", "executor", "researcher"])
    assert_clean(sink, caplog, owner, participle, dsn_key, *([message] if fails else []))
    texts = [text for _, text in sink.texts()]
    assert any("the AuthTypes union names every scheme" in text for text in texts)
    if not capture:
        assert_no_content(sink, "password for alice")
