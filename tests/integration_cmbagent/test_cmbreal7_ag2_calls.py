"""Real cmbagent audit 7 (session 34): AG2 calls as cmbagent and its backend make them, on the AG2 line
installed (cmbagent's fork ``cmbagent_autogen`` on Python 3.12, ag2 0.14 on 3.11).

* ``initiate_chat`` / ``a_initiate_chat`` take ``max_turns`` (and ``message``) positionally as well: on both
  lines the signature is ``(recipient, clear_history, silent, cache, max_turns, summary_method,
  summary_args, message, **kwargs)``.
* Human input asked before the asking agent's class took a turn: ``initiate_chat`` without a message asks
  the initiator's human for the first one (AG2's ``generate_init_message``), before any turn of it.
* Human input through a function set on the agent itself, as cmbagent's backend (the MARS fork's
  ``cmbagent/handoffs/hitl.py``: ``configure_admin_for_websocket``, ``admin_agent.agent.get_human_input =
  websocket_human_input_sync``) gives its admin agent the answers of the web UI.

Real AG2 agents with the offline model (client or loopback server), spans in memory; each scenario runs
uninstrumented, then instrumented, and what the application sees is compared.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import pytest
from autogen import ConversableAgent
from autogen.io import IOStream

import cmbagent_otel
from cmbagent_otel import semconv
from cmbagent_otel.testing import ExitingConsole, offline_agent
from tests.conftest import SpanCapture


def _visible(history: Any) -> list[tuple[Any, Any]]:
    return [(m.get("name"), m.get("content")) for m in history]


def _traced(scenario: Callable[[], Any], capture_content: bool = False) -> tuple[Any, Any, SpanCapture]:
    """``scenario()`` uninstrumented, then instrumented: (plain result, traced result, spans)."""
    plain = scenario()
    capture = SpanCapture()
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False, set_global=False,
                             capture_content=capture_content)
    try:
        result = scenario()
    finally:
        cmbagent_otel.uninstrument()
    return plain, result, capture


def test_initiate_chat_signature_positions() -> None:
    """What the positional reading relies on, on the installed AG2 line."""
    for method in (ConversableAgent.initiate_chat, ConversableAgent.a_initiate_chat):
        names = list(inspect.signature(method).parameters)
        assert names.index("max_turns") == 5 and names.index("message") == 8  # self first


@pytest.mark.parametrize("use_async", [False, True])
def test_positional_max_turns_and_message_are_read(use_async: bool) -> None:
    """``initiate_chat(alice, True, True, None, 1, "last_msg", {}, "start")``: the conversation span had no
    ``cmbagent.conversation.max_turns`` and (content capture on) no input message: both were read from
    the keywords only."""
    def scenario() -> Any:
        alice = offline_agent("alice", ["first answer", "second answer"])
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
        args = (alice, True, True, None, 1, "last_msg", {}, "start the spectrum")
        result = asyncio.run(bob.a_initiate_chat(*args)) if use_async else bob.initiate_chat(*args)
        return _visible(result.chat_history)

    plain, result, capture = _traced(scenario, capture_content=True)
    assert result == plain == [("bob", "start the spectrum"), ("alice", "first answer")]  # one turn: max_turns=1
    span = capture.one("conversation alice")
    assert span.attributes[semconv.CONVERSATION_MAX_TURNS] == 1
    assert "start the spectrum" in span.attributes[semconv.GEN_AI_INPUT_MESSAGES]


def _web_user_class() -> type:
    """A UI's user proxy class, new to the instrumentation cycle (its override not adopted yet)."""
    class WebUser(ConversableAgent):
        asked: list[str] = []

        def get_human_input(self, prompt: str, **kwargs: Any) -> str:
            type(self).asked.append(prompt)
            return "exit" if len(type(self).asked) > 1 else "start the spectrum"

        async def a_get_human_input(self, prompt: str, **kwargs: Any) -> str:
            return self.get_human_input(prompt)

    return WebUser


@pytest.mark.parametrize("use_async", [False, True])
def test_override_asked_before_its_class_first_turn(use_async: bool) -> None:
    """The initiator is asked for the first message (``message`` omitted) before any turn of its class:
    that answer left no ``await_human_input`` span (the class's override was adopted at its first turn,
    after the question)."""
    classes: list[type] = []

    def scenario() -> Any:
        cls = _web_user_class()
        classes.append(cls)
        alice = offline_agent("alice", ["what next?"])
        human = cls("human", llm_config=False, human_input_mode="ALWAYS")
        if use_async:
            result = asyncio.run(human.a_initiate_chat(alice, max_turns=2, silent=True))
        else:
            result = human.initiate_chat(alice, max_turns=2, silent=True)
        return _visible(result.chat_history), list(cls.asked)

    plain, result, capture = _traced(scenario)
    assert result == plain
    assert result[0][:2] == [("human", "start the spectrum"), ("alice", "what next?")]
    assert result[1][0] == ">"  # AG2 asked for the first message
    asks = capture.named("await_human_input human")
    assert len(asks) == 2  # the first message, then the human's turn
    conversation = capture.one("conversation alice")
    assert asks[0].parent.span_id == conversation.context.span_id
    assert all(vars(cls).get("get_human_input").__name__ == "get_human_input" for cls in classes)


