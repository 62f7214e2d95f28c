"""Thirtieth campaign (faults in this session's code): the per-agent and per-group-chat facts found by id.

``ag2._remember`` and ``_handoffs._remember_group`` keep facts under ``id(agent)`` / ``id(groupchat)`` with
no identity check: a weak reference's callback removes an entry while its object is being dropped, before
the id can be reused. These tests free real AG2 agents the ways that could break that (reference cycles
freed by the cyclic collector at odd moments, a finalizer that brings an agent back, agents made and dropped
in other threads during turns) and check that every span names its own agent with its own description.
A group chat's candidates were kept under the id and length of its agents list: a list changed in place
named agents that had left (fixed: the agents' own ids are compared).
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent, GroupChat, GroupChatManager

from cmbagent_otel import semconv
from cmbagent_otel.instrumentation.ag2 import AG2Instrumentor
from cmbagent_otel.testing import offline_agent

from .roomy import RoomyAgent


@pytest.fixture(autouse=True)
def _in_a_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # cmbagent's fork (cmbagent_autogen) writes each group chat message to chats/ under the current directory
    (tmp_path / "chats").mkdir()
    monkeypatch.chdir(tmp_path)


def _turn(agent: Any) -> None:
    agent.generate_reply(messages=[{"role": "user", "content": "question"}])


def _agent_facts(capture: Any) -> list[tuple[str, str | None]]:
    return [(span.attributes[semconv.GEN_AI_AGENT_NAME], span.attributes.get(semconv.GEN_AI_AGENT_DESCRIPTION))
            for span in capture.spans if span.name.startswith("invoke_agent")]


class _Resurrecting(ConversableAgent):  # type: ignore[misc]
    """An agent whose finalizer keeps it (once: CPython runs a finalizer once per object)."""

    kept: list[Any] = []

    def __del__(self) -> None:
        _Resurrecting.kept.append(self)


def test_agents_freed_by_the_cyclic_collector_at_odd_moments_keep_their_own_facts(instrumented: Any) -> None:
    """Agents in reference cycles, the collector off, then run at irregular points: a batch of agents is
    freed at once and new ones take their memory. The weak references' callbacks run before the collector
    frees anything, so no new agent finds a freed one's name or description."""
    state = AG2Instrumentor()._state
    seen: set[int] = set()
    reused = 0
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for index in range(60):
            agent = RoomyAgent(f"cyc{index}", llm_config=False, human_input_mode="NEVER", default_auto_reply="ok",
                           description=f"the description of cyc{index}")
            agent.myself = agent  # a cycle: only the cyclic collector frees it
            reused += id(agent) in seen
            seen.add(id(agent))
            _turn(agent)
            del agent
            if index % 7 in (3, 5):
                gc.collect()
                assert not any(key in state.agents for key in seen)  # each entry gone with its agent
    finally:
        if was_enabled:
            gc.enable()
    assert _agent_facts(instrumented) == [(f"cyc{i}", f"the description of cyc{i}") for i in range(60)]
    assert reused, "no id was given twice: the case this test is about did not happen"


def test_an_agent_brought_back_by_its_finalizer_keeps_its_own_facts(instrumented: Any) -> None:
    """The collector clears weak references (their callbacks run) before it calls finalizers: an agent
    that a finalizer brings back has lost its entry while it lives. It gets its facts again at its next
    turn; and when it is dropped for good (no finalizer the second time) its new entry goes with it."""
    state = AG2Instrumentor()._state
    _Resurrecting.kept.clear()
    agent = _Resurrecting("phoenix", llm_config=False, human_input_mode="NEVER", default_auto_reply="again",
                          description="rises from its ashes")
    agent.myself = agent
    _turn(agent)
    key = id(agent)
    assert key in state.agents
    del agent
    gc.collect()
    assert key not in state.agents
    (back,) = _Resurrecting.kept
    assert id(back) == key
    others = [offline_agent(f"other{i}", ["ok"], description=f"other number {i}") for i in range(5)]
    for other in others:
        _turn(other)
    _turn(back)
    assert state.agents[key].name == "phoenix"
    _Resurrecting.kept.clear()
    del back
    gc.collect()
    assert key not in state.agents
    assert _agent_facts(instrumented) == [("phoenix", "rises from its ashes"),
                                          *[(f"other{i}", f"other number {i}") for i in range(5)],
                                          ("phoenix", "rises from its ashes")]


