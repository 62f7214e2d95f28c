"""Issue 13, session 41: a speaker selection reuses what the previous one read from the same Context.

``_handoffs._begin`` keeps the (Context, scope, span) of the last selection and skips the Context's
suppression, scope and span lookups when the current Context is that same object (a Context is never
changed in place). What may change under the same Context (the scope's owner and cursor, whether the
span still records) is read on every selection; a selection under any other Context reads it afresh;
the one Context kept keeps no finished chat alive.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent, GroupChat, GroupChatManager
from opentelemetry import context as otel_context
from opentelemetry import trace

from cmbagent_otel.instrumentation.ag2 import AG2Instrumentor


@pytest.fixture(autouse=True)
def _in_a_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # cmbagent's fork (cmbagent_autogen) writes each group chat message to chats/ under the current directory
    (tmp_path / "chats").mkdir()
    monkeypatch.chdir(tmp_path)


def _agents() -> tuple[Any, Any]:
    return tuple(ConversableAgent(n, llm_config=False, human_input_mode="NEVER", default_auto_reply="ok")
                 for n in ("alpha", "beta"))  # type: ignore[return-value]


def _selections_under(capture: Any, parent: Any) -> list[Any]:
    return [s for s in capture.named("select_speaker") if s.parent is not None
            and s.parent.span_id == parent.get_span_context().span_id]


def test_each_context_decides_for_its_own_selections(instrumented: Any) -> None:
    """A selection under another Context (another span, a suppressed one) reads that Context; one under
    the previous selection's Context object after its span ended records nothing (checked every time)."""
    alpha, beta = _agents()
    chat = GroupChat([alpha, beta], messages=[], max_round=4, speaker_selection_method="round_robin")
    manager = GroupChatManager(chat, llm_config=False)
    tracer = instrumented.provider.get_tracer("test")
    with tracer.start_as_current_span("first") as first:
        first_context = otel_context.get_current()
        assert chat.select_speaker(alpha, manager) is beta
        assert chat.select_speaker(beta, manager) is alpha  # the same Context again
    token = otel_context.attach(otel_context.set_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY, True))
    try:
        chat.select_speaker(alpha, manager)
    finally:
        otel_context.detach(token)
    with tracer.start_as_current_span("second") as second:
        chat.select_speaker(alpha, manager)
    token = otel_context.attach(first_context)  # the first selections' very Context, its span ended
    try:
        chat.select_speaker(alpha, manager)
    finally:
        otel_context.detach(token)
    assert [s.name for s in _selections_under(instrumented, first)] == ["select_speaker alpha",
                                                                         "select_speaker beta"]
    assert [s.name for s in _selections_under(instrumented, second)] == ["select_speaker alpha"]
    assert len(instrumented.named("select_speaker")) == 3
    assert not trace.get_current_span().get_span_context().is_valid


def test_the_context_kept_keeps_no_finished_chat_alive(instrumented: Any) -> None:
    """After a group chat ends and the application drops it, its manager, group chat and agents go,
    though the last selection's Context stays kept until the next selection."""
    alpha, beta = _agents()
    chat = GroupChat([alpha, beta], messages=[], max_round=4, speaker_selection_method="round_robin")
    manager = GroupChatManager(chat, llm_config=False)
    alpha.initiate_chat(manager, message="hello")
    assert AG2Instrumentor()._state.selection_context[0] is not None  # kept: the chat's last selection's
    assert [e.name for e in instrumented.one("invoke_agent chat_manager").events].count("cmbagent.handoff") == 3
    gone = [weakref.ref(x) for x in (alpha, beta, chat, manager)]
    del alpha, beta, chat, manager
    gc.collect()
    assert [ref() for ref in gone] == [None] * 4
