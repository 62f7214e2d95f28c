"""Ctrl-C inside a span's start (leftover (1) of the thirty-sixth fault campaign).

A ``KeyboardInterrupt`` raised by a signal handler at a call inside ``_spans.start()`` after the span's
context was attached never reached the wrapper's ``try``: the span stayed open and current in the thread,
and an application catching the interrupt (a notebook cell does) ran its next chat as that span's
children, in a trace that never ends. The interrupt is forced at two exact points with ``conftest.interrupt_at``, as a
signal handler would raise it there: when ``attach`` returns (a profile hook's ``c_return``: the exception
replaces its result, so the token is never kept) and at the line after the attach (a trace hook's ``line`` event).
"""

from __future__ import annotations

import inspect
import sys
from types import CodeType, FrameType
from typing import Any

import pytest
from opentelemetry import trace

from cmbagent_otel import _spans
from cmbagent_otel.testing import offline_agent
from tests.conftest import SpanCapture

from .conftest import Hit, interrupt_at

_AFTER_ATTACH = next(number for number, line in enumerate(inspect.getsource(_spans.start).splitlines(),
                                                        _spans.start.__code__.co_firstlineno)
                     if line.strip().startswith("self._timing = "))
_START = _spans.start.__code__


def _when_attach_returns(frame: FrameType, event: str, arg: Any) -> bool:
    return event == "c_return" and arg is _spans.attach and frame.f_code is _START


def _line_after_attach(frame: FrameType, event: str, arg: Any) -> bool:
    return event == "line" and frame.f_lineno == _AFTER_ATTACH


@pytest.mark.parametrize(("hit", "lines_of"), [(_when_attach_returns, None), (_line_after_attach, _START)],
                         ids=["when-attach-returns", "line-after-attach"])
def test_ctrl_c_inside_start_ends_the_span_and_leaves_no_context(
        instrumented: SpanCapture, hit: Hit, lines_of: CodeType | None) -> None:
    user = offline_agent("user", [], max_consecutive_auto_reply=0)
    assistant = offline_agent("assistant", ["first answer", "second answer"])
    with interrupt_at(hit, lines_of=lines_of):  # caught, as a notebook cell does
        user.initiate_chat(assistant, message="first?", max_turns=1, silent=True)
    assert not trace.get_current_span().get_span_context().is_valid, "the interrupted span is still current"
    interrupted = instrumented.spans
    assert [s.name for s in interrupted] == ["conversation assistant"], "the interrupted span was not ended"
    assert interrupted[0].attributes["error.type"] == "KeyboardInterrupt"

    user.initiate_chat(assistant, message="second?", max_turns=1, silent=True)
    second = [s for s in instrumented.spans if s not in interrupted]
    roots = [s.name for s in second if s.parent is None]
    assert roots == ["conversation assistant"], roots
    assert {s.context.trace_id for s in second} == {second[0].context.trace_id}
    assert interrupted[0].context.trace_id != second[0].context.trace_id


def test_ctrl_c_after_a_code_span_started_ends_it_and_its_bookkeeping(instrumented: SpanCapture,
                                                                      tmp_path: Any) -> None:
    """The same after ``start()`` returned, in what a span's ``__enter__`` does next (the code span hands its
    trace context to the processes the code starts): forced when that hand-over is called, as a signal
    handler at its first instruction would."""
    from autogen import ConversableAgent
    from autogen.coding import LocalCommandLineCodeExecutor

    from cmbagent_otel.instrumentation import _subprocess_context

    code_execution = {"executor": LocalCommandLineCodeExecutor(work_dir=str(tmp_path))}
    executor = ConversableAgent("executor", llm_config=False, human_input_mode="NEVER",
                                code_execution_config=code_execution)
    engineer = offline_agent("engineer", ["```python\nprint('one')\n```", "```python\nprint('two')\n```"])
    with interrupt_at(lambda frame, event, _: event == "call" and frame.f_code is _subprocess_context.enter.__code__):
        executor.initiate_chat(engineer, message="go", max_turns=2, silent=True)
    assert not trace.get_current_span().get_span_context().is_valid, "the interrupted span is still current"
    first = instrumented.spans
    code = [s for s in first if s.name == "execute_code python"]
    assert len(code) == 1 and code[0].attributes["error.type"] == "KeyboardInterrupt"
    assert {s.name for s in first if s.end_time is None} == set()

    executor.initiate_chat(engineer, message="again", max_turns=2, silent=True)
    second = [s for s in instrumented.spans if s not in first]
    assert [s.name for s in second if s.parent is None] == ["conversation engineer"]
    # the code span's "already inside one" mark was undone: the second chat's code has its span
    assert [s.name for s in second if s.name.startswith("execute_code")] == ["execute_code python"]


@pytest.mark.parametrize("at", ["_Entry", "append"])
def test_ctrl_c_while_a_workflow_block_is_entered_ends_its_span(capture: SpanCapture, at: str) -> None:
    """The workflow API's blocks: a ``with`` statement takes a block over only once its ``__enter__`` has
    returned, and a block registers its entry after its span started. Forced at the entry's making and at
    its registration under the lock (the last call of ``__enter__``)."""
    from cmbagent_otel import workflow as workflow_block

    module = sys.modules[workflow_block.__module__]  # the package exports the class under the module's name

    def hit(frame: FrameType, event: str, arg: Any) -> bool:
        if at == "_Entry":
            return event == "call" and frame.f_code is module._Entry.__init__.__code__
        return event == "c_call" and getattr(arg, "__name__", None) == "append" \
            and frame.f_code is module._Block.__enter__.__code__
    with interrupt_at(hit), workflow_block("interrupted"):
        pytest.fail("the block was entered")
    assert not trace.get_current_span().get_span_context().is_valid, "the interrupted span is still current"
    interrupted = capture.spans
    assert [s.name for s in interrupted] == ["workflow interrupted"], "the interrupted span was not ended"
    assert interrupted[0].attributes["error.type"] == "KeyboardInterrupt"
    with workflow_block("next"):
        pass
    second = [s for s in capture.spans if s not in interrupted]
    assert [(s.name, s.parent) for s in second] == [("workflow next", None)]
