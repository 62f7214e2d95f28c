"""``redaction.scrub_message`` (content capture's scrub of a converted message, issue 13) is
``scrub``: the same copy, and the same secrets learned, for hostile messages in the schema and
for dicts that only look like it (secret-named keys, other keys, other types, deep values)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmbagent_otel import redaction
from cmbagent_otel.instrumentation import _messages

from .test_message_memo import HOSTILE, own_state


def _isolated(scrubber: Callable[[Any], Any], value: Any) -> tuple[Any, list[str], int]:
    """(``scrubber(value)``, the secrets it left learned, the version's step), from the same
    starting state, which is restored after."""
    with pytest.MonkeyPatch.context() as patch:
        own_state(patch)
        before = redaction.secrets_version
        out = scrubber(value)
        return out, sorted(map(str, redaction._learned)), redaction.secrets_version - before


KEYS = ["password", "q", "token", "name", "content", "pass\u200bword"]
texts = st.lists(st.sampled_from([*HOSTILE, "pw-Zq81-long-value", "api_key=pw-Zq81-long-value", "x" * 40]),
                 max_size=4).map(" ".join)
arguments = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
    max_leaves=8,
)
call = st.builds(lambda name, args, call_id: {"id": call_id, "type": "function",
                                               "function": {"name": name, "arguments": args}},
                 texts, st.one_of(arguments.map(json.dumps), texts), st.sampled_from(["c1", "pw-Zq81-long-value"]))
raw_message = st.builds(
    lambda role, content, name, calls, call_id: {
        "role": role, "content": content, **({"name": name} if name else {}),
        **({"tool_calls": calls} if calls else {}), **({"tool_call_id": call_id} if call_id else {})},
    st.sampled_from(["user", "assistant", "tool", "function", "system", None]),
    st.one_of(st.none(), texts, st.lists(st.one_of(texts, st.builds(lambda t: {"type": "text", "text": t}, texts),
                                                   st.just({"type": "image_url", "image_url": {"url": "https://x/y.png"}})),
                                         max_size=3)),
    st.sampled_from([None, "bob", "token: 'x"]), st.lists(call, max_size=2), st.sampled_from([None, "c1", "it's"]),
)
# dicts that only look like the schema: its keys with other types, secret-named and other keys
lookalike = st.dictionaries(
    st.sampled_from(["role", "parts", "name", "content", "password", "api_key", "other", "finish_reason"]),
    st.one_of(texts, arguments, st.lists(st.one_of(st.dictionaries(
        st.sampled_from(["type", "content", "token", "arguments", "response", "id"]), st.one_of(texts, arguments),
        max_size=4), arguments), max_size=3)),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(raw_message.map(_messages.message), raw_message.map(_messages.output_message), lookalike,
                 arguments))
def test_content_scrub_message_is_scrub(value):
    expected = _isolated(redaction.scrub, value)
    assert _isolated(redaction.scrub_message, value) == expected
    json.dumps(expected[0])


def test_content_scrub_message_learns_as_scrub_does_in_order():
    # the password is learned from the tool call's arguments: the name before them is redacted
    # without it by both, the name after them (the message's) with it by both
    value = _messages.message({"role": "assistant", "content": "pw-Zq81-long-value", "name": "pw-Zq81-long-value",
                               "tool_calls": [{"id": "c1", "function": {
                                   "name": "pw-Zq81-long-value", "arguments": '{"password": "pw-Zq81-long-value"}'}}]})
    expected = _isolated(redaction.scrub, value)
    assert expected[0]["name"] == redaction.REDACTED and expected[0]["parts"][0]["content"] == "pw-Zq81-long-value"
    assert _isolated(redaction.scrub_message, value) == expected


def test_content_schema_keys_are_no_secret_names():
    schema = {"role", "parts", "name", "type", "content", "id", "modality", "uri", "finish_reason", "response",
              "arguments"}
    assert schema == redaction._SCHEMA_KEYS
    assert not any(map(redaction.is_secret_key, redaction._SCHEMA_KEYS))
