"""Session 43 (41st attack campaign): this campaign's forms through a real AG2 group chat.

A model (AG2's scripted client) calls a tool with a note holding a ``.env`` line (``NPM_AUTH=<v>``), a login under a
secret name (``PROXY_AUTH=bob:<v>``), a plain-word URL password (``postgres://app:<w>@db``) and a word told to be
kept (``your token: <w> keep it safe``); the tool fails quoting the values alone, or returns them. Then code prints a
constant (``TEXT_KEY = "content"``) and a word of state (``token: expired``). Nothing secret may reach a span's name,
status, attribute or event, the DAG's SQLite rows (a real ``DagSpanExporter``) or our loggers, with content capture on
(redacted) or off (no message content recorded at all); the ordinary words stay readable in a later message.
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
                                                     tmp_path: Path, fails: bool, capture: bool) -> None:
    """Fails on 5d6278f in all four cases: the values reached the tool span's attributes and the messages (capture
    on), its status and the DAG's error row when the tool fails (capture off too); and the code's output
    (``cmbagent.code.output``, recorded in both modes) lost "content" and "unexpired" (learned, then redacted)."""
    npm, proxy = (f"Np{secrets.token_hex(6)}{i}" for i in range(2))
    url, kept = unlearned_word("Url"), unlearned_word("Kept")
    note = (f"NPM_AUTH={npm}\nPROXY_AUTH=bob:{proxy}\npostgres://app:{url}@db.internal:5432/cmb\n"
            f"your token: {kept} keep it safe")
    code = ("```python\nprint('TEXT_KEY = \"content\"')\nprint('token: expired')\n"
            "print('the content of the unexpired cache')\n```")
    script = [{"tool_calls": [{"id": "call_att43", "name": "peak_position", "arguments": {
        "multipole": 1, "note": note}}]}, code]

    def tool(multipole: int, note: str = "") -> str:
        said = f"rejected {npm}, {proxy}, {url} and {kept}"
        if fails:
            raise LoginRejected(said)
        return said

    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture, instrument_cmbagent=False)
    group_chat(tmp_path / "chat", engineer_script=script, tool=tool,
               order=["engineer", "executor", "engineer", "executor", "researcher"])
    assert_clean(sink, caplog, npm, proxy, url, kept)
    texts = [text for _, text in sink.texts()]
    assert any("the content of the unexpired cache" in text for text in texts)
    if not capture:
        assert_no_content(sink, "keep it safe")
