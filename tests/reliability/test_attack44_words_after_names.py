"""Session 44 (44th attack campaign): a credential's value after its owner's name, a message's first word quoted twice,
and passwords with an adjective's ending.

* ``password for alice: <v>``, ``Password for 'https://bob@github.com': <v>`` (git's prompt), ``the password for user
  bob: <v>``: the words between the name and ``:`` made it neither a key nor a name in prose, and the value was
  shown, there and in every later text, with a digit or without. Read as a name in prose now: a value alone is
  learned, a message's first word only replaced.
* A message's first word after a name in prose (``error reading token: <w> refused by the peer``) is replaced there
  and not learned (in ordinary text it is the message's: session 43's corpus count); where the same text quoted it
  again it was shown. Every whole occurrence in that text is replaced now; later texts still show it.
* ``the password is Blessing``, ``... is 'darling'``, ``set the DB password to twisted``, ``... is butterfly``: a
  word ending in -ed, -ing, -ly... was taken for a word of the sentence (``the password is hashed``) even quoted,
  capitalised as a name or after "set ... to"; such passwords, among the most used, were shown. A lower-case
  participle ending its clause after "is" (``the password is unleashed``) stays shown: in ~5,000 files of ordinary
  text 138 words after a credential's name and "is" had such an ending, every one a word of the sentence.

Both directions. The values are this file's own (``isolated_secrets``, ``unlearned_word``).
"""

from __future__ import annotations

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize(("template", "expected"), [
    ("password for alice: {w}", "password for alice: [REDACTED]"),
    ("password for alice: {w}7x", "password for alice: [REDACTED]"),
    ("Password for 'https://bob@github.com': {w}", "Password for 'https://bob@github.com': [REDACTED]"),
    ("the password for user bob: {w}", "the password for user bob: [REDACTED]"),
    ("API key of the staging: {w}, keep it safe", "API key of the staging: [REDACTED], keep it safe"),
])
def test_a_value_after_its_owners_name_is_learned(template: str, expected: str) -> None:
    """Fails on main (5 of 5): shown where it stood and in a later text."""
    assert_learned(template, expected)


def assert_learned(template: str, expected: str) -> None:
    """``template`` with a fresh word for ``{w}`` redacts to ``expected``, and a later text quoting the value (the
    word and what follows it up to a blank, a comma or a sentence's end) alone is redacted too."""
    word = unlearned_word("Ow")
    text = template.format(w=word)
    assert redaction.safe_text(text) == expected
    secret = word + template.partition("{w}")[2].split(" ")[0].split(",")[0].rstrip(".")
    assert redaction.safe_text(f"later {secret} again") == "later [REDACTED] again"


@pytest.mark.parametrize("template", [
    "token for alice: {w} refused by the peer",
    "[sudo] password for alice: {w} expired, contact the admin",
])
def test_a_messages_first_word_after_an_owners_name_is_not_learned(template: str) -> None:
    """Fails on main (2 of 2: shown, the value not even replaced there); not learned either way."""
    word = unlearned_word("Mo")
    assert word not in (redaction.safe_text(template.format(w=word)) or "")
    later = f"the {word} is listed"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("template", [
    "error reading token: {w} refused by the peer; {w} retried",
    "Your API key: {w} lets you in ({w}: keep it to yourself)",
    "{w} again: error reading token: {w} refused by the peer",
])
def test_a_messages_first_word_is_replaced_everywhere_in_its_text(template: str) -> None:
    """Fails on main (3 of 3): replaced at the name only, shown where the same text quoted it again. Not learned:
    a later text shows it."""
    word = unlearned_word("Tw")
    assert word not in (redaction.safe_text(template.format(w=word)) or "")
    later = f"the {word} is listed"
    assert redaction.safe_text(later) == later


def test_a_word_replaced_in_its_text_leaves_longer_words_alone() -> None:
    """Only whole occurrences: a word holding it, or a path or name it is part of, stays as written."""
    word = unlearned_word("Lw")
    text = f"error reading token: {word} refused; {word}s, {word}-x and a.{word} stay"
    assert redaction.safe_text(text) == f"error reading token: [REDACTED] refused; {word}s, {word}-x and a.{word} stay"


@pytest.mark.parametrize(("text", "secret"), [
    ("the password is Blessing", "Blessing"),
    ("the password is 'blessing'.", "blessing"),
    ('The admin password is "darling"', "darling"),
    ("Set the DB password to twisted.", "twisted"),
    ("the password is set to pudding", "pudding"),
    ("my password is butterfly", "butterfly"),
    ("the password is Dragonfly.", "Dragonfly"),
])
def test_a_password_with_an_adjectives_ending_is_learned_where_it_is_one(text: str, secret: str) -> None:
    """Fails on main (7 of 7): shown there and in a later text."""
    assert secret not in (redaction.safe_text(text) or "")
    assert redaction.safe_text(f"later {secret} again") == "later [REDACTED] again"


@pytest.mark.parametrize("text", [
    "the password is hashed",
    "the password is Required.",
    "The Password Is Protected",
    "the password is Hashed with bcrypt",
    "the password is unleashed",
    "the password is encrypted.",
    "the session token is 'because'",
])
def test_a_word_of_the_sentence_after_is_stays(text: str) -> None:
    """Both directions (held up on main): a word the sentence says of the credential is neither replaced nor
    learned (a lower-case participle is still read so, the corpus's decision)."""
    assert redaction.safe_text(text) == text


@pytest.mark.parametrize(("template", "expected"), [
    ("the password was changed to {w}7", "the password was changed to [REDACTED]"),
    ("the DB password was changed to {w}.", "the DB password was changed to [REDACTED]"),
    ("the API token has been reset to {w}9x", "the API token has been reset to [REDACTED]"),
    ("the password is now set to {w}", "the password is now set to [REDACTED]"),
])
def test_a_value_after_was_changed_to_is_learned(template: str, expected: str) -> None:
    """Fails on main (4 of 4): "was" + "changed" read as a word of state, the value shown there and later."""
    assert_learned(template, expected)


@pytest.mark.parametrize("text", [
    "the password was changed to something else",
    "the password was changed to meet the policy",
    "the api key has been updated to the new one",
    "the token was changed to expired",
])
def test_a_sentence_after_was_changed_to_stays(text: str) -> None:
    """Both directions (held up on main): words of the sentence stay."""
    assert redaction.safe_text(text) == text
