"""Thirty-first fault campaign: an agent changed between two turns is traced as it is, not as it was.

``ag2._AgentStatic`` keeps an agent's facts (name, model, provider, description, its own human-input
functions wrapped) and computed them again only when its ``llm_config`` or description object changed. An
application that changes anything else between turns got spans that lied or were missing: a human-input
function set on the agent after its first turn (a web UI attaching its answers later) was never wrapped
(no ``await_human_input`` span), and an agent given another model client kept the old model on its
``invoke_agent`` span. The facts now remember the objects they were read from and are read again when one
is replaced. (Its name is not among them: AG2 has no way to rename an agent.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent, OpenAIWrapper

from cmbagent_otel import semconv
from cmbagent_otel.testing import FakeOpenAIServer, offline_agent


@pytest.fixture(autouse=True)
def _in_a_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # cmbagent's fork (cmbagent_autogen) writes each group chat message to chats/ under the current directory
    (tmp_path / "chats").mkdir()
    monkeypatch.chdir(tmp_path)


def _turn(agent: Any) -> Any:
    """The agent's reply's text (a human's answer comes back as a message on some AG2 lines)."""
    reply = agent.generate_reply(messages=[{"role": "user", "content": "question"}])
    return reply.get("content") if isinstance(reply, dict) else reply


def _names(capture: Any, prefix: str) -> list[str]:
    return [span.name for span in capture.spans if span.name.startswith(prefix)]


def test_a_human_input_function_set_between_turns_is_traced(instrumented: Any) -> None:
    """A function set on the agent after its facts were computed, and one replacing it later, each open
    their ``await_human_input`` span (fails on 5bc025a with 0 and then 1 spans instead of 1 and 2)."""
    agent = offline_agent("asker", ["model answer"] * 3)
    assert _turn(agent) == "model answer"  # its facts computed: no function of its own yet
    agent.human_input_mode = "ALWAYS"
    agent.get_human_input = lambda *args, **kwargs: "first human"
    assert _turn(agent) == "first human"
    assert _names(instrumented, "await_human_input") == ["await_human_input asker"]
    agent.get_human_input = lambda *args, **kwargs: "second human"
    assert _turn(agent) == "second human"
    assert _names(instrumented, "await_human_input") == ["await_human_input asker"] * 2


def test_an_agent_given_another_model_client_names_its_model(instrumented: Any) -> None:
    """A new model client (another model) set on the agent between turns, its ``llm_config`` object kept:
    the ``invoke_agent`` span names the model its model calls use (fails on 5bc025a with the old model)."""
    with FakeOpenAIServer(script=["one", "two"]) as server:
        def config(model: str) -> dict[str, Any]:
            return {"model": model, "api_key": "sk-test-faults31", "base_url": server.base_url}

        agent = ConversableAgent("switcher", llm_config={"config_list": [config("model-one")], "cache_seed": None},
                                 human_input_mode="NEVER")
        assert _turn(agent) == "one"
        agent.client = OpenAIWrapper(config_list=[config("model-two")], cache_seed=None)
        assert _turn(agent) == "two"
    turns = [span for span in instrumented.spans if span.name == "invoke_agent switcher"]
    chats = [span.attributes[semconv.GEN_AI_REQUEST_MODEL] for span in instrumented.spans
             if span.name.startswith("chat ")]
    assert chats == ["model-one", "model-two"]
    assert [span.attributes.get(semconv.GEN_AI_REQUEST_MODEL) for span in turns] == chats

