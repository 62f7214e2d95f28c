"""Session 47 (47th attack campaign): a key's shape cut at a boundary between two texts of one history, the next
text starting with a word.

``sk-proj-<key>`` | ``Thanks for that``: the shape's pattern, run over the two texts joined, went on through
"Thanks" (letters are a key's characters), and the split search learned the piece after the boundary: "Thanks"
(``Wonderful``, ``Sure``...) was redacted in every later text, inside longer words too. The key itself is whole in
its own text and found there. A piece after the boundary that is a word (capitalised or not) is no key's rest now;
one that looks random (digits, capitals inside, all capitals) still is: a key really cut in two is learned.
"""

from __future__ import annotations

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")

KEYS = {
    "openai": "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12",
    "anthropic": "sk-ant-api03-Ab12Cd34Ef56Gh78Ij90",
    "github": "ghp_Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56",
}


@pytest.mark.parametrize("word", ["Thanks", "Wonderful day", "thanks, done", "Absolutely"])
@pytest.mark.parametrize("key", KEYS.values(), ids=KEYS.keys())
def test_a_whole_key_then_a_message_starting_with_a_word_teaches_no_word(key: str, word: str) -> None:
    """Fails on main (12 of 12): the word was learned and redacted in every later text."""
    redaction.learn_split_texts([f"use {key}", word])
    first = word.split()[0].strip(",")
    assert redaction.redact(f"{first} again") == f"{first} again"
    assert redaction.redact(f"use {key}") == "use [REDACTED]"


CUT = {
    "digits": (["use sk-proj-Ab12Cd34", "Ef56Gh78Ij90Kl and more"], "Ef56Gh78Ij90Kl"),
    "capitals": (["use AKIAABCDEFGHIJ", "KLMNOP now"], "KLMNOP"),
    "inner-capital": (["use ghp_Ab12Cd34Ef56Gh78Ij90", "KlMnOpQrStUvWx then"], "KlMnOpQrStUvWx"),
}


@pytest.mark.parametrize("texts, rest", CUT.values(), ids=CUT.keys())
def test_a_key_really_cut_in_two_is_still_learned(texts: list[str], rest: str) -> None:
    """Passes on main too: a rest that looks random is a key's, learned with its start."""
    redaction.learn_split_texts(texts)
    assert redaction.redact(f"later {rest} again") == "later [REDACTED] again"
