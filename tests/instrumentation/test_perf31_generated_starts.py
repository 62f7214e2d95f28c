"""The span starts generated per span type (``_spans.start_of``, issue 13, session 41).

An agent turn, a model call and a tool call start through copies of ``_spans.start`` generated from its
source with their kind, OTel span kind, no run, conversation or scope change fixed (``_specialise``).
They must emit exactly what ``start`` itself emits, keep its Ctrl-C handling, and fold what their type
decides. The partial evaluator is also checked on small functions, where its folding rules are plain.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind

import cmbagent_otel
from cmbagent_otel import _spans, semconv
from cmbagent_otel._specialise import specialise
from cmbagent_otel.demo import group_chat_step
from cmbagent_otel.instrumentation import ag2
from cmbagent_otel.testing import offline_agent
from tests.conftest import SpanCapture

# ids made fresh per run: session and conversation ids, uuids, the offline model's response and tool call ids
# (also inside content texts)
_FRESH = re.compile(r"\b[0-9a-f]{32}\b|\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"
                    r"|\bcall_\d+\b|\bchatcmpl-\w+\b")


def _normalised(spans: list[Any]) -> list[tuple[Any, ...]]:
    """Every span as (name, kind, parent's index, status, attributes in order, events), fresh ids numbered."""
    names: dict[str, str] = {}

    def value(v: Any) -> Any:
        if isinstance(v, str):
            return _FRESH.sub(lambda m: names.setdefault(m.group(), f"<id {len(names)}>"), v)
        return v

    index = {s.context.span_id: i for i, s in enumerate(spans)}
    return [(s.name, s.kind, index.get(s.parent.span_id) if s.parent is not None else None, s.status.status_code,
             [(k, value(v)) for k, v in s.attributes.items()],
             [(e.name, [(k, value(v)) for k, v in e.attributes.items()]) for e in s.events]) for s in spans]


def _start_itself(kind: str, span_kind: SpanKind, has_node: bool) -> Callable[..., Any]:
    """``_spans.start`` called as the generated start of ``kind`` is (the reference)."""
    if has_node:
        def through(self: Any, name: str, attributes: Any, node: Any, tracer: Any, ctx: Any, known: Any = None) -> Any:
            return _spans.start(self, name, kind, attributes, node, None, tracer, span_kind, ctx, False, None, known)
        return through

    def through_event(self: Any, name: str, attributes: Any, tracer: Any, ctx: Any, known: Any = None) -> Any:
        return _spans.start(self, name, kind, attributes, None, None, tracer, span_kind, ctx, False, None, known)
    return through_event


def _chats(tmp_path: Any) -> None:
    """Agent turns as sub-agent nodes, as a manager's and as speakers' event spans, at top level (no scope:
    start's own path in the copy), model and tool calls, inside a workflow step and in a run of its own."""
    script = [{"tool_calls": [{"name": "peak_position", "arguments": {"multipole": 2}}]},
              "```python\nprint('peaks at 220, 540')\n```"]
    speakers = ["engineer", "executor", "engineer", "executor", "researcher"]
    for work in ("top", "step"):
        (tmp_path / work).mkdir(parents=True)
    group_chat_step(str(tmp_path / "top"), script, speakers)
    with cmbagent_otel.workflow("w"), cmbagent_otel.phase("control"), cmbagent_otel.step(1, "fit"):
        group_chat_step(str(tmp_path / "step"), script, speakers)
    user = offline_agent("user", [], max_consecutive_auto_reply=0)
    assistant = offline_agent("assistant", ["an answer", "another"])
    user.initiate_chat(assistant, message="a question?", max_turns=1, silent=True)
    assistant.generate_reply([{"role": "user", "content": "directly"}], sender=user)  # a top-level agent turn


def _recorded(tmp_path: Any, capture_content: bool, reference: bool, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    capture = SpanCapture()
    with _spans.workflow_tracers.routed_to(capture.provider):
        cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False,
                                 capture_content=capture_content)
        try:
            with monkeypatch.context() as patch:
                if reference:
                    patch.setattr(ag2, "_start_agent", _start_itself(semconv.KIND_AGENT, SpanKind.INTERNAL, True))
                    patch.setattr(ag2, "_start_llm", _start_itself(semconv.KIND_LLM, SpanKind.CLIENT, False))
                    patch.setattr(ag2, "_start_tool", _start_itself(semconv.KIND_TOOL, SpanKind.INTERNAL, False))
                _chats(tmp_path / ("reference" if reference else "generated"))
        finally:
            cmbagent_otel.uninstrument()
    capture.provider.shutdown()
    return _normalised(capture.spans)


@pytest.mark.parametrize("capture_content", [False, True], ids=["content-off", "content-on"])
def test_the_generated_starts_emit_what_start_itself_emits(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                           capture_content: bool) -> None:
    generated = _recorded(tmp_path, capture_content, False, monkeypatch)
    reference = _recorded(tmp_path, capture_content, True, monkeypatch)
    assert len(generated) >= 30
    kinds = {attrs.get(semconv.SPAN_KIND) for attrs in (dict(s[4]) for s in generated)}
    assert {semconv.KIND_AGENT, semconv.KIND_LLM, semconv.KIND_TOOL} <= kinds
    assert generated == reference


def test_a_span_types_start_folds_what_its_type_decides() -> None:
    """The builders use generated starts, on start()'s own source lines, with no test left of the arguments or
    module constants their type fixes and the DAG node's naming written in (no call of its helpers)."""
    ag2._generate_starts()  # what the first instrument() does
    generic = _spans.start.__code__
    lines = {line for code in (generic, _spans._numbers_for.__code__, _spans._name_node.__code__,
                               _spans._set_node.__code__)
             for _, _, line in code.co_lines()}
    for made in (ag2._start_agent, ag2._start_llm, ag2._start_tool):
        assert made is not None and made.__code__ is not generic
        code = made.__code__
        assert code.co_filename == generic.co_filename and code.co_firstlineno == generic.co_firstlineno
        assert {"LEAF_KINDS", "TIMED_KINDS", "_GIL", "SPAN_KEY", "_name_node", "_set_node", "with_scope",
                "next_order"}.isdisjoint(code.co_names), code.co_names
        assert "kind" not in code.co_varnames and "scope_changes" not in code.co_varnames
        assert {line for _, _, line in code.co_lines()} <= lines | {None}
    # its children's scope written in too since session 42 (test_perf33_child_scope_written_in)
    assert "node" in ag2._start_agent.__code__.co_varnames and "child_node" not in ag2._start_agent.__code__.co_names
    assert "node" not in ag2._start_llm.__code__.co_varnames and "_track" not in ag2._start_llm.__code__.co_names


# start()'s line after its context is attached: the generated copies keep start()'s lines
_AFTER_ATTACH = next(number for number, line in enumerate(inspect.getsource(_spans.start).splitlines(),
                                                        _spans.start.__code__.co_firstlineno)
                     if line.strip().startswith("self._timing = "))


def _in_the_turns_start(frame: FrameType) -> bool:
    made = ag2._start_agent
    return made is not None and frame.f_code is made.__code__


def _when_attach_returns(raised: list[BaseException]) -> None:
    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_return" and arg is _spans.attach and _in_the_turns_start(frame):
            raised.append(KeyboardInterrupt())
            raise raised[-1]  # the hook is removed by the interpreter when it raises
    sys.setprofile(profile)


def _at_the_line_after_attach(raised: list[BaseException]) -> None:
    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == _AFTER_ATTACH:
            raised.append(KeyboardInterrupt())
            raise raised[-1]
        return local

    sys.settrace(lambda frame, event, arg: local if _in_the_turns_start(frame) else None)


@pytest.fixture(params=[_when_attach_returns, _at_the_line_after_attach], ids=["when-attach-returns",
                                                                               "line-after-attach"])
def _interrupt_in_a_generated_start(request: pytest.FixtureRequest) -> Iterator[list[BaseException]]:
    """A KeyboardInterrupt raised inside the agent turn's generated start once its context is attached, as a
    signal handler would raise it there (when ``attach`` returns: the token never kept; or at the next line)."""
    raised: list[BaseException] = []
    request.param(raised)
    try:
        yield raised
    finally:
        sys.setprofile(None)
        sys.settrace(None)


def test_ctrl_c_inside_a_generated_start_ends_its_span(instrumented: SpanCapture,
                                                       _interrupt_in_a_generated_start: list[BaseException]) -> None:
    user = offline_agent("user", [], max_consecutive_auto_reply=0)
    assistant = offline_agent("assistant", ["first answer", "second answer"])
    with pytest.raises(KeyboardInterrupt) as caught:  # as a notebook cell catches it
        user.initiate_chat(assistant, message="first?", max_turns=1, silent=True)
    sys.setprofile(None)
    sys.settrace(None)
    assert _interrupt_in_a_generated_start and caught.value is _interrupt_in_a_generated_start[0]  # unchanged
    assert not trace.get_current_span().get_span_context().is_valid, "the interrupted span is still current"
    interrupted = instrumented.spans
    assert sorted(s.name for s in interrupted) == ["conversation assistant", "invoke_agent assistant"]
    assert all(s.attributes["error.type"] == "KeyboardInterrupt" for s in interrupted)
    user.initiate_chat(assistant, message="second?", max_turns=1, silent=True)
    second = [s for s in instrumented.spans if s not in interrupted]
    assert [s.name for s in second if s.parent is None] == ["conversation assistant"]
    assert {s.context.trace_id for s in second} == {second[0].context.trace_id}


# --- the partial evaluator on small functions ---------------------------------------------------------------
_LIMIT = 3


def _sample(a: Any, flag: Any, b: Any = None, extra: Any = None) -> Any:
    out = []
    if flag and a:
        out.append("both")
    if not flag or a is None:
        out.append("either")
    value = flag and a  # a value, not a test: `and` gives its operand
    other = flag or b
    out.append(value)
    out.append(other)
    out.append("big" if _LIMIT > 2 else "small")
    pair = _helper(a, len(out))  # written in: its argument expression evaluated once, first
    out.append(pair)
    if extra is not None:
        out.append(extra)
    return out


def _helper(x: Any, n: int) -> Any:
    y = (x, n)
    return y


@pytest.mark.parametrize("flag", [True, False, 0, 1, "", "x", None])
@pytest.mark.parametrize("a", [None, 0, 5])
def test_a_specialised_function_returns_what_the_function_does(flag: Any, a: Any) -> None:
    made = specialise(_sample, "_sample_fixed", {"flag": flag}, constants=("_LIMIT",), inline=(_helper,))
    assert made.__code__ is not _sample.__code__ and "flag" not in made.__code__.co_varnames
    assert "_helper" not in made.__code__.co_names and "_LIMIT" not in made.__code__.co_names
    for b in (None, "b"):
        assert made(a, b) == _sample(a, flag, b)
        assert made(a, b, extra=7) == _sample(a, flag, b, 7)
    not_none = specialise(_sample, "_sample_extra", {"flag": flag}, not_none=("extra",))
    assert not_none(a, None, 7) == _sample(a, flag, None, 7)


_SHADOWED = 10


def _reads_global(x: int) -> int:
    y = x + _SHADOWED
    return y


def _shadows(x: int, flag: bool) -> int:
    _SHADOWED = 1  # the name the helper reads as a global, a local here: written in, it would read this one
    y = _reads_global(x)
    return y + _SHADOWED if flag else y


def test_what_cannot_be_generated_calls_the_function_itself() -> None:
    assert specialise(_shadows, "made", {"flag": True}, inline=(_reads_global,))(2) == _shadows(2, True) == 13

    namespace: dict[str, Any] = {}
    exec("def no_source(a, flag, b=2):\n    return (a if flag else -a, b)\n"  # no source file to read
         "def keywords(a, flag, *, b=2):\n    return (a if flag else -a, b)\n", namespace)
    for function in (namespace["no_source"], namespace["keywords"]):  # a made function; Signature.bind
        made = specialise(function, "made", {"flag": False})
        assert made(3) == (-3, 2) and made(a=4, b=5) == (-4, 5) and made.__name__ == "made"
    # plain parameters: one plain call per call, no signature binding (the fallback of start() per span)
    assert "bind" not in specialise(namespace["no_source"], "made", {"flag": False}).__code__.co_names

    def assigns(a: Any, flag: Any) -> Any:
        flag = not flag  # a fixed argument assigned: its value is not known everywhere
        return a if flag else -a
    assert specialise(assigns, "made", {"flag": True})(5) == -5
