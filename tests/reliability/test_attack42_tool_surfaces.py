"""Session 42 (40th attack campaign): this campaign's forms through a real AG2 group chat.

A model (AG2's scripted client) calls a tool with a note holding a sentence (``the password is <w>``, ``token <v>
expired yesterday``), command lines (``mysql -p<v>``, ``curl -u bob:<v>``) and a URL (``postgres://app:<v>@db``);
the tool fails quoting the values alone, or returns them. Then it runs code printing the environment's ``PWD``
and a file under it. Nothing secret may reach a span's name, status, attribute or event, the DAG's SQLite rows (a
real ``DagSpanExporter``) or our loggers, with content capture on (redacted) or off (no message content recorded at
all); the working directory stays readable in the code's output.
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
    """Fails on 4a0d79e in all four cases: the values reached the tool span's attributes and the messages (capture
    on), its status and the DAG's error row when the tool fails (capture off too); and the working directory was
    learned from ``PWD=...`` and hidden in the code's output (``cmbagent.code.output``, recorded in both modes)."""
    loose, mysql, curl, url = (f"hunter{secrets.randbelow(10**6)}q{i}" for i in range(4))
    word = unlearned_word("Chat")
    note = (f"the password is {word}; token {loose} expired yesterday.\nmysql -u root -p{mysql} cmb\n"
            f"curl -u bob:{curl} https://api.example.org\npostgres://app:{url}@db.example.org:5432/cmb")
    work = tmp_path / "chat"
    code = ("```python\nimport os\nprint('PWD=' + os.getcwd())\n"
            "print('saved ' + os.path.join(os.getcwd(), 'chains.npy'))\n```")
    script = [{"tool_calls": [{"id": "call_att42", "name": "peak_position", "arguments": {
        "multipole": 1, "note": note}}]}, code]

    def tool(multipole: int, note: str = "") -> str:
        said = f"rejected {word}, {loose}, {mysql}, {curl} and {url}"
        if fails:
            raise LoginRejected(said)
        return said

    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture, instrument_cmbagent=False)
    group_chat(work, engineer_script=script, tool=tool,
               order=["engineer", "executor", "engineer", "executor", "researcher"])
    assert_clean(sink, caplog, word, loose, mysql, curl, url)
    texts = [text for _, text in sink.texts()]
    # the code's output (recorded with capture off too: it is no message content), its working directory readable
    assert any(f"{work.resolve()}/chains.npy" in text or f"{work}/chains.npy" in text for text in texts)
    if not capture:
        assert_no_content(sink, "expired yesterday")
