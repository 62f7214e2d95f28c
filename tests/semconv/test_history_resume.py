"""A chat history rendered again, grown by a few messages, is resumed from its earlier rendering
(``_messages._render_history``): the text and the messages left out are what the general way
gives, and a secret registered or learned after the earlier rendering is redacted in the old
messages too."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmbagent_otel import redaction
from cmbagent_otel.instrumentation import _messages

from .test_message_memo import HOSTILE, fresh, start_clean

texts = st.lists(st.sampled_from([*HOSTILE, "x" * 300, "lorem ipsum " * 20]), max_size=5).map(" ".join)
message = st.builds(
    lambda role, content, name, call: {"role": role, "content": content, **({"name": name} if name else {}),
                                       **({"tool_calls": [call]} if call else {})},
    st.sampled_from(["user", "assistant", "tool", "it's"]), texts, st.sampled_from([None, "bob", "a'b"]),
    st.sampled_from([None, {"id": "c1", "type": "function",
                            "function": {"name": "f", "arguments": json.dumps({"password": "pw-7Yq2-long"})}}]),
)


@pytest.fixture(autouse=True)
def _own_secrets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    start_clean(monkeypatch)
    yield
    fresh(monkeypatch)


def general(history: list[dict[str, object]], bound: int) -> tuple[str, int]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_messages, "_render_history", lambda items, bound: False)
        return _messages.render(history, bound, convert=_messages.message)


@settings(max_examples=150, deadline=None)
@given(st.lists(message, min_size=1, max_size=14), st.sampled_from([600, 1500, 4096]))
def test_a_growing_history_resumed_renders_what_the_general_way_does(history, bound):
    for end in range(1, len(history) + 1):
        fast = _messages.render(history[:end], bound, convert=_messages.message)
        assert _messages.render(history[:end], bound, convert=_messages.message) == fast  # the same again
        assert fast == general(history[:end], bound)
        json.loads(fast[0])
        assert len(fast[0]) <= bound
    assert "pw-7Yq2-long" not in _messages.render(history, bound, convert=_messages.message)[0]


def test_the_resumed_way_is_taken_when_older_messages_are_left_out():
    history = [{"role": "user", "content": f"message {n} " + "words " * 40, "name": "bob"} for n in range(30)]
    for end in range(1, 31):
        out = _messages._render_history(history[:end], 2048)
        assert isinstance(out, tuple), end
    assert out[1] > 0  # older messages left out
    assert json.loads(out[0])[-1]["parts"][0]["content"].startswith("message 29 ")


@pytest.mark.parametrize("bound", [4096, 700])
def test_a_secret_registered_after_the_history_was_rendered_is_redacted_in_its_old_messages(bound):
    history = [{"role": "user", "content": "deploy with Zx81-quill-Harbor-7731", "name": "bob"},
               {"role": "assistant", "content": "done " * 20}]
    first, _ = _messages.render(history, bound, convert=_messages.message)
    assert "Zx81-quill-Harbor-7731" in first  # nothing marks it a secret yet
    redaction.register_secret("Zx81-quill-Harbor-7731")
    history.append({"role": "user", "content": "and again " * 5, "name": "bob"})
    again, _ = _messages.render(history, bound, convert=_messages.message)
    assert "Zx81-quill-Harbor-7731" not in again and "and again" in again


@pytest.mark.parametrize("bound", [4096, 700])
def test_a_secret_learned_from_a_new_message_is_redacted_in_the_resumed_ones(bound):
    history = [{"role": "user", "content": "the code is Wq55-orbit-Lantern", "name": "bob"},
               {"role": "assistant", "content": "ok " * 30}]
    first, _ = _messages.render(history, bound, convert=_messages.message)
    assert "Wq55-orbit-Lantern" in first
    history.append({"role": "user", "content": json.dumps({"password": "Wq55-orbit-Lantern"}), "name": "bob"})
    again, _ = _messages.render(history, bound, convert=_messages.message)
    assert "Wq55-orbit-Lantern" not in again and "the code is" in again


def test_a_message_left_out_of_a_resumed_history_still_teaches_its_secret():
    # message() keeps no "api_key" field, so only reading the left-out message learns it
    history = [{"role": "user", "content": "hello", "name": "bob", "api_key": "Kd93-velvet-Anchor-204"},
               {"role": "assistant", "content": "filler " * 60}]
    for _ in range(6):
        _messages.render(history, 700, convert=_messages.message)
        history.append({"role": "assistant", "content": "filler " * 60})
    history.append({"role": "user", "content": "it was Kd93-velvet-Anchor-204", "name": "bob"})
    text, dropped = _messages.render(history, 700, convert=_messages.message)
    assert dropped and "it was" in text and "Kd93-velvet-Anchor-204" not in text


def test_copies_of_a_message_share_its_piece_and_different_messages_never_do():
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]
    first = {"role": "assistant", "content": None, "tool_calls": calls, "name": "eng"}
    copy = dict(first)  # AG2 copies a message into each recipient's history, its values shared
    other = {**first, "tool_calls": [{**calls[0], "function": {"name": "f", "arguments": "{\"x\": 2}"}}]}
    assert _messages._piece(first, _messages.message) == _messages._piece(copy, _messages.message)
    assert "\\\"x\\\": 2" not in _messages._piece(copy, _messages.message)[1]
    assert '"x": 2' in _messages._piece(other, _messages.message)[1]
    # output messages are built afresh for each span: their text parts are compared by value
    one = _messages.output_message({"role": "assistant", "content": "peak near l=220"})
    two = _messages.output_message({"role": "assistant", "content": "peak near l=540"})
    assert "l=220" in _messages.render([one])[0] and "l=540" in _messages.render([two])[0]
    redaction.register_secret("peak near l=220")
    again = _messages.output_message({"role": "assistant", "content": "peak near l=220"})
    assert "l=220" not in _messages.render([again])[0]
    assert "l=220" not in _messages._piece(again, None)[1]  # the piece itself, made again with the secret


@pytest.mark.parametrize("bound", [4096, 700])
def test_the_same_history_again_after_a_secret_was_registered_is_redacted(bound):
    history = [{"role": "user", "content": "deploy with Pq62-ember-Willow-5120", "name": "bob"},
               {"role": "assistant", "content": "done " * 40}]
    assert "Pq62-ember-Willow-5120" in _messages.render(history, bound, convert=_messages.message)[0]
    redaction.register_secret("Pq62-ember-Willow-5120")
    again, _ = _messages.render(history, bound, convert=_messages.message)  # the same messages, nothing new
    assert "Pq62-ember-Willow-5120" not in again and "done" in again
