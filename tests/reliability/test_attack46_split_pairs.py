"""Session 46 (46th attack campaign): a secret-named ``key: value`` pair cut between two texts of one history.

A message (or a content part) ending with a credential's name and its separator, the value starting the next one
(``... api_key=`` | ``<v> for it``), or a value cut inside (``password=Zorbq`` | ``7xkLmw and more``), or prose
naming it (``my password is`` | ``<v>``): each text alone shows no pair, or only its start, and the value (or its
rest) was shown there and in every later text. The split search (``learn_split_texts``: a chat's history, the DAG's
and the spill's items) now reads the pairs that cross a boundary too and learns the value, and its pieces in each
text.

Both directions: a whole value followed by a message starting with a word (``password=<v>`` | ``Thanks, done``)
teaches no "Thanks"; a name and a word of state across a boundary (``the token is`` | ``expired now``) nothing.
"""

from __future__ import annotations

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _learned_from(texts: list[str]) -> None:
    redaction.learn_split_secrets(texts)


@pytest.mark.parametrize(("before", "after"), [
    ("please deploy with api_key=", "{v} for it"),
    ("please deploy with api_key: ", "{v}"),
    ('{{"db": "main", "password": ', '"{v}"}}'),
    ("the config has DB_PASSWORD", "={v}\nDB_HOST=db"),
    ("my password is", "{v}"),
    ("the new token is:", " {v}"),
], ids=["equals", "colon", "json", "name-cut", "prose", "prose-colon"])
def test_a_value_starting_the_next_text_is_learned(before: str, after: str) -> None:
    """Fails on main (6 of 6): the next text, and every later one, showed the value."""
    value = unlearned_word("Kq") + "7"
    texts = [before, after.format(v=value)]
    _learned_from(texts)
    assert value not in (redaction.safe_text(texts[1]) or "")
    assert redaction.safe_text(f"later {value} again") == "later [REDACTED] again"


@pytest.mark.parametrize("cut", [5, 7])
def test_a_value_cut_inside_is_learned_with_its_pieces(cut: int) -> None:
    """Fails on main (2 of 2): ``password=Zorbq`` | ``7xkLmw and more`` showed ``7xkLmw`` and, later, the whole
    value (a first piece shorter than a learned value was replaced where it stood, not learned)."""
    value = "Zq" + unlearned_word("v")[:6] + "7xkLmw"
    head, rest = value[:cut], value[cut:]
    texts = [f"connect with password={head}", f"{rest} and more"]
    _learned_from(texts)
    assert rest not in (redaction.safe_text(texts[1]) or "")
    assert redaction.safe_text(f"later {value}") == "later [REDACTED]"


def test_the_pair_is_found_in_a_chats_history() -> None:
    """Fails on main: the instrumentation's rendering of a chat's history (``render`` of AG2 messages) left the
    whole history out: the key/value scan of its JSON took the quote ending the first message's text for the
    value's and replaced up to the next message's first quote (the JSON broke). Now the history is kept, with the
    value starting the second message redacted (learned by the split search)."""
    from cmbagent_otel.instrumentation import _messages

    value = unlearned_word("Hx") + "4"
    history = [{"role": "user", "content": "use this api_key="}, {"role": "user", "content": f"{value} and run"}]
    text, _ = _messages.render(history, 4096, convert=_messages.message)
    assert value not in text and "[REDACTED] and run" in text and "use this api_key=" in text


@pytest.mark.parametrize(("texts", "later"), [
    (["password={v}", "Thanks, done"], "Thanks"),
    (["the token is", "expired now"], "expired"),
    (["the api key is", "missing from the config"], "missing"),
    (["a path: /work/key=", "value and more"], "value"),
    (["nothing here", "at all today"], "today"),
])
def test_ordinary_next_texts_are_not_learned(texts: list[str], later: str) -> None:
    """Both directions (held up on main): a message after a whole value, a word of state or an ordinary word after
    a name in prose across a boundary, and a code-like name, teach nothing."""
    value = unlearned_word("Wz") + "5"
    _learned_from([text.format(v=value) for text in texts])
    assert redaction.safe_text(f"later {later} here") == f"later {later} here"
