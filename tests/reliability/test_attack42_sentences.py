"""Session 42 (40th attack campaign): credentials in sentences, session 41's leftovers.

* ``the password is swordfish``: an ordinary word after ``is`` / ``was`` / ``set ... to`` was never taken (it can be a
  word of the sentence: ``the password is incorrect``), so a password that is one was shown there and in every later
  text. It is taken now when it ends its clause, follows a credential's name that is no ordinary word (not ``token``:
  ``the first token is hello``) and is no word a sentence says of a credential (a word of state, an adjective's or
  a participle's ending, ``something``, ``because``...).
* ``token hunter2 expired yesterday``: a credential after its name with no ``:`` or ``=`` was shown. It is taken when
  it cannot be a word (a letter and a digit, 6 characters or more), is no term of the trade (``password sha256 hash``)
  and ends its clause or is followed by what is said of it (``expired``, ``was``).

Both directions: the secret gone there and in a later text, the sentence around it kept. The values are this file's
own (``isolated_secrets``, ``unlearned_word``).
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize(("template", "expected"), [
    ("the password is {w}", "the password is [REDACTED]"),
    ("The password was '{w}', keep it", "The password was '[REDACTED]', keep it"),
    ("Set the DB password to {w} for now", "Set the DB password to [REDACTED] for now"),
    ("the new api key is now {w}\nthanks", "the new api key is now [REDACTED]\nthanks"),
    ("Your password is: {w} and the user is bob", "Your password is: [REDACTED] and the user is bob"),
])
def test_an_ordinary_word_as_the_password_in_a_sentence_is_hidden_there_and_later(template: str,
                                                                                   expected: str) -> None:
    """Fails on 4a0d79e (5 of 5): the word shown in the sentence, and in a later text."""
    word = unlearned_word("Pw")
    assert redaction.safe_text(template.format(w=word)) == expected
    assert word not in (redaction.safe_text(f"later: {word} again") or "")


@pytest.mark.parametrize("text", [
    "the password is incorrect",
    "the password is required.",
    "the password is hashed",
    "the password is something else",
    "the password is different from the username",
    "the password is confidential.",
    "the password is case-sensitive",
    "the password is stored encrypted",
    "you need the password to continue.",
    "the password to unlock the vault",
    "the first token is hello",
    "the next token is because",
    "the secret is elsewhere",
    "the api key is correct",
    "the password is Password",
])
def test_a_sentence_saying_something_of_a_credential_stays_as_written(text: str) -> None:
    """Both directions: these words are the sentence's (state, participles, adjectives, infinitives, a token of a
    model's text), neither hidden nor learned."""
    assert redaction.safe_text(text) == text
    later = "hello continue elsewhere Password something different encrypted unlock"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize(("template", "expected"), [
    ("token {v} expired yesterday", "token [REDACTED] expired yesterday"),
    ("the password {v} was rejected", "the password [REDACTED] was rejected"),
    ("use api token {v} for now", "use api token [REDACTED] for now"),
    ("my password {v}.", "my password [REDACTED]"),
])
def test_a_credential_after_its_name_without_a_separator_is_hidden_there_and_later(template: str,
                                                                                    expected: str) -> None:
    """Fails on 4a0d79e (4 of 4): the value shown there and later."""
    value = f"hunter{secrets.randbelow(10**6)}x"
    assert redaction.safe_text(template.format(v=value)) == expected
    assert value not in (redaction.safe_text(f"later: {value} again") or "")


@pytest.mark.parametrize("text", [
    "password sha256 hash is stored",
    "auth oauth2 flow is used",
    "the token gpt4o-mini is cheaper",
    "token 50256 is the end of text",
    "the token limit4096 setting",
])
def test_terms_of_the_trade_after_a_name_stay_as_written(text: str) -> None:
    """Both directions: algorithms, model names, numbers and a word that a verb does not follow are no credentials."""
    assert redaction.safe_text(text) == text
    later = "sha256 oauth2 gpt4o-mini 50256 limit4096"
    assert redaction.safe_text(later) == later
