"""Session 40 (38th attack campaign): keys that read as a Python class's name lost their values' learning.

Session 39 (9c4ec49) stopped learning the word after an exception's type name (``NoCredentialsError: Unable to
locate credentials`` made "Unable" redacted everywhere). Its test for a class's name also took every dotted key
whose module-like path holds the secret word and whose last part is capitalised: ``secrets.Prod: <value>``,
``db.credentials.Primary = <value>`` (a configuration printed by a tool or code), and an exception holding
nothing but the secret (``InvalidApiKeyError: <the key>``). The value was still redacted where it stood but no
longer learned, so the same value in a later text (the model repeating it, a log line) was shown whole; on
d1ab575, before 9c4ec49, it was learned. Now only a value followed by more words on its line (a message) is
left unlearned after a class's name.

The values are this file's own (``isolated_secrets`` keeps what earlier tests of the process learned, and a
learned secret is redacted inside longer words too).
"""

from __future__ import annotations

import json
import traceback

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")


class InvalidApiKeyError(Exception):
    pass


class Revoked(Exception):
    """A traceback names it by its module's path, which holds ``credential``: a key's name to the scan."""


Revoked.__module__ = "vault.credentials"


def _traceback_of(exc: Exception) -> str:
    try:
        raise exc
    except Exception as raised:
        return "".join(traceback.format_exception(raised))


@pytest.mark.parametrize("text", [
    "secrets.Prod: Vq8att40prodval",
    "credentials.Default = Vq8att40defval",
    "db.credentials.Primary: Vq8att40primval",
    "passwords.Admin: Vq8att40adminval",
    "vault.secret.Github=Vq8att40ghval",
    "mycfg.auth_token.Value: Vq8att40tokval",
    '{"log": "secrets.Staging: Vq8att40jsonval"}',
])
def test_a_dotted_configuration_key_learns_its_value(text: str) -> None:
    """Fails on 86547de: the value is shown in a later text (7 of 7); learned on d1ab575."""
    value = text.rsplit(" ", 1)[-1].rsplit("=", 1)[-1].strip('"}')
    assert value not in (redaction.safe_text(f"config loaded:\n{text}\nready") or "")
    assert value not in (redaction.safe_text(f"the model said {value} is in use") or "")


@pytest.mark.parametrize(("exc", "value"), [
    (InvalidApiKeyError("Vq8att40apikeyval"), "Vq8att40apikeyval"),
    (Revoked("Vq8att40revokedval"), "Vq8att40revokedval"),
])
def test_an_exception_holding_only_the_secret_learns_it(exc: Exception, value: str) -> None:
    """Fails on 86547de: the exception's message (the secret alone) is shown in a later text."""
    shown = redaction.safe_text(_traceback_of(exc)) or ""
    assert f"{type(exc).__qualname__}: " in shown and value not in shown
    assert value not in (redaction.safe_text(f"retrying with {value}") or "")
    assert value not in (redaction.safe_text(json.dumps({"error": str(exc)})) or "")


@pytest.mark.parametrize(("exc", "word"), [
    (InvalidApiKeyError("Rejectedattforty by the provider, check the key"), "Rejectedattforty"),
    (Revoked("Expiredattforty: sign in again"), "Expiredattforty"),
])
def test_a_message_after_a_class_name_is_still_not_learned(exc: Exception, word: str) -> None:
    """What 9c4ec49 fixed stays fixed: a message's first word, words following it, is not learned (also
    inside JSON, where the traceback's line ends are escaped)."""
    text = _traceback_of(exc)
    assert word not in (redaction.safe_text(json.dumps({"traceback": text})) or "")  # redacted where it stands
    assert word not in (redaction.safe_text(text) or "")
    later = f"{word} twice today; retrying in 5 s"
    assert redaction.safe_text(later) == later
