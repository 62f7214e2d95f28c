"""AG2 surfaces the twenty-fifth campaign tried that held up: guards that fail if they break.

A key an ``LLMConfig`` object holds (``api_key``, a ``SecretStr``-free entry) is registered before
the first span, so a tool exception quoting it (in its message, its ``__cause__`` and a note) is
clean in the tool span's status and error (AG2 catches it and answers ``Error: ...``) with
content capture off; a human's
answer (``get_human_input`` through AG2's ``IOStream``) and the carryover and summaries of
``initiate_chats`` holding it are clean with content capture on; DAG rows and log records too.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from autogen import ConversableAgent, LLMConfig

import cmbagent_otel
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

from .conftest import ON_CMBAGENT_AUTOGEN, needs_custom_client
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = [pytest.mark.usefixtures("isolated_secrets"), needs_custom_client]


def _agent(name: str, key: str, script: list[Any], **kwargs: Any) -> ConversableAgent:
    entry = {"model": "scripted", client_key(): "ScriptedModelClient", "api_key": key}
    # ag2's LLMConfig takes entries as arguments, cmbagent_autogen's only config_list=
    config = (LLMConfig(config_list=[entry], cache_seed=None) if ON_CMBAGENT_AUTOGEN
              else LLMConfig(entry, cache_seed=None))
    agent = ConversableAgent(name, llm_config=config, **kwargs)
    agent.register_model_client(ScriptedModelClient, script=list(script))
    return agent


def test_attack4_tool_exception_cause_with_llm_config_key(sink: Sink,  # noqa: F811
                                                          caplog: pytest.LogCaptureFixture) -> None:
    key = "QZ" + secrets.token_hex(16)
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=False, instrument_cmbagent=False)
    assistant = _agent("assistant", key, [{"tool_calls": [{"id": "call_k1", "name": "fetch", "arguments": {}}]},
                                          "TERMINATE"], human_input_mode="NEVER")
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")

    def fetch() -> str:
        """Fetch the data."""
        try:
            raise ConnectionError(f"upstream refused key {key}")
        except ConnectionError as cause:
            error = RuntimeError(f"fetch failed with headers {{'X-Team': '{key}'}}")
            error.add_note(f"retry with {key}")
            raise error from cause

    assistant.register_for_llm(name="fetch", description="fetch")(fetch)
    user.register_for_execution(name="fetch")(fetch)
    assistant.register_model_client(ScriptedModelClient, script=[
        {"tool_calls": [{"id": "call_k1", "name": "fetch", "arguments": {}}]}, "TERMINATE"])
    user.initiate_chat(assistant, message="get it", max_turns=2, silent=True)
    tools = [s for s in sink.memory.get_finished_spans() if s.name == "execute_tool fetch"]
    assert tools and tools[0].attributes["error.type"] == "tool_error"  # AG2 caught it: "Error: ..." result
    assert "fetch failed with headers" in str(tools[0].status.description)
    assert_clean(sink, caplog, key)


def test_attack4_human_input_and_carryover_with_key(sink: Sink,  # noqa: F811
                                                    caplog: pytest.LogCaptureFixture) -> None:
    key = "QZ" + secrets.token_hex(16)
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=True, instrument_cmbagent=False)
    first = _agent("first", key, [f"found it with {key}"], human_input_mode="NEVER")
    second = _agent("second", key, [f"summary: used {key}"], human_input_mode="NEVER")
    user = ConversableAgent("user", llm_config=False, human_input_mode="ALWAYS")
    from autogen.io import IOStream

    with IOStream.set_default(_answering(f"exit {key}")):
        user.initiate_chats([
            {"recipient": first, "message": "look", "max_turns": 2, "summary_method": "last_msg",
             "carryover": f"the key is {key}", "silent": True},
            {"recipient": second, "message": "summarise", "max_turns": 1, "summary_method": "last_msg",
             "silent": True},
        ])
    names = [s.name for s in sink.memory.get_finished_spans()]
    assert "initiate_chats user" in names and "await_human_input user" in names, names
    recorded = " ".join(str(v) for span in sink.memory.get_finished_spans() for v in span.attributes.values())
    assert "exit [REDACTED]" in recorded and "the key is [REDACTED]" in recorded  # recorded, redacted
    assert_clean(sink, caplog, key)


def _answering(text: str) -> Any:
    """An AG2 ``IOStream`` whose human answers ``text`` (AG2's own ``get_human_input`` reads it)."""
    from autogen.io import IOStream

    class Answering(IOStream):  # type: ignore[misc]
        def print(self, *objects: Any, **kwargs: Any) -> None:
            pass

        def send(self, message: Any) -> None:
            pass

        def input(self, prompt: str = "", *, password: bool = False) -> str:
            return text

    return Answering()