def _mars_admin(answers: list[str]) -> tuple[ConversableAgent, Callable[[str], str]]:
    """An admin agent given its human's answers the way cmbagent's backend does it: a plain function
    assigned on the agent (MARS ``configure_admin_for_websocket``)."""
    admin = ConversableAgent("admin", llm_config=False, human_input_mode="ALWAYS")
    asked: list[str] = []

    def websocket_human_input_sync(prompt: str, **kwargs: Any) -> str:  # ag2 0.14 passes iostream= too
        asked.append(prompt)
        return answers[min(len(asked), len(answers)) - 1]

    admin.get_human_input = websocket_human_input_sync  # type: ignore[method-assign]
    return admin, websocket_human_input_sync


@pytest.mark.parametrize("message", ["start the spectrum", None])
def test_human_input_set_on_the_agent_is_traced(message: str | None) -> None:
    """cmbagent's backend answers its admin through a function set on the agent itself: AG2 finds it in
    the instance, past the patch on the class, and no answer of the web UI had an ``await_human_input``
    span. After ``uninstrument()`` the agent holds the application's own function again."""
    functions: list[Any] = []

    def scenario() -> Any:
        alice = offline_agent("alice", ["what next?", "done"])
        answers = ["start the spectrum", "print the peak", "exit"] if message is None else ["print the peak", "exit"]
        admin, function = _mars_admin(answers)
        functions.append((admin, function))
        with IOStream.set_default(ExitingConsole()):
            result = admin.initiate_chat(alice, message=message, max_turns=3, silent=True)
        return _visible(result.chat_history)

    plain, result, capture = _traced(scenario)
    assert result == plain
    asks = capture.named("await_human_input admin")
    assert len(asks) == (3 if message is None else 2)
    assert all(s.attributes[semconv.GEN_AI_AGENT_NAME] == "admin" for s in asks)
    admin, function = functions[-1]
    assert vars(admin)["get_human_input"] is function  # put back by uninstrument()
    assert "a_get_human_input" not in vars(admin)


def test_run_with_positional_max_turns() -> None:
    """``ConversableAgent.run(recipient, True, True, None, 1, ...)`` (held up): AG2 calls ``initiate_chat``
    from its own thread with keywords, so the conversation span has the limit either way."""
    def scenario() -> Any:
        alice = offline_agent("alice", ["first answer", "second answer"])
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
        with IOStream.set_default(ExitingConsole()):
            response = bob.run(alice, True, True, None, 1, "last_msg", {}, "start the spectrum")
            response.process(processor=_Silent())
        return [(m.get("name"), m.get("content")) for m in response.messages]

    plain, result, capture = _traced(scenario)
    assert result == plain
    assert ("alice", "first answer") in result and ("alice", "second answer") not in result
    assert capture.one("conversation alice").attributes[semconv.CONVERSATION_MAX_TURNS] == 1


class _Silent:
    """An AG2 event processor that prints nothing."""

    def process(self, response: Any) -> None:
        for _ in response.events:
            pass


def test_async_human_input_set_on_the_agent_is_traced() -> None:
    """The same with ``a_get_human_input`` set on the agent and an async chat."""
    functions: list[Any] = []

    def scenario() -> Any:
        alice = offline_agent("alice", ["what next?", "done"])
        admin = ConversableAgent("admin", llm_config=False, human_input_mode="ALWAYS")
        answers = ["print the peak", "exit"]

        async def websocket_human_input(prompt: str, **kwargs: Any) -> str:
            return answers.pop(0) if answers else "exit"

        admin.a_get_human_input = websocket_human_input  # type: ignore[method-assign]
        functions.append((admin, websocket_human_input))
        with IOStream.set_default(ExitingConsole()):
            result = asyncio.run(admin.a_initiate_chat(alice, message="start", max_turns=3, silent=True))
        return _visible(result.chat_history)

    plain, result, capture = _traced(scenario)
    assert result == plain
    assert len(capture.named("await_human_input admin")) == 2
    admin, function = functions[-1]
    assert vars(admin)["a_get_human_input"] is function
