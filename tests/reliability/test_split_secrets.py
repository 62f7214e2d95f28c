"""A secret split in two: across two text parts of one message, or across two messages of one
model call. Neither half is a registered secret or has a secret's shape, so each half used to
reach the recorded messages on its own; both must be redacted in spans, events, logs and rows."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from autogen import ConversableAgent

from cmbagent_otel import redaction
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

from .test_secrets import Sink, assert_clean, instrument, new_markers, sink  # noqa: F401  (fixture)


def _assistant(config: dict[str, Any]) -> ConversableAgent:
    agent = ConversableAgent("assistant", llm_config={"config_list": [config], "cache_seed": None},
                             human_input_mode="NEVER")
    agent.register_model_client(ScriptedModelClient, script=["noted"])
    return agent


@pytest.mark.parametrize("split", ["content-parts", "two-messages"])
@pytest.mark.parametrize("which", ["shaped", "registered"])
def test_secret_split_in_two_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                          split: str, which: str) -> None:
    shaped, shapeless = new_markers()
    secret = shaped if which == "shaped" else shapeless
    config = {"model": "scripted", client_key(): "ScriptedModelClient"}
    if which == "registered":
        redaction.register_secret(secret)
    instrument(sink)
    assistant = _assistant(config)
    half = len(secret) // 2
    first, second = secret[:half], secret[half:]
    if split == "content-parts":
        messages = [{"role": "user", "content": [{"type": "text", "text": f"my key: {first}"},
                                                 {"type": "text", "text": f"{second} thanks"}]}]
    else:
        messages = [{"role": "user", "content": f"my key: {first}"},
                    {"role": "user", "content": f"{second} thanks"}]
    reply = assistant.generate_reply(messages=messages)
    assert reply == "noted" or (isinstance(reply, dict) and reply.get("content") == "noted")
    assert messages[0]["content"] and messages[-1]["content"]  # the app's messages are unchanged
    assert_clean(sink, caplog, first, second)


def test_registered_secret_split_across_two_model_calls_is_redacted(sink: Sink,  # noqa: F811
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The first half is recorded before the second half exists: it is caught as the start of a
    registered secret, the second half as its end."""
    _, secret = new_markers()
    redaction.register_secret(secret)
    instrument(sink)
    assistant = _assistant({"model": "scripted", client_key(): "ScriptedModelClient"})
    half = len(secret) // 2
    first, second = secret[:half], secret[half:]
    assistant.generate_reply(messages=[{"role": "user", "content": f"my key starts {first}"}])
    assistant.generate_reply(messages=[{"role": "user", "content": f"{second} is the rest"}])
    assert_clean(sink, caplog, first, second)


def _distinct_marker(shaped: bool) -> str:
    """A marker whose first and last few characters occur nowhere else (ids are hex or base64)."""
    body = f"QZXW{secrets.token_hex(10)}WXZQ"
    return f"sk-{body}" if shaped else body


def _secret_and_assistant(sink: Sink, which: str) -> tuple[str, ConversableAgent]:  # noqa: F811
    """A distinct secret (``which``: a key shape, or "registered"), the sink instrumented, and an
    assistant to send it to."""
    secret = _distinct_marker(which == "shaped")
    if which == "registered":
        redaction.register_secret(secret)
    instrument(sink)
    return secret, _assistant({"model": "scripted", client_key(): "ScriptedModelClient"})


def _recorded_content(where: Sink) -> str:
    where.provider.force_flush()
    return "\n".join(str(value) for span in where.memory.get_finished_spans()
                     for key, value in (span.attributes or {}).items() if "messages" in key)


@pytest.mark.parametrize("piece", ["short-start", "short-end", "short-start-alone", "short-end-alone"])
@pytest.mark.parametrize("split", ["content-parts", "two-messages"])
@pytest.mark.parametrize("which", ["shaped", "registered"])
def test_piece_under_six_characters_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                piece: str, split: str, which: str) -> None:
    """A piece of a split secret under 6 characters is redacted with the characters next to it in
    its text, or as a whole string when it is the whole text (it used to stay in the record)."""
    secret, assistant = _secret_and_assistant(sink, which)
    cut = 5 if piece.startswith("short-start") else len(secret) - 4
    first, second = secret[:cut], secret[cut:]
    alone = piece.endswith("alone")
    before = first if alone and piece.startswith("short-start") else f"my key: {first}"
    after = second if alone and piece.startswith("short-end") else f"{second} thanks a lot"
    if split == "content-parts":
        messages = [{"role": "user", "content": [{"type": "text", "text": before}, {"type": "text", "text": after}]}]
    else:
        messages = [{"role": "user", "content": before}, {"role": "user", "content": after}]
    assistant.generate_reply(messages=messages)
    short = first if piece.startswith("short-start") else second
    assert len(short) < 6
    assert_clean(sink, caplog, first, second, short)
    recorded = _recorded_content(sink)
    assert "REDACTED" in recorded
    kept = [word for word, there in (("my key", piece != "short-start-alone"), ("a lot", piece != "short-end-alone"))
            if there]
    assert all(word in recorded for word in kept)  # only the secret's characters and their neighbours go


@pytest.mark.parametrize("split", ["content-parts", "messages"])
@pytest.mark.parametrize("which", ["shaped", "registered"])
def test_secret_split_in_three_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                           split: str, which: str) -> None:
    """No two consecutive texts hold the whole secret: the search spans several texts."""
    secret, assistant = _secret_and_assistant(sink, which)
    third = len(secret) // 3
    pieces = [secret[:third], secret[third:2 * third], secret[2 * third:]]
    texts = [f"my key: {pieces[0]}", pieces[1], f"{pieces[2]} thanks"]
    if split == "content-parts":
        messages = [{"role": "user", "content": [{"type": "text", "text": t} for t in texts]}]
    else:
        messages = [{"role": "user", "content": t} for t in texts]
    assistant.generate_reply(messages=messages)
    assert_clean(sink, caplog, *pieces)
    assert "thanks" in _recorded_content(sink)


@pytest.mark.parametrize("cut", [8, 12])
def test_unregistered_shaped_key_split_across_two_model_calls_is_redacted(
        sink: Sink, caplog: pytest.LogCaptureFixture, cut: int) -> None:  # noqa: F811
    """The first call's text ends in the start of a key shape too short to be one (``sk-QZXWa``);
    the second call's first text completes it. Nobody registered the key."""
    secret = _distinct_marker(True)
    instrument(sink)
    assistant = _assistant({"model": "scripted", client_key(): "ScriptedModelClient"})
    first, second = secret[:cut], secret[cut:]
    assistant.generate_reply(messages=[{"role": "user", "content": f"my key starts {first}"}])
    assistant.generate_reply(messages=[{"role": "user", "content": f"{second} is the rest"}])
    assert_clean(sink, caplog, first, second)
    assert "is the rest" in _recorded_content(sink)


def test_a_short_piece_never_cuts_another_key_short() -> None:
    """The characters learned around a short piece of one key (`` sk-QZ``) are matched after
    every other secret: matched first, they took the start of another key with the same first
    characters and left the rest of it, no longer key-shaped, in the text."""
    one, other = _distinct_marker(True), _distinct_marker(True)
    redaction.learn_split_secrets([f"my key: {one[:5]}", f"{one[5:]} thanks"])
    out = redaction.redact(f"my key: {other} and my key: {one[:5]}") or ""
    assert other[5:] not in out and one[:5] not in out
    assert out.count("[REDACTED]") == 2
