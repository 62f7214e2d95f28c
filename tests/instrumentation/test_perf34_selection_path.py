"""The speaker selection in one frame of ours (issue 13, session 43).

``GroupChat.select_speaker`` is patched with a copy of ``_handoffs._selection_method`` generated with
``_begin`` and ``_ended`` written in (``_specialise.specialiser``: ``state`` and ``original`` bound per
patched method): no ``Selection`` object, no call of ours per selection; a selection that asks the model
finds the wrapper's locals on the stack. These tests pin that shape, that it records exactly what the
function it is generated from records (every form: handoff events, model-asking spans, failures, events
past the span's limit, a control chat's plan step), and that nothing of a finished chat stays behind.
"""

from __future__ import annotations

import gc
import sys
import weakref
from typing import Any

import pytest
from autogen import GroupChat, GroupChatManager
from autogen.agentchat import groupchat
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import cmbagent_otel
from cmbagent_otel import _spans, _specialise
from cmbagent_otel._specialise import specialise, specialiser
from cmbagent_otel.demo import prepare_group
from cmbagent_otel.instrumentation import _handoffs
from cmbagent_otel.instrumentation.ag2 import AG2Instrumentor
from cmbagent_otel.testing import FakeOpenAIServer, offline_agent
from tests.conftest import SpanCapture
from tests.instrumentation.test_perf31_generated_starts import _normalised


def _terminates(message: dict[str, Any]) -> bool:
    return "TERMINATE" in str(message.get("content"))


def _group(tmp_path: Any, method: Any, *, config: dict[str, Any] | None = None, rounds: int = 6) -> tuple[Any, Any]:
    first = offline_agent("first", ["one"] * 4)
    second = offline_agent("second", ["two"] * 4)
    third = offline_agent("third", ["three"] * 3 + ["three TERMINATE"])
    prepare_group([first, second, third], str(tmp_path))
    chat = GroupChat([first, second, third], messages=[], max_round=rounds, speaker_selection_method=method)
    llm_config: Any = {"config_list": [config], "cache_seed": None} if config else False
    return first, GroupChatManager(chat, llm_config=llm_config, is_termination_msg=_terminates)


def _selection_chats(tmp_path: Any) -> None:
    """Every form a selection takes: handoff events from a selection function, the model asked (a span, its
    model calls under it) after a handoff, a failing selection function, a selection inside a workflow step,
    and events past a span's event limit (spans)."""
    with FakeOpenAIServer(script=["third", "second", "third"]) as server:
        config = {"model": "gpt-4o-mini", "api_key": "sk-test-perf34-selection-000", "base_url": server.base_url}

        def route(last_speaker: Any, chat: Any) -> Any:  # a handoff, then the model decides
            return chat.agents[1] if last_speaker is chat.agents[0] else "auto"

        first, manager = _group(tmp_path / "auto", route, config=config, rounds=4)
        first.initiate_chat(manager, message="begin", max_turns=1, silent=True)
        first, manager = _group(tmp_path / "model", "auto", config=config, rounds=3)
        with cmbagent_otel.workflow("w"), cmbagent_otel.phase("control"), cmbagent_otel.step(1, "fit"):
            first.initiate_chat(manager, message="begin", max_turns=1, silent=True)

    def failing(last_speaker: Any, chat: Any) -> Any:
        if last_speaker is chat.agents[1]:
            raise ValueError("no route from second")
        return chat.agents[1]

    first, manager = _group(tmp_path / "failing", failing)
    with pytest.raises(ValueError, match="no route from second"):
        first.initiate_chat(manager, message="begin", max_turns=1, silent=True)
    first, manager = _group(tmp_path / "round", "round_robin", rounds=12)
    first.initiate_chat(manager, message="begin", max_turns=1, silent=True)