class _LastWords(ConversableAgent):  # type: ignore[misc]
    """An agent whose finalizer takes one more turn (it is instrumented: its facts are remembered again)."""

    def __del__(self) -> None:
        _turn(self)


def test_an_agent_taking_a_turn_in_its_finalizer_leaves_no_entry(instrumented: Any) -> None:
    """In a cycle, the collector clears the weak reference (the entry goes), then the finalizer's turn
    remembers the agent again under a new weak reference to the dying agent: that one's callback runs
    when the agent is freed, so the entry still goes before the id can be reused."""
    state = AG2Instrumentor()._state
    for index in range(8):
        agent = _LastWords(f"last{index}", llm_config=False, human_input_mode="NEVER", default_auto_reply="bye",
                           description=f"famous last words {index}")
        agent.myself = agent
        key = id(agent)
        _turn(agent)
        del agent
        gc.collect()
        assert key not in state.agents
        newcomer = offline_agent(f"new{index}", ["ok"], description=f"newcomer {index}")
        _turn(newcomer)
        del newcomer
    expected = []
    for index in range(8):
        expected += [(f"last{index}", f"famous last words {index}")] * 2 + [(f"new{index}", f"newcomer {index}")]
    assert _agent_facts(instrumented) == expected


def test_agents_made_and_dropped_in_threads_during_turns_keep_their_own_facts(instrumented: Any) -> None:
    """Threads make an agent, run its turn and drop it (a cycle every other one), while another thread runs
    the cyclic collector between its own agents' turns: callbacks run in whichever thread frees the agent,
    during other threads' lookups."""
    per_thread, threads = 40, 4
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)

    def worker(label: str) -> None:
        try:
            start.wait()
            for index in range(per_thread):
                name = f"{label}_{index}"
                agent = offline_agent(name, ["ok"], description=f"the description of {name}")
                if index % 2:
                    agent.myself = agent
                _turn(agent)
                del agent
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def collector() -> None:
        try:
            start.wait()
            for index in range(per_thread):
                name = f"gc_{index}"
                agent = offline_agent(name, ["ok"], description=f"the description of {name}")
                _turn(agent)
                del agent
                gc.collect(index % 3)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(f"t{k}",)) for k in range(threads)]
    pool.append(threading.Thread(target=collector))
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors
    facts = _agent_facts(instrumented)
    assert len(facts) == (threads + 1) * per_thread
    assert all(description == f"the description of {name}" for name, description in facts), \
        [fact for fact in facts if fact[1] != f"the description of {fact[0]}"][:5]
    assert len({name for name, _ in facts}) == len(facts)


def _group(names: list[str]) -> tuple[list[Any], GroupChat, GroupChatManager]:
    agents = [ConversableAgent(n, llm_config=False, human_input_mode="NEVER", default_auto_reply="ok")
              for n in names]
    chat = GroupChat(list(agents), messages=[], max_round=3, speaker_selection_method="round_robin")
    return agents, chat, GroupChatManager(chat, llm_config=False)


@pytest.mark.parametrize("change", ["replace_one", "remove_then_append"])
def test_candidates_follow_agents_changed_in_place(instrumented: Any, change: str) -> None:
    """A group chat's agents list changed in place keeps its id and its length: the candidates were cached
    under those two and every later selection named the agent that had left (fails on e66d960 with
    ('alpha', 'beta') != ('alpha', 'gamma'))."""
    (alpha, beta, gamma), chat, manager = _group(["alpha", "beta", "gamma"])
    chat.agents.remove(gamma)
    alpha.initiate_chat(manager, message="first", max_turns=1, silent=True)
    first = [h[semconv.HANDOFF_CANDIDATES] for h in instrumented.handoffs()]
    assert first and set(first) == {("alpha", "beta")}
    if change == "replace_one":
        chat.agents[1] = gamma
    else:
        chat.agents.remove(beta)
        chat.agents.append(gamma)
    chat.messages.clear()
    instrumented.exporter.clear()
    alpha.initiate_chat(manager, message="second", max_turns=1, silent=True)
    later = instrumented.handoffs()
    assert later
    assert [h[semconv.HANDOFF_CANDIDATES] for h in later] == [("alpha", "gamma")] * len(later)
