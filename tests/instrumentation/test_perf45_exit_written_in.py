"""Frames of ours a span no longer makes (issue 13, session 45).

The method wrappers are generated from ``ag2._traced_method`` with ``TracedSpan.__exit__`` written in for the plain
spans the hot builders start (``TracedSpanShell``: agent turns, model calls, tool calls): their span is ended, its
context detached, in the wrapper's own frame. A span type with an ``__exit__`` of its own (the conversation's
``TracedSpan``, ``_ChatSpan``...) still calls it. These tests pin that and that the spans end as they did: ended, the
context put back, an application's exception recorded and re-raised unchanged, a Ctrl-C in ``span.end()`` out with
no span left current (the last one is ``tests/faults/test_faults40_interrupted_end.py``'s too).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import cmbagent_otel
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.instrumentation import ag2
from cmbagent_otel.testing import offline_agent
from tests.conftest import SpanCapture


def _exits_in_a_chat(max_turns: int) -> list[str]:
    """The types of the spans whose ``TracedSpan.__exit__`` frame runs while two offline agents chat."""
    sender = offline_agent("asker", ["hello"] * max_turns)
    answerer = offline_agent("answerer", [f"answer {i}" for i in range(max_turns)])
    exits: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is TracedSpan.__exit__.__code__:
            exits.append(type(frame.f_locals["self"]).__name__)

    sys.setprofile(profile)
    try:
        sender.initiate_chat(answerer, message="hi", max_turns=max_turns, silent=True)
    finally:
        sys.setprofile(None)
    return exits


def test_a_plain_span_ends_in_the_wrapper_frame(instrumented: SpanCapture) -> None:
    """Agent turns and model calls (``TracedSpanShell``) make no ``__exit__`` frame; the conversation span does. On
    main every span called it: 7 frames for the 7 spans of this chat."""
    exits = _exits_in_a_chat(2)
    spans = instrumented.spans
    assert len(spans) == 7 and {s.name.split(" ")[0] for s in spans} == {"conversation", "invoke_agent", "chat"}
    assert exits == ["TracedSpan"], exits  # the conversation span only
    assert all(s.end_time is not None for s in spans)
    assert not trace.get_current_span().get_span_context().is_valid  # every context put back


def test_the_wrappers_are_generated_with_exit_written_in(instrumented: SpanCapture) -> None:
    """The patched methods are copies of one code generated from ``_traced_method`` (no trampoline calling it),
    holding ``__exit__``'s own statements (``span.end()``, ``detach(token)``)."""
    from autogen import ConversableAgent

    code = vars(ConversableAgent)["generate_reply"].__code__
    assert code is vars(ConversableAgent)["execute_function"].__code__  # one code, its values in the closure
    source = getattr(ag2, "_traced_method", None)
    assert source is not None and code is not source.__code__ and "_traced_method" not in code.co_names
    assert {"end", "detach", "claim_duration"} <= set(code.co_names), code.co_names


class _Refused(Exception):
    pass


def test_an_application_exception_is_recorded_and_reraised_unchanged(instrumented: SpanCapture) -> None:
    """The exception path still calls the span's ``__exit__``: the agent turn's span fails with the reply
    function's exception, which the caller gets unchanged (a guard: the same on main)."""
    from autogen import Agent

    refused = _Refused("no")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise refused

    agent = offline_agent("runner", [])
    agent.register_reply([Agent, None], refuse, position=0)
    with pytest.raises(_Refused) as caught:
        agent.generate_reply(messages=[{"role": "user", "content": "hi"}])
    assert caught.value is refused
    span = instrumented.one("invoke_agent runner")
    assert span.status.status_code is StatusCode.ERROR and span.end_time is not None
    assert [e.name for e in span.events] == ["exception"]
    assert not trace.get_current_span().get_span_context().is_valid


def test_a_ctrl_c_from_the_written_in_end_leaves_no_context(instrumented: SpanCapture) -> None:
    """``span.end()`` of a model call (written into the wrapper) interrupted by Ctrl-C from an application's span
    processor: the very exception comes out and the span's context is detached (the written-in ``finally``)."""
    from tests.faults.test_faults40_interrupted_end import InterruptedExport

    interrupt = InterruptedExport("chat scripted")
    instrumented.provider.add_span_processor(interrupt)
    sender = offline_agent("asker", [])
    answerer = offline_agent("answerer", ["answer"])
    with pytest.raises(KeyboardInterrupt) as caught:
        sender.initiate_chat(answerer, message="hi", max_turns=1, silent=True)
    assert interrupt.raised and caught.value is interrupt.raised[0]
    assert not trace.get_current_span().get_span_context().is_valid


def _async_chat_shape(capture: SpanCapture) -> list[tuple[str, str | None, str]]:
    """(name, parent's name, status) of every span of a two-turn async chat, instrumented into ``capture``."""
    import asyncio

    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        sender = offline_agent("asker", ["hello"] * 2)
        answerer = offline_agent("answerer", ["one", "two"])
        asyncio.run(sender.a_initiate_chat(answerer, message="hi", max_turns=2, silent=True))
    finally:
        cmbagent_otel.uninstrument()
    spans = capture.spans
    by_id = {s.context.span_id: s.name for s in spans}
    assert len(spans) >= 5 and all(s.end_time is not None for s in spans)
    return sorted((s.name, by_id.get(s.parent.span_id) if s.parent else None, s.status.status_code.name)
                  for s in spans)


def test_the_coroutine_wrappers_are_generated_from_the_same_source(capture: SpanCapture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``a_generate_reply``'s wrapper is an ``async def`` generated from ``_traced_method`` (awaiting the call, with
    ``__exit__`` written in); where it cannot be generated, the wrapper made of the same helpers
    (``_composed_async``) records the same spans."""
    from autogen import ConversableAgent

    generated = _async_chat_shape(capture)
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        patched = vars(ConversableAgent)["a_generate_reply"]
        assert inspect.iscoroutinefunction(patched)
        assert {"end", "detach"} <= set(patched.__code__.co_names), patched.__code__.co_names
    finally:
        cmbagent_otel.uninstrument()
    capture.exporter.clear()
    monkeypatch.setattr(ag2, "_async_method_maker", ag2._composed_async)
    assert _async_chat_shape(capture) == generated


def _ended_when(flag: bool, calls: list[str]) -> None:
    try:
        if flag:
            calls.append("body")
    except Exception:
        calls.append("handler")
    finally:
        calls.append("finally")


def test_a_try_folded_to_nothing_leaves_its_finally_block_alone() -> None:
    """``TracedSpan.__exit__`` written in with no exception folds its recording away (``if exc is not None ...``):
    the ``try`` around it, left with nothing that can raise, is dropped and its ``finally`` block runs as plain
    statements (no exception table left). On main the empty ``try`` stayed."""
    from cmbagent_otel._specialise import specialise

    off, on = specialise(_ended_when, "_off", {"flag": False}), specialise(_ended_when, "_on", {"flag": True})
    calls: list[str] = []
    off(calls)
    assert calls == ["finally"] and off.__code__.co_exceptiontable == b""
    calls.clear()
    on(calls)
    assert calls == ["body", "finally"] and on.__code__.co_exceptiontable != b""
