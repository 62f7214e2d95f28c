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

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent, GroupChat, GroupChatManager, OpenAIWrapper

from cmbagent_otel import semconv
from cmbagent_otel.instrumentation import _handoffs
from cmbagent_otel.instrumentation.ag2 import AG2Instrumentor
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


def test_a_group_chats_candidates_go_when_one_of_its_agents_is_freed(instrumented: Any) -> None:
    """A group chat's candidates are kept under its selection method's and agents' ids: an agent removed
    and freed, then a new one given its id at its place before the next selection, matched the key and
    was named by the freed one's name. Whether CPython hands the id on is the allocator's choice, so the
    test pins what rules it out whatever the allocator does: once a candidate is freed its entry is gone
    (fails on 5bc025a: the entry outlives the agent), and the next selection names the agents there are.
    (The facts are computed as a selection computes them, for a group whose agent ``beta`` never spoke: an
    agent that did is referred to from many places inside AG2, which differ between its lines.)"""
    state = AG2Instrumentor()._state
    alpha, beta = (ConversableAgent(n, llm_config=False, human_input_mode="NEVER", default_auto_reply="ok")
                   for n in ("alpha", "beta"))
    # beta joins after the group chat is made: its speaker transitions (made then) do not hold it
    chat = GroupChat([alpha], messages=[], max_round=2, speaker_selection_method="round_robin")
    chat.agents.append(beta)
    facts = _handoffs._group_facts(state, chat, chat.speaker_selection_method, chat.agents)
    assert facts[3] == ["alpha", "beta"] and state.candidates[id(chat)] is facts
    beta_id = id(beta)
    chat.agents.remove(beta)
    gone = weakref.ref(beta)
    del beta
    gc.collect()  # an agent is in reference cycles of its own (its reply functions are its bound methods)
    assert gone() is None, "beta is still referred to: the case this test is about did not happen"
    assert id(chat) not in state.candidates
    del facts
    delta = ConversableAgent("delta", llm_config=False, human_input_mode="NEVER", default_auto_reply="ok")
    chat.agents.append(delta)
    alpha.initiate_chat(GroupChatManager(chat, llm_config=False), message="hello", max_turns=1, silent=True)
    handoffs = instrumented.handoffs()
    assert handoffs and {h[semconv.HANDOFF_CANDIDATES] for h in handoffs} == {("alpha", "delta")}
    assert not any(beta_id in entry[1] and id(delta) != beta_id for entry in state.candidates.values())
