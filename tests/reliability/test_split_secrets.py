"""A secret split in two: across two text parts of one message, or across two messages of one
model call. Neither half is a registered secret or has a secret's shape, so each half used to
reach the recorded messages on its own; both must be redacted in spans, events, logs and rows."""

from __future__ import annotations

from typing import Any

import pytest
from autogen import ConversableAgent

from cmbagent_otel import redaction
from cmbagent_otel.testing import ScriptedModelClient

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
    config = {"model": "scripted", "model_client_cls": "ScriptedModelClient"}
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
    assistant = _assistant({"model": "scripted", "model_client_cls": "ScriptedModelClient"})
    half = len(secret) // 2
    first, second = secret[:half], secret[half:]
    assistant.generate_reply(messages=[{"role": "user", "content": f"my key starts {first}"}])
    assistant.generate_reply(messages=[{"role": "user", "content": f"{second} is the rest"}])
    assert_clean(sink, caplog, first, second)
