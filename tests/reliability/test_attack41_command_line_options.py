"""Session 41 (39th attack campaign): a credential given to a command line's option, or after "is:".

Code a model runs, and the commands it prints, give credentials as options: ``--api-key <v>``, ``--password '<v>'``,
``--token <v> --verbose``. Only ``--password=<v>`` was read as a key (``=``); with a blank the value was shown, in
the code execution's output and in every later text. A secret-named option (a name starting with "-") now takes
the argument after its blanks (not another option), redacted and learned; an option naming where a secret is kept
(``--password-stdin``, ``--api-key-file``, ``--secret-name``) takes none, and a name in prose followed by a word
(``the token expired``) is no option. ``The password is: <v>`` (a colon after ``is``) is read as ``is``.

The values are this file's own (``isolated_secrets``).
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize(("template", "expected"), [
    ("$ mytool --api-key {v} --model gpt-4o", "$ mytool --api-key [REDACTED] --model gpt-4o"),
    ("mytool --password '{v}' -v", "mytool --password '[REDACTED]' -v"),
    ("run --auth-token {v}\nok", "run --auth-token [REDACTED]\nok"),
    ("The password is: {v}", "The password is: [REDACTED]"),
])
def test_an_options_credential_is_hidden_there_and_later(template: str, expected: str) -> None:
    """Fails on 3c387d5: the value shown, and in a later text."""
    value = f"Op{secrets.token_hex(5)}7z"
    assert redaction.safe_text(template.format(v=value)) == expected
    assert value not in (redaction.safe_text(f"later: {value}") or "")


@pytest.mark.parametrize("text", [
    "echo $PW | docker login --username bob --password-stdin registry.example.org",
    "cli --api-key-file /etc/keys/openai.txt --verbose",
    "aws secretsmanager get-secret-value --secret-id prod/db/primary",
    "the token expired yesterday, pass the token along",
    "query --sort-key created --partition-key tenant",
])
def test_other_options_and_prose_stay_as_written(text: str) -> None:
    """Both directions: what follows these is a path, a name or a word, not a secret."""
    assert redaction.safe_text(text) == text
    later = "registry.example.org /etc/keys/openai.txt prod/db/primary yesterday created tenant"
    assert redaction.safe_text(later) == later
