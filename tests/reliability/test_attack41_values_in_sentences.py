"""Session 41 (39th attack campaign): a secret-named key's value written in a sentence.

* ``the password is <v>``, ``password was <v>``, ``set the API key to <v>``: no ``:`` or ``=``, so no key; the
  value was shown. A name before ``is``, ``was`` or ``to`` now takes a value that cannot be a word of the sentence
  (with a digit, an inner capital or a symbol, at least 6 characters): ``the password is incorrect``, ``the key
  to success``, ``the next token is 'because'`` stay as written.
* A bare value ending a sentence or a clause (``my password: <v>.``, ``token=<v>.``, ``read token: <v>: EOF``) was
  learned with its full stop or colon: a later text quoting the value alone showed it. The value is learned
  without them too.
* An ordinary word as the secret, after a name in prose and followed by more words (``set password: <w> for now``,
  ``INFO token: <w> for user bob``) was redacted there only. It is learned when what follows sets it apart (``for``,
  ``until``, ``as``, ``and``, a bracket or a dash) and no word before it on its line tells of a failure; a
  message's first word stays unlearned (``error reading token: connection refused``, ``your token: please keep it
  safe``).
* Pairs written with ``: `` on one line (``user: bob password: <w> host: db``) read as prose: the value was not
  learned. A bare name after such pairs, whose value ends the line or is followed by another pair, is a key (a
  line telling of a failure stays prose: ``error: read token: connection refused: EOF``).
* Words of state were learned where a name's value stood alone (``error reading token: expired``) or after a log
  line's tag (``[auth] token: expired session``: the tag made the name a key), then redacted in every later text,
  inside longer words ("unexpired"). A word of state (``_STATE_WORD``) after a name in prose is never learned, and a
  tag in brackets before a name counts as a word before it.

The values are this file's own (``isolated_secrets``, ``unlearned_word``).
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _credential() -> str:
    return f"Rw{secrets.token_hex(5)}9q"


@pytest.mark.parametrize("template", [
    "the password is {v} now",
    "Password was {v}",
    "Set the API key to {v}.",
    "the token is now {v}, keep it",
    "my password: {v}.",
    "token={v}.",
    "read token: {v}: connection refused",
    "Your GitHub PAT is {v}!",
])
def test_a_credential_in_a_sentence_is_hidden_there_and_later(template: str) -> None:
    """Fails on 3c387d5: shown in the sentence (no ``:`` or ``=``), or learned with the sentence's end and then
    shown in a later text."""
    value = _credential()
    shown = redaction.safe_text(template.format(v=value)) or ""
    assert value not in shown and redaction.REDACTED in shown
    assert value not in (redaction.safe_text(f"later: {value} again") or "")


@pytest.mark.parametrize(("template", "expected"), [
    ("set password: {w} for now", "set password: [REDACTED] for now"),
    ("2026-12-03 INFO token: {w} for user bob", "2026-12-03 INFO token: [REDACTED] for user bob"),
    ("user: bob password: {w} host: db", "user: bob password: [REDACTED] host: db"),
    ("user: bob password: {w}", "user: bob password: [REDACTED]"),
])
def test_an_ordinary_word_as_the_secret_is_learned(template: str, expected: str) -> None:
    """Fails on 3c387d5 (redacted where they stand and shown in a later text): the rest of each sentence stays
    readable."""
    word = unlearned_word("Sw")
    assert redaction.safe_text(template.format(w=word)) == expected
    assert word not in (redaction.safe_text(f"later: {word} again") or "")


@pytest.mark.parametrize("template", [
    "[auth] token: {w} session",
    "(vault) password: {w} denied",
    "error: read token: {w} refused: EOF",
    "error reading token: {w} refused for user bob",
    "InvalidApiKeyError: {w} for this project",
])
def test_a_messages_first_word_is_still_not_learned(template: str) -> None:
    """The first two fail on 3c387d5 (a tag in brackets made the name a key: the word learned, redacted in a later
    text); the others pin the messages that stay unlearned. (``your token: <w> keep it safe`` was one: session 43
    learns a word followed by ``keep it``, see ``test_attack43_words_in_prose.py``.)"""
    word = unlearned_word("Mw")
    redaction.safe_text(template.format(w=word))
    later = f"the server said {word}s twice"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("text", [
    "[auth] token: expired session",
    "error reading token: expired",
    "refresh token: revoked",
    "the api token is invalid",
    "your api key: optional for now (leave it blank)",
    "Expected api key: example and token: placeholder, for now",
])
def test_a_word_of_state_is_not_learned(text: str) -> None:
    """The first three fail on 3c387d5: the state word learned, and a later text lost it inside a longer word."""
    redaction.safe_text(text)
    later = "kept the unexpired, unrevoked, validinvalid, optionally examples and placeholders"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("text", [
    "the password is incorrect",
    "the key to success is practice",
    "the token was revoked by admin",
    "Password is required for user bob",
    "the secret is out",
    "the API key is 12 characters too short",
    "the predicted token is 'because' and the next token is 'therefore'",
    "the secret is `normalize_data()` before fitting",
    "the pwd is /work/project_2 and the first pass is 2nd_order",
])
def test_a_sentence_about_a_credential_stays_as_written(text: str) -> None:
    """Both directions: ``is`` / ``was`` / ``to`` after a name take no ordinary word (nor a short value)."""
    assert redaction.safe_text(text) == text