def _recorded(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, maker: Any) -> list[Any]:
    capture = SpanCapture()
    limited = TracerProvider(span_limits=SpanLimits(max_events=6))  # a few events, then spans
    limited.add_span_processor(SimpleSpanProcessor(capture.exporter))
    with monkeypatch.context() as patch:
        patch.setattr(_handoffs, "_selection_maker", maker)
        with _spans.workflow_tracers.routed_to(limited):
            cmbagent_otel.instrument(tracer_provider=limited, instrument_cmbagent=False, instrument_threading=False)
            try:
                _selection_chats(tmp_path)
            finally:
                cmbagent_otel.uninstrument()
    limited.shutdown()
    # the loopback server's port is its own per run; a stack trace names the frames it went through (the
    # reference's two where the copy has one): its last line is compared
    return [(*span[:4], [(k, None if k == "server.port" else v) for k, v in span[4]],
             [(name, [(k, v.splitlines()[-1] if k == "exception.stacktrace" else v) for k, v in attributes])
              for name, attributes in span[5]])
            for span in _normalised(capture.spans)]


def test_the_generated_selection_wrapper_records_what_its_source_records(tmp_path: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The generated wrapper against ``_selection_method`` itself (what a copy that cannot be generated calls):
    the same spans, parents, statuses, attributes in order and handoff events."""
    def itself(state: Any, original: Any) -> Any:
        return _specialise._calling(_handoffs._selection_method, "select_speaker",
                                    {"state": state, "original": original})

    generated = _recorded(tmp_path / "generated", monkeypatch, None)  # made by instrument()
    reference = _recorded(tmp_path / "reference", monkeypatch, itself)
    assert generated == reference
    names = [span[0] for span in generated]
    events = [event for span in generated for event in span[5] if event[0] == _handoffs.EVENT_NAME]
    # each form is there: model-asking spans (the model's calls under them), events, spans past the limit
    assert names.count("select_speaker first") >= 2 and names.count("select_speaker second") >= 2
    assert len(events) >= 5
    assert any(("error.type", "ValueError") in event[1] for event in events)  # the failing selection


def _profiled_handoffs(tmp_path: Any, profile: Any) -> Any:
    """A group chat of handoffs only (a selection function) run under ``sys.setprofile(profile)``; its manager."""
    first, manager = _group(tmp_path, lambda last, chat: chat.agents[1 if last is not chat.agents[1] else 2])
    sys.setprofile(profile)
    try:
        first.initiate_chat(manager, message="begin", max_turns=1, silent=True)
    finally:
        sys.setprofile(None)
    return manager


def test_a_selection_runs_in_one_frame_of_ours(instrumented: SpanCapture, tmp_path: Any) -> None:
    """The patched method is the generated copy: ``_begin`` and ``_ended`` written in (their locals its own,
    ``_begin``'s results straight into the wrapper's names), ``_GIL`` and ``SPAN_KEY`` folded, no call of a
    function of ``_handoffs`` while a handoff is recorded."""
    code = groupchat.GroupChat.select_speaker.__code__
    assert code in _handoffs._SYNC_SELECTION_CODES and code is not _handoffs._selection_method.__code__
    assert not {"_begin", "_ended", "Selection", "_GIL", "SPAN_KEY"} & set(code.co_names), code.co_names
    assert {"scope", "span", "from_name", "facts", "promoted"} <= set(code.co_varnames)
    assert not {"_begin_scope", "_begin_span", "_begin_from_name", "_begin_facts"} & set(code.co_varnames)
    assert code.co_filename == _handoffs.__file__
    called: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename == _handoffs.__file__:
            called.append(frame.f_code.co_name)

    _profiled_handoffs(tmp_path, profile)
    selections = len(instrumented.handoffs())
    assert selections >= 4 and called.count("select_speaker") == selections, called
    # once per chat: its group's facts (new group chat) and the manager span's room for events
    once = {"_group_facts", "_reason", "_candidates", "_remember_group", "_event_room"}
    assert set(called) == {"select_speaker", *once} and all(called.count(name) == 1 for name in once), called


def test_a_model_asking_selection_keeps_nothing_of_its_chat(tmp_path: Any, capture: SpanCapture) -> None:
    """The selection's facts live in the wrapper's frame (and, for a model-asking selection, in the Selection read
    off it for its span): once the application drops a finished chat, its manager, group chat and agents are
    collected, and the group's facts with them."""
    refs: list[weakref.ref[Any]] = []
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        state = AG2Instrumentor()._state
        assert state is not None
        with FakeOpenAIServer(script=["third", "second", "third"] * 2) as server:
            config = {"model": "gpt-4o-mini", "api_key": "sk-test-perf34-keep-00000", "base_url": server.base_url}
            for index in range(2):
                first, manager = _group(tmp_path / str(index), "auto", config=config, rounds=3)
                refs.extend(map(weakref.ref, [first, manager, manager.groupchat, *manager.groupchat.agents]))
                first.initiate_chat(manager, message="begin", max_turns=1, silent=True)
                del first, manager
        capture.exporter.clear()
        gc.collect()
        assert len(capture.named("select_speaker")) == 0  # cleared: the spans were recorded, then dropped
        assert sum(ref() is not None for ref in refs) == 0
        assert state.candidates == {}
    finally:
        cmbagent_otel.uninstrument()


# _specialise: what the generated selection wrapper needed


def _pair(x: Any, n: int) -> tuple[Any, int]:
    second = n + 1
    first = x * 2
    return first, second


def _before_the_try(x: Any, n: int, flag: bool) -> Any:
    a, b = _pair(x, n)  # outside any try: no handler can see its partial work
    try:
        c = a // n
    except ZeroDivisionError:
        return ("failed", a, b)  # reads a and b, but only for what the try runs
    return (c, b, flag)


def test_a_helper_written_in_outside_any_try_returns_straight_into_its_targets() -> None:
    """A ``try`` later in the caller whose handler reads the targets does not keep a copy at the helper's end:
    only a ``try`` around the call could show the helper's partial work."""
    made = specialise(_before_the_try, "made", {"flag": True}, inline=(_pair,))
    assert not {"_pair_first", "_pair_second"} & set(made.__code__.co_varnames), made.__code__.co_varnames
    assert made(3, 4) == _before_the_try(3, 4, True) == (1, 5, True)
    assert made(3, 0) == _before_the_try(3, 0, True) == ("failed", 6, 1)


def _wrapped(bound: Any, offset: int, self: Any, *args: Any, **kwargs: Any) -> Any:
    return bound(self, offset, *args, **kwargs)


def test_free_parameters_are_bound_per_copy_and_star_arguments_kept() -> None:
    """``specialiser``: one generated code, a closure per copy binding the free parameters; ``*args`` and
    ``**kwargs`` passed on; where the source cannot be read, the copies call the function with the same result."""
    def collect(*args: Any, **kwargs: Any) -> Any:
        return args, kwargs

    make = specialiser(_wrapped, "copy", ("bound", "offset"))
    one, two = make(collect, 1), make(collect, 2)
    assert one.__code__ is two.__code__ and one.__name__ == "copy"
    assert one("s", 3, k=4) == _wrapped(collect, 1, "s", 3, k=4) == (("s", 1, 3), {"k": 4})
    assert two("s") == (("s", 2), {})
    with pytest.raises(TypeError):
        make(collect)
    namespace: dict[str, Any] = {}
    exec("def unreadable(bound, offset, self, *args, **kwargs):\n"
         "    return bound(self, offset, *args, **kwargs)\n", namespace)
    fallback = specialiser(namespace["unreadable"], "copy", ("bound", "offset"))(collect, 5)
    assert fallback("s", 3, k=4) == (("s", 5, 3), {"k": 4})
    reference = _specialise._calling(namespace["unreadable"], "copy", {"bound": collect, "offset": 6})
    assert reference("s", k=1) == (("s", 6), {"k": 1})
