"""Agent and model names that quote a key never reach telemetry.

Found by the eleventh campaign: the names an application or a provider chooses were recorded as
given. An agent named with a key in it (``bot-sk-proj-...``, a name built from a config) and a model
written with one (``gpt-4o?api_key=...``, a proxy's routing string; or the ``model`` a provider's
response echoes) went into span names (``invoke_agent``, ``chat``, ``conversation``),
``gen_ai.agent.name``, ``gen_ai.request.model``/``gen_ai.response.model``, the conversation's
initiator and recipient, and every DAG table holding an agent or model name. Names are now redacted
like any text, memoised (a few names, asked on every call).
"""

from __future__ import annotations

import secrets

import pytest
from autogen import ConversableAgent

from cmbagent_otel import redaction
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

from .conftest import needs_custom_client
from .test_secrets import Sink, assert_clean, instrument, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@needs_custom_client
@pytest.mark.parametrize("which", ["shaped", "registered"])
def test_agent_and_model_names_quoting_a_key_are_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                          which: str) -> None:
    key = f"sk-proj-QZ{secrets.token_hex(16)}" if which == "shaped" else f"QZXW{secrets.token_hex(10)}WXZQ"
    if which == "registered":
        redaction.register_secret(key)
    instrument(sink)
    config = {"model": f"gpt-4o?api_key={key}", client_key(): "ScriptedModelClient"}
    assistant = ConversableAgent(f"bot-{key}", llm_config={"config_list": [config], "cache_seed": None},
                                 human_input_mode="NEVER")
    assistant.register_model_client(ScriptedModelClient, script=["ok"])
    user = ConversableAgent(f"user {key}", llm_config=False, human_input_mode="NEVER")
    user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)
    assert_clean(sink, caplog, key[8:] if which == "shaped" else key)
    names = [span.name for span in sink.memory.get_finished_spans()]
    assert "invoke_agent bot-[REDACTED]" in names, names


def test_names_without_a_key_stay() -> None:
    for name in ("engineer", "gpt-4o-mini", "claude-3-5-sonnet-20241022", "planner_response_formatter"):
        assert redaction.redact_name(name) == name
