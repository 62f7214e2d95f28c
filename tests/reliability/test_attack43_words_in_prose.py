"""Session 43 (41st attack campaign): an ordinary word after a credential's name, in prose and as a key's value.

* ``your token: <w> keep it safe``: session 41 learned an ordinary word followed by more words after a name in prose
  only when what follows sets it apart (``for now``, ``until``, a dash): otherwise it is a message's first word
  (``error reading token: connection refused``). Measured on ~5,000 files of ordinary text (``bench/learned_corpus.py
  --prose --system``: Python's library, manual pages, changelogs, READMEs): the shape occurred 63 times, each a
  message or a changelog's subject (``cert auth: filter out ...``, ``private keys: these are ...``), none followed by
  what tells to keep the value. A word followed by ``keep it ...``, ``store it``, ``do not share ...``, ``never
  share ...`` is the value now, learned: a later text quoting it alone showed it.
* ``token: expired``, ``password: required``, ``{"api_key": "missing"}``: after a name that is no prose (a line's
  start, YAML, JSON) a word of state was learned, then redacted in every later text, inside ``unexpired`` too (found
  here). A word of state is never learned now, in text and in data; still replaced where it stands.

Both directions. The values are this file's own (``isolated_secrets``, ``unlearned_word``).
"""

from __future__ import annotations

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize(("template", "expected"), [
    ("your token: {w} keep it safe", "your token: [REDACTED] keep it safe"),
    ("the new password: {w}, do not share it", "the new password: [REDACTED], do not share it"),
    ("api key: {w} - never share it with anyone", "api key: [REDACTED] - never share it with anyone"),
    ("Your secret key: {w}; store it in the vault", "Your secret key: [REDACTED]; store it in the vault"),
])
def test_a_word_after_a_name_in_prose_told_to_be_kept_is_learned(template: str, expected: str) -> None:
    """Fails on 5d6278f (3 of 4; the dash set the third apart already): replaced there, shown in a later text."""
    word = unlearned_word("Kp")
    assert redaction.safe_text(template.format(w=word)) == expected
    assert redaction.safe_text(f"later {word} again") == "later [REDACTED] again"


@pytest.mark.parametrize("template", [
    "cert auth: {w} out unsupported cert types from TLS 1.2",
    "error reading token: {w} refused by the peer",
    "private keys: {w} are used by several packages",
    "session token: {w} keep trying later",
])
def test_a_messages_first_word_after_a_name_in_prose_is_not_learned(template: str) -> None:
    """Both directions (held up on 5d6278f): a message's or a changelog's first word is replaced there at most,
    never learned; "keep" without "it" tells nothing of the word before it."""
    word = unlearned_word("Ms")
    redaction.safe_text(template.format(w=word))
    later = f"the {word}s are listed"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("text", [
    "token: expired",
    "password: required\nuser: bob",
    '{"api_key": "missing", "model": "gpt-4o"}',
    "status: ok token: revoked",
    "error: token: expired keep it in mind",
])
def test_a_word_of_state_as_a_keys_value_is_not_learned(text: str) -> None:
    """Fails on 5d6278f (5 of 5): the word learned, then redacted in a later text, inside a longer word too."""
    assert "[REDACTED]" in (redaction.safe_text(text) or "")
    later = "expired, unexpired, required, missing, revoked: the states a key goes through"
    assert redaction.safe_text(later) == later


def test_a_word_of_state_in_data_is_not_learned() -> None:
    """Fails on 5d6278f: ``{"token": "expired"}`` taught "expired"."""
    assert redaction.scrub({"token": "expired", "user": "bob"}) == {"token": "[REDACTED]", "user": "bob"}
    assert redaction.safe_text("the unexpired ones") == "the unexpired ones"
