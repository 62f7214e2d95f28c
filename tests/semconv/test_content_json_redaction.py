"""Why content capture redacts each message's JSON text again after :func:`redaction.scrub`
redacted its strings (issue 13: the largest per-message cost left).

``scrub`` redacts strings one by one and decides secret-named dict keys by their exact name
(:func:`redaction.is_secret_key`); the JSON text joins keys and values, so its redaction also
finds a key disguised with invisible, fullwidth, look-alike or Unicode tag characters (folded
before the key/value scan) and a secret a later field of the same message taught (a tool named
after a password stated in its own arguments: since session 33 also caught by rendering again
when a rendering learned a secret), and a key/value pair made of two text parts
(``password=`` then the value: the content is left out). Each case below leaks when the second redaction
is skipped (``skip_second``) and is redacted with it; the other JSON-only forms (escaped quotes,
a JSON unicode escape written as text, JSON inside a string) are pinned as redacted either way
(see docs/reliability.md, "Issue 13, content capture (session 31, second part)").
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from cmbagent_otel import redaction
from cmbagent_otel.instrumentation import _messages

from .test_message_memo import fresh


@pytest.fixture(autouse=True)
def _fresh_memos(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fresh(monkeypatch)
    yield
    fresh(monkeypatch)


def _value() -> str:
    return "hx" + secrets.token_hex(10)  # no secret shape: found only as a secret-named key's value


def _call(arguments: dict[str, Any], name: str = "fetch") -> dict[str, Any]:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function",
                            "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def _rendered(history: list[dict[str, Any]]) -> str:
    return _messages.render(history, 4096, convert=_messages.message)[0]


def _skip_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendering with each piece's JSON text joined as ``scrub`` left it (the change this
    file guards against)."""
    monkeypatch.setattr(_messages, "_render_history", lambda items, bound: False)
    monkeypatch.setattr(_messages, "redact_list", lambda items: "[" + ", ".join(items) + "]")


# dict keys scrub does not recognise as written: the JSON text's redaction folds them
DISGUISED_KEYS = {
    "zero-width space": "pass\u200bword",
    "fullwidth": "\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44",
    "cyrillic a": "p\u0430ssword",
    "unicode tags": "pass\U000e0077ord",
    "soft hyphen": "api\u00ad_key",
}


@pytest.mark.parametrize("key", DISGUISED_KEYS.values(), ids=DISGUISED_KEYS.keys())
def test_content_a_disguised_secret_key_in_tool_arguments_is_redacted(key: str) -> None:
    value = _value()
    for history in ([_call({key: value})], [{"role": "user", "content": "hi"}, _call({"cfg": {key: value}})]):
        text = _rendered(history)
        json.loads(text)
        assert value not in text, text


def _across_parts(value: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": "password="}, {"type": "text", "text": value}]}


def test_content_a_pair_from_two_text_parts_is_kept_with_the_value_redacted() -> None:
    value = _value()
    # the pair cut between two parts is learned (46th attack campaign): the content stays whole and
    # valid, the value redacted in its own part (before, the key/value scan broke the JSON and the
    # content was left out)
    rendered = _rendered([_across_parts(value)])
    assert value not in rendered
    parts = json.loads(rendered)[0]["parts"]
    assert [part["content"] for part in parts] == ["password=", "[REDACTED]"]


# (a pair cut across two parts is no longer among them: it is learned where it is cut, 46th attack campaign)
@pytest.mark.parametrize("make", [lambda v, k=k: _call({k: v}) for k in DISGUISED_KEYS.values()],
                         ids=list(DISGUISED_KEYS.keys()))
def test_content_json_only_forms_leak_without_the_second_redaction(
        monkeypatch: pytest.MonkeyPatch, make: Any) -> None:
    value = _value()
    _skip_second(monkeypatch)
    assert value in _rendered([make(value)])


def test_content_a_secret_taught_by_a_later_field_of_the_same_message_is_redacted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    password = "pw" + secrets.token_hex(8)
    history = [_call({"password": password}, name=f"login_{password}")]
    assert password not in _rendered(history)
    fresh(monkeypatch)
    redaction._learned.pop(password, None)
    _skip_second(monkeypatch)
    password = "pw" + secrets.token_hex(8)  # a value not learned yet
    # also without the second redaction: rendering learned the password, so the message is rendered
    # again (``render``), and the tool name made before it was learned is redacted too
    assert password not in _rendered([_call({"password": password}, name=f"login_{password}")])


# JSON-only forms the strings' own redaction already covers: redacted with or without the second
@pytest.mark.parametrize("skip", [False, True], ids=["as built", "second skipped"])
@pytest.mark.parametrize("make", [
    lambda v: {"role": "user", "content": f'use {{"password": "ab\\"cd{v}"}} please'},  # escaped quote
    lambda v: {"role": "user", "content": f'{{\\"password\\": \\"{v}\\"}}'},  # escaped twice
    lambda v: {"role": "user", "content": f"pass\\u0077ord={v}"},  # a JSON unicode escape, as text
    lambda v: _call({"cfg": json.dumps({"api_key": v})}),  # JSON inside a string value
    lambda v: _call({"password": v}),  # a secret-named key as written
    lambda v: {"role": "user", "content": f"token: {v}", "name": "bob"},
], ids=["escaped-quote", "escaped-twice", "unicode-escape", "nested-json", "plain-key", "key-colon"])
def test_content_json_forms_the_strings_redaction_covers(monkeypatch: pytest.MonkeyPatch, make: Any,
                                                         skip: bool) -> None:
    value = _value()
    if skip:
        _skip_second(monkeypatch)
    text = _rendered([make(value)])
    json.loads(text)
    assert value not in text, text


@pytest.mark.parametrize("key", ["Authorization ", "AUTHORIZATION  ", "proxy-authorization ", " token ", "api_key\t"])
def test_content_a_secret_key_padded_with_white_space_is_redacted(key: str) -> None:
    # "Authorization " was neither a secret-named key to scrub() nor a key/value pair to the
    # JSON text's redaction: its value was shown, in message content and in tool arguments
    value = _value()
    assert redaction.is_secret_key(key)
    assert value not in _rendered([_call({key: value})])
    assert value not in _messages.render_value({key: value})
