"""The offline group-chat workload shared by the benchmarks (no network, no API key).

Four agents in an AG2 ``GroupChat`` driven by a deterministic speaker order: an engineer
that calls a tool, an executor that runs it, a researcher and a critic that answer in
text. Every model answer comes from :class:`cmbagent_otel.testing.ScriptedModelClient`
through the real ``OpenAIWrapper.create`` path. No code execution: a subprocess per
execution would dominate the timings and hide the per-call instrumentation cost.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

from cmbagent_otel.testing import ScriptedModelClient, scripted_llm_config

# AG2 logs one INFO line per agent built with a custom model client
logging.getLogger("autogen.oai.client").setLevel(logging.WARNING)

CYCLE = ("engineer", "executor", "researcher", "critic")
LLM_AGENTS_PER_CYCLE = 3  # engineer, researcher, critic (the executor has no model)


class Counter:
    """Counts model calls so the benchmark divides by what really ran."""

    def __init__(self) -> None:
        self.calls = 0


def _responder(counter: Counter, answers: list[Any]) -> Any:
    cycle = itertools.cycle(answers)

    def answer(messages: list[dict[str, Any]]) -> Any:
        counter.calls += 1
        return next(cycle)

    return answer


def build_chat(cycles: int, counter: Counter) -> tuple[Any, Any, list[Any]]:
    """Agents and manager for one chat of ``cycles`` rounds of the 4-agent cycle.

    Returns ``(initiator, manager, agents)``; run it with :func:`run_chat`.
    """
    import autogen
    from autogen import ConversableAgent, GroupChat, GroupChatManager

    def agent(name: str, answers: list[Any]) -> Any:
        a = ConversableAgent(name, llm_config=scripted_llm_config(), human_input_mode="NEVER")
        a.register_model_client(ScriptedModelClient, responder=_responder(counter, answers))
        return a

    engineer_answers: list[Any] = [{"tool_calls": [{"name": "peak_position", "arguments": {"multipole": 2}}]}]
    engineer = agent("engineer", engineer_answers)
    researcher = agent("researcher", ["The peak sits at l=440, consistent with Planck."])
    critic = agent("critic", ["Check the error bars before the next step."])
    executor = ConversableAgent("executor", llm_config=False, human_input_mode="NEVER")

    def peak_position(multipole: int) -> str:
        """Position of an acoustic peak (toy model)."""
        return f"peak near l={220 * multipole}"

    autogen.register_function(peak_position, caller=engineer, executor=executor, description="acoustic peak")
    # registering a tool rebuilds the caller's model client
    engineer.register_model_client(ScriptedModelClient, responder=_responder(counter, engineer_answers))

    order = list(CYCLE) * cycles
    state = {"i": 0}

    def scripted_handoff(last_speaker: Any, groupchat: Any) -> Any:
        if state["i"] >= len(order):
            return None
        name = order[state["i"]]
        state["i"] += 1
        return groupchat.agent_by_name(name)

    agents = [engineer, executor, researcher, critic]
    chat = GroupChat(agents, messages=[], max_round=len(order) + 1, speaker_selection_method=scripted_handoff)
    manager = GroupChatManager(chat, llm_config=False, silent=True)
    return critic, manager, agents


def run_chat(initiator: Any, manager: Any) -> Any:
    """Run one chat; returns AG2's ``ChatResult``."""
    return initiator.initiate_chat(manager, message="Fit the acoustic peaks.", max_turns=1, silent=True)
