"""A custom model client is reported as one on every AG2 line: ag2 names its class under
``model_client_cls``, cmbagent_autogen under ``mod_client_cls`` (AG2 fills ``api_type`` "openai" in
even then, so without the key the call was reported as OpenAI's, at api.openai.com:443)."""

from __future__ import annotations

import pytest
from autogen import ConversableAgent

from cmbagent_otel import semconv
from cmbagent_otel.instrumentation._models import CUSTOM_PROVIDER, provider_name, server_of
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import CUSTOM_CLIENT_KEYS, SpanCapture, custom_client_config, custom_client_key

pytestmark = pytest.mark.skipif(custom_client_key() is None,
                                reason="this AG2 line takes a custom model client class under no known key")


@pytest.mark.parametrize("key", CUSTOM_CLIENT_KEYS)
def test_a_custom_client_entry_names_no_provider_and_no_server(key: str) -> None:
    entry = {"model": "scripted", key: "ScriptedModelClient", "api_type": "openai"}  # as AG2 fills it in
    assert provider_name(entry) == CUSTOM_PROVIDER
    assert server_of(entry, provider_name(entry)) is None


def test_a_custom_client_run_is_reported_as_one(instrumented: SpanCapture) -> None:
    agent = ConversableAgent("assistant", llm_config=custom_client_config("ScriptedModelClient"),
                             human_input_mode="NEVER")
    agent.register_model_client(ScriptedModelClient, script=["the peak is at 220"])
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    user.initiate_chat(agent, message="where is the peak?", max_turns=1, silent=True)
    for span in (instrumented.one("chat scripted"), instrumented.one("invoke_agent assistant")):
        assert span.attributes[semconv.GEN_AI_PROVIDER_NAME] == CUSTOM_PROVIDER, span.name
        assert semconv.SERVER_ADDRESS not in span.attributes, span.name
        assert semconv.SERVER_PORT not in span.attributes, span.name
    chat = instrumented.one("chat scripted")
    assert chat.attributes[semconv.GEN_AI_SYSTEM] == CUSTOM_PROVIDER
    assert chat.attributes[semconv.LLM_COST_USD] > 0  # the custom client's own price, not OpenAI's table
