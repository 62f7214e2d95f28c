"""Session 46 (46th attack campaign): this campaign's forms through a real AG2 group chat.

A model (AG2's scripted client) calls a tool with a note holding base64 of ``password=<p>`` glued after ``x_``,
base64 of a Spanish note holding ``password=<q>``, a JSON Web Token glued after ``token`` and form-encoded prose
(``q=my+password+is+<r>``); the tool returns the values alone or fails with them in its message. Then the model
writes ``Use this api_key=`` in one message and the key at the start of its next one. Nothing secret, and no encoded
run holding one, may reach a span's name, status, attribute or event, the DAG's SQLite rows (a real
``DagSpanExporter``) or our loggers, with content capture on (redacted) or off (no message content recorded).
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest

from tests.conftest import unlearned_word

from ._attack_helpers import assert_no_content, chat_with_a_tool_note
from .conftest import needs_custom_client
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: a fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")

CASES = [(False, True), (True, True), (False, False), (True, False)]


@needs_custom_client
@pytest.mark.parametrize(("fails", "capture"), CASES,
                         ids=["returns-capture", "raises-capture", "returns-no-capture", "raises-no-capture"])
def test_glued_encoded_form_and_split_secrets_never_reach_telemetry(
        fails: bool, capture: bool, sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
        tmp_path: Path) -> None:
    """Fails on main in three of the four cases (capture off, a result is not recorded): the glued and UTF-8
    passwords and the form's reached the tool's result or status alone (capture off too: arguments are only learned
    from, and nothing was found in them) and its arguments encoded (capture on); the token's payload the arguments;
    the split key the model's reply, the summary and the DAG's rows (capture on)."""
    glued, utf8, form = (unlearned_word(prefix) + digit for prefix, digit in (("Gz", "2"), ("Uz", "5"), ("Fz", "9")))
    split_key = unlearned_word("Kz") + "3"
    payload = base64.urlsafe_b64encode(f'{{"sub":"{secrets.token_hex(6)}"}}'.encode()).decode().rstrip("=")
    jwt = f"eyJhbGciOiJIUzI1NiJ9.{payload}.{secrets.token_urlsafe(32)}"
    glued_run = base64.b64encode(f"password={glued}".encode()).decode()
    utf8_run = base64.b64encode(f"contraseña de la base: password={utf8}".encode()).decode()
    note = f"creds x_{glued_run} and {utf8_run}, auth token{jwt}, q=my+password+is+{form}"
    chat_with_a_tool_note(sink, tmp_path / "chat", capture=capture, fails=fails, note=note, values=[glued, utf8, form],
                          then=["Use this api_key=", f"{split_key} for the next run. TERMINATE"],
                          order=["engineer", "executor", "engineer", "engineer", "researcher"])
    assert_clean(sink, caplog, glued, utf8, form, split_key, payload, glued_run, utf8_run)
    if not capture:
        assert_no_content(sink, "creds ")
