"""Session 40 (carried over, the thirty-sixth fault campaign's Left (1)): Ctrl-C at the "inside one" marks.

The code and human-input spans mark their context so that an executor subclass calling ``super()`` (or a
``get_human_input`` override calling it) opens one span, not two. The mark was set just before the span's
``start()``: a ``KeyboardInterrupt`` inside ``start()`` ended the span but left the mark set in that context,
and the thread's later code executions (or human inputs) got no span. The mark is now set once the span
started, inside the ``try`` that ends the span on an interrupt; an interrupt raised when the mark's ``set``
returns (a signal handler runs after a C call, the token is lost) puts it back by value. Forced at exact
points by a ``sys.setprofile`` hook, as ``test_faults38_interrupted_start.py`` does.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import pytest
from autogen import ConversableAgent
from autogen.io import IOStream
from opentelemetry import trace

from cmbagent_otel import _spans
from cmbagent_otel.instrumentation import ag2
from cmbagent_otel.testing import offline_agent
from tests.conftest import SpanCapture

_POINTS = ["start-entered", "mark-set-returns"]


def _interrupt_at(point: str, span_class: type, mark: Any, raised: list[BaseException]) -> None:
    """Raise a KeyboardInterrupt in ``span_class.__enter__`` when ``start()`` is entered (its span not started)
    or when the mark's ``set`` returns (the token lost)."""
    enter = span_class.__enter__.__code__

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if point == "start-entered":
            hit = event == "call" and frame.f_code is _spans.start.__code__ and frame.f_back is not None \
                and frame.f_back.f_back is not None and frame.f_back.f_back.f_code is enter
        else:
            hit = event == "c_return" and frame.f_code is enter and getattr(arg, "__self__", None) is mark
        if hit:
            raised.append(KeyboardInterrupt())
            raise raised[-1]  # the hook is removed by the interpreter when it raises
    sys.setprofile(profile)


def _interrupted(run: Any, raised: list[BaseException]) -> None:
    try:
        run()
    except KeyboardInterrupt as caught:  # as a notebook cell does
        assert raised and caught is raised[0]  # the very exception, unchanged
    else:
        pytest.fail("the interrupt did not come out of the chat")
    finally:
        sys.setprofile(None)
    assert not trace.get_current_span().get_span_context().is_valid, "the interrupted span is still current"


@pytest.mark.parametrize("point", _POINTS)
def test_ctrl_c_at_a_code_spans_start_leaves_no_mark(instrumented: SpanCapture, tmp_path: Any, point: str) -> None:
    """Fails on 86547de: the second chat's code execution has no span (the mark stayed set)."""
    from autogen.coding import LocalCommandLineCodeExecutor

    code_execution = {"executor": LocalCommandLineCodeExecutor(work_dir=str(tmp_path))}
    executor = ConversableAgent("executor", llm_config=False, human_input_mode="NEVER",
                                code_execution_config=code_execution)
    engineer = offline_agent("engineer", ["```python\nprint('one')\n```", "```python\nprint('two')\n```"])
    raised: list[BaseException] = []
    _interrupt_at(point, ag2._CodeSpan, ag2._in_code_span, raised)
    _interrupted(lambda: executor.initiate_chat(engineer, message="go", max_turns=2, silent=True), raised)
    first = instrumented.spans
    assert {s.name for s in first if s.end_time is None} == set()
    code = [s for s in first if s.name.startswith("execute_code")]
    assert [s.attributes["error.type"] for s in code] == ([] if point == "start-entered" else ["KeyboardInterrupt"])

    executor.initiate_chat(engineer, message="again", max_turns=2, silent=True)
    second = [s for s in instrumented.spans if s not in first]
    assert [s.name for s in second if s.parent is None] == ["conversation engineer"]
    assert [s.name for s in second if s.name.startswith("execute_code")] == ["execute_code python"]


class _Answering(IOStream):  # type: ignore[misc]
    """An AG2 ``IOStream`` whose human answers ``exit`` (AG2's own ``get_human_input`` reads it)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        pass

    def send(self, message: Any) -> None:
        pass

    def input(self, prompt: str = "", *, password: bool = False) -> str:
        return "exit"


@pytest.mark.parametrize("point", _POINTS)
def test_ctrl_c_at_a_human_input_spans_start_leaves_no_mark(instrumented: SpanCapture, point: str) -> None:
    """Fails on 86547de: the next human input has no span (the mark stayed set)."""
    user = ConversableAgent("user", llm_config=False, human_input_mode="ALWAYS")
    assistant = offline_agent("assistant", ["first answer", "second answer"])
    raised: list[BaseException] = []
    with IOStream.set_default(_Answering()):
        _interrupt_at(point, ag2._HumanSpan, ag2._in_human_span, raised)
        _interrupted(lambda: user.initiate_chat(assistant, message="first?", max_turns=2, silent=True), raised)
        first = instrumented.spans
        assert {s.name for s in first if s.end_time is None} == set()
        human = [s for s in first if s.name.startswith("await_human_input")]
        assert [s.attributes["error.type"] for s in human] == (
            [] if point == "start-entered" else ["KeyboardInterrupt"])

        user.initiate_chat(assistant, message="second?", max_turns=2, silent=True)
    second = [s for s in instrumented.spans if s not in first]
    assert [s.name for s in second if s.parent is None] == ["conversation assistant"]
    assert [s.name for s in second if s.name.startswith("await_human_input")] == ["await_human_input user"]
