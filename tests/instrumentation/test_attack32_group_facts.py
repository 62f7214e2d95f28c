"""Thirty-second attack campaign: a group chat's cached facts never keep the group chat alive.

``_handoffs._remember_group`` holds a group chat's selection method and agents weakly, and held one that
cannot be held weakly strongly, on the ground that such a value (a method given as a string) refers to
nothing. A callable object with ``__slots__`` and no ``__weakref__`` cannot be held weakly either, and may
refer to its group chat: the entry then kept the finished chat, its agents and its message history alive.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent, GroupChat

from cmbagent_otel.instrumentation import _handoffs
from cmbagent_otel.instrumentation.ag2 import AG2Instrumentor


@pytest.fixture(autouse=True)
def _in_a_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # cmbagent's fork (cmbagent_autogen) writes each group chat message to chats/ under the current directory
    (tmp_path / "chats").mkdir()
    monkeypatch.chdir(tmp_path)


class FirstAgent:
    """A speaker selection method that cannot be held weakly and refers to its group chat."""

    __slots__ = ("chat",)

    def __init__(self) -> None:
        self.chat: Any = None

    def __call__(self, last_speaker: Any, groupchat: Any) -> Any:
        return groupchat.agents[0]


def test_a_selection_method_that_cannot_be_held_weakly_does_not_keep_its_group_chat(instrumented: Any) -> None:
    """Fails on 54dc9d7: the group chat is still alive after the app dropped it (held by the entry's guard)."""
    state = AG2Instrumentor()._state
    alpha, beta = (ConversableAgent(n, llm_config=False, human_input_mode="NEVER", default_auto_reply="ok")
                   for n in ("alpha", "beta"))
    method = FirstAgent()
    chat = GroupChat([alpha, beta], messages=[], max_round=2, speaker_selection_method=method)
    method.chat = chat
    with pytest.raises(TypeError):
        weakref.ref(method)  # the case this test is about
    facts = _handoffs._group_facts(state, chat, chat.speaker_selection_method, chat.agents)
    assert facts[3] == ["alpha", "beta"]
    gone = weakref.ref(chat)
    del chat, method, facts
    gc.collect()
    assert gone() is None
    assert not state.candidates


def test_a_selection_method_given_as_a_string_is_still_cached(instrumented: Any) -> None:
    """The facts of an ordinary group chat are kept (one tuple compared per selection), and go with it."""
    state = AG2Instrumentor()._state
    alpha = ConversableAgent("alpha", llm_config=False, human_input_mode="NEVER", default_auto_reply="ok")
    chat = GroupChat([alpha], messages=[], max_round=2, speaker_selection_method="round_robin")
    facts = _handoffs._group_facts(state, chat, chat.speaker_selection_method, chat.agents)
    assert state.candidates[id(chat)] is facts
    del chat, facts
    gc.collect()
    assert not state.candidates



class Method(int):
    """A selection method of a subclass of ``int`` (which cannot be held weakly) that carries attributes."""

    chat: Any

    def __call__(self, last_speaker: Any, groupchat: Any) -> Any:
        return groupchat.agents[0]


def test_a_method_of_a_subclass_of_an_atom_does_not_keep_its_group_chat(instrumented: Any) -> None:
    """Thirty-third attack campaign. Fails on e0732e2: held strongly as an ``int``, its attribute kept the chat."""
    state = AG2Instrumentor()._state
    alpha = ConversableAgent("alpha", llm_config=False, human_input_mode="NEVER", default_auto_reply="ok")
    method = Method(1)
    chat = GroupChat([alpha], messages=[], max_round=2, speaker_selection_method=method)
    method.chat = chat
    with pytest.raises(TypeError):
        weakref.ref(method)  # the case this test is about
    facts = _handoffs._group_facts(state, chat, chat.speaker_selection_method, chat.agents)
    assert facts[3] == ["alpha"]
    gone = weakref.ref(chat)
    del chat, method, facts
    gc.collect()
    assert gone() is None
    assert not state.candidates
