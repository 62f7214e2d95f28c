"""Message content rendered from memos (items redacted once per set of secrets) is the text
redacting the whole rendered list gives, and never lets a later-learned secret through."""

from __future__ import annotations

import json

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


@pytest.fixture(autouse=True)
def _own_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """What these tests register or learn (hostile junk among it) is forgotten after each."""
    for name in ("_known", "_learned", "_known_pattern", "_secret_with_comma", "_chunks", "_contexts",
                 "_context_pattern", "_whole_pieces", "_split_checked", "_clean_texts", "_heads", "_tails"):
        value = getattr(redaction, name)
        if isinstance(value, dict):
            value = value.copy()  # keeps the type (OrderedDict)
            for key, item in value.items():
                if isinstance(item, list):  # _heads, _tails: lists appended to in place
                    value[key] = list(item)
        monkeypatch.setattr(redaction, name, value)


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
