"""Session 40 (38th attack campaign): a secret-named key written as words kept its value.

``API key: <value>``, ``Your API Key: <value>``, ``private key = <value>``, ``secret key: <value>`` (a model's
answer, a README or a log line a tool prints) and ``{"API key": <value>}`` (a model's JSON) showed the value:
the text's key scan reads a name made of identifier characters, and ``key`` alone is no secret's name; a dict
key with a blank in it matched none of the joined forms (``api_key``, ``private-key``). Now the word before a
key name, blanks apart, makes the name with it, and a name with blanks is judged as the identifier it would
be. A value alone on its line is learned; followed by more words (``Invalid API key: check your settings``)
it is redacted where it stands only, as after an exception's type.

The values are this file's own (``isolated_secrets``).
"""

from __future__ import annotations

import json

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize("line", [
    "API key: {v}",
    "Your OpenAI API Key: {v}",
    "api key = {v}",
    "private key: {v}",
    "Secret Key:{v}",
    "access key\t: {v}",
])
def test_a_key_written_as_words_hides_and_learns_its_value(line: str) -> None:
    """Fails on 86547de for each line: the value shown, then shown again in a later text."""
    value = f"Hj3att40words{len(line)}{line[0]}"
    shown = redaction.safe_text(f"Here it is.\n{line.format(v=value)}\nKeep it safe.") or ""
    assert value not in shown and redaction.REDACTED in shown and "Keep it safe." in shown
    assert value not in (redaction.safe_text(f"I used {value} for the call") or "")


@pytest.mark.parametrize("name", ["API key", "Private Key", "your secret key", "Access  Key"])
def test_a_dict_key_written_as_words_is_secret_named(name: str) -> None:
    """Fails on 86547de: a model's JSON or a tool's arguments kept the value under such a key."""
    value = f"Hj3att40dict{name.replace(' ', '')}"
    assert redaction.is_secret_key(name)
    assert redaction.scrub({"config": {name: value}}) == {"config": {name: redaction.REDACTED}}
    redaction.learn_secrets_in(json.dumps({name: value}))
    assert value not in (redaction.safe_text(f"later {value}") or "")


def test_a_message_after_a_key_in_words_is_not_learned() -> None:
    """A sentence after the name: its first word is redacted there (as after ``api_key:``), not learned."""
    shown = redaction.safe_text("Invalid API key: Checkattforty your settings and try again") or ""
    assert "Checkattforty" not in shown
    later = "Checkattforty the box to continue"
    assert redaction.safe_text(later) == later


def test_other_keys_in_words_stay_visible() -> None:
    """What must not change: ordinary names before ``key`` ("primary key", "public key", "the key")."""
    for text in ("primary key: order_id_att40", "the public key: ssh-ed25519 AAAAatt40pub", "sort key = created_att40",
                 "the key: Valueatt40"):
        assert redaction.safe_text(text) == text
