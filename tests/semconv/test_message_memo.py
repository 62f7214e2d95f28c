"""Message content rendered from memos (items redacted once per set of secrets) is the text
redacting the whole rendered list gives, and never lets a later-learned secret through."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmbagent_otel import redaction
from cmbagent_otel.instrumentation import _messages
from cmbagent_otel.redaction import learn_secret, redact, redact_list

# pieces of text that make redaction matches run past an item's end when items are joined
HOSTILE = ["token: '", "pass: \\\"", "it's", "x'y", "password=", "token=", "}, {", "[", "]", ", ",
           "sk-proj-ABCDEFGHIJKLMNOP12", "Bearer abcdefghijk", "-----BEGIN RSA PRIVATE KEY-----",
           "\u0130stanbul", "\u212aey: 'v", "://u:hunter22@h", "\"", "\\", "api_key: \"", "q", "hello"]
texts = st.lists(st.sampled_from(HOSTILE), max_size=5).map(" ".join)
messages = st.lists(
    st.builds(lambda role, content, name: {"role": role, "content": content, **({"name": name} if name else {})},
              st.sampled_from(["user", "assistant", "tool", "it's", "x\\\"y"]), texts,
              st.sampled_from([None, "bob", "a'b"])),
    min_size=1, max_size=8,
)


# redaction's process-wide secrets state: what a test learns or registers in it
STATE = ("_known", "_learned", "_known_pattern", "_secret_with_comma", "_chunks", "_contexts",
         "_context_pattern", "_whole_pieces", "_split_checked", "_clean_texts", "_heads", "_tails",
         "_open_fragments", "_learned_forms")


def own_state(patch: pytest.MonkeyPatch) -> None:
    """Copies of redaction's secrets state (:data:`STATE`) in its place, until ``patch`` is undone: what
    the test registers or learns (hostile junk among it) is forgotten after it. Results memoised
    before are not used (:func:`fresh`)."""
    for name in STATE:
        value = getattr(redaction, name)
        if isinstance(value, dict):
            value = value.copy()  # keeps the type (OrderedDict)
            for key, item in value.items():
                if isinstance(item, list):  # _heads, _tails: lists appended to in place
                    value[key] = list(item)
        elif isinstance(value, (list, set)):
            value = type(value)(value)
        patch.setattr(redaction, name, value)
    fresh(patch)


def start_clean(patch: pytest.MonkeyPatch) -> None:
    """:func:`own_state`, and without the split-secret pieces earlier tests taught."""
    own_state(patch)
    for name in ("_contexts", "_whole_pieces", "_open_fragments"):
        getattr(redaction, name).clear()
    patch.setattr(redaction, "_context_pattern", None)
    fresh(patch)


@pytest.fixture(autouse=True)
def _own_secrets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    start_clean(monkeypatch)
    yield
    fresh(monkeypatch)


def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results memoised with other secrets forgotten (the version only ever grows)."""
    for cache in redaction._caches:
        monkeypatch.setattr(cache, "_memo", redaction._Memo(redaction._known_pattern))
    redaction.secrets_version += 1


def _items(history: list[dict[str, str]]) -> list[str]:
    return [_messages._dumps(redaction.scrub(_messages.message(m))) for m in history]


@settings(max_examples=300, deadline=None)
@given(messages)
def test_redact_list_is_redacting_the_joined_text(history):
    items = _items(history)
    memoised = redact_list(items)
    # whole text second: a secret only the whole text teaches would show as a difference here
    assert memoised == (redact("[" + ", ".join(items) + "]") or "[]")
    assert redact_list(items) == memoised  # and from the memo


def test_an_open_quote_running_into_the_next_message_is_redacted_as_in_the_whole_text():
    items = _items([{"role": "user", "content": "my token: 'abc"}, {"role": "it's", "content": "hi"}])
    assert redact_list(items) == redact("[" + ", ".join(items) + "]")


def test_a_secret_with_a_comma_is_redacted_across_messages():
    redaction.register_secret("left,right-7c1e")
    items = _items([{"role": "user", "content": "left"}, {"role": "user", "content": "right-7c1e"}])
    joined = "[" + ", ".join(items) + "]"
    assert redact_list(items) == redact(joined)


def test_a_secret_learned_after_the_history_was_rendered_is_redacted_in_it():
    history = [{"role": "user", "content": "the code is qv93-alpha-xx", "name": "bob"},
               {"role": "assistant", "content": "noted"}]
    first, _ = _messages.render(history, 4096, convert=_messages.message)
    assert "qv93-alpha-xx" in first
    history.append({"role": "user", "content": json.dumps({"password": "qv93-alpha-xx"})})
    again, _ = _messages.render(history, 4096, convert=_messages.message)
    assert "qv93-alpha-xx" not in again
    assert learn_secret("qv93-alpha-xx") is False  # learned from the new message, before the old ones were reused
    history[1]["content"] = "noted, thanks"  # changed in place: rendered anew
    assert "noted, thanks" in _messages.render(history, 4096, convert=_messages.message)[0]


def test_a_key_split_between_a_history_already_searched_and_its_new_message_is_caught():
    # the history's texts are searched once; the next call resumes after them, with the end of
    # the last one still in reach of the new message
    history = [{"role": "user", "content": "hello", "name": "bob"},
               {"role": "user", "content": "send it with bAsIc ", "name": "bob"}]
    first, _ = _messages.render(history, 4096, convert=_messages.message)
    assert "bAsIc" in first  # nothing to learn from these texts alone
    history.append({"role": "user", "content": "Zr2Lm9Xc4Vb8Nn1", "name": "bob"})
    again, _ = _messages.render(history, 4096, convert=_messages.message)
    assert "Zr2Lm9Xc4Vb8Nn1" not in again and "hello" in again


def test_a_message_rendered_before_it_became_a_piece_of_a_split_key_is_redacted_after():
    tail = {"role": "user", "content": "Q7wz", "name": "bob"}
    first, _ = _messages.render([tail], 4096, convert=_messages.message)
    assert "Q7wz" in first  # alone it is nothing
    # now the message before it starts a key that it ends: "Q7wz" is a piece of it, redacted
    # where a whole text equals it, also in the piece rendered (and cached) before
    head = {"role": "user", "content": "sk-proj-Ab3dE5gH", "name": "bob"}
    again, _ = _messages.render([head, tail], 4096, convert=_messages.message)
    assert "Q7wz" not in again and "Ab3dE5gH" not in again
