"""The agent turn's children's scope written into its generated start (issue 13, session 42).

``Scope.child_node`` (the scope under a DAG-node span: 15 fields) was a call per sub-agent turn from the
generated agent-turn start; the generator now writes it in as it writes in ``_name_node`` and ``_set_node``
(a method called through its class, from another module: its statements take the call's line). The scope
it leaves in the context must be the one ``start`` itself builds, field by field.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.context import Context

from cmbagent_otel import _spans
from cmbagent_otel._context import _SCOPE_KEY, RunState, Scope
from cmbagent_otel._specialise import specialise
from cmbagent_otel.instrumentation import ag2
from tests.conftest import SpanCapture


def _lines(*functions: Any) -> set[int | None]:
    return {line for function in functions for _, _, line in function.__code__.co_lines()}


def test_the_agent_turns_start_writes_in_its_childrens_scope() -> None:
    """No call of ``child_node`` is left in the generated agent-turn start, and its lines stay start()'s."""
    ag2._generate_starts()  # what the first instrument() does
    code = ag2._start_agent.__code__  # type: ignore[union-attr]
    assert "child_node" not in code.co_names, code.co_names
    assert _lines(ag2._start_agent) <= _lines(_spans.start, _spans._numbers_for, _spans._name_node,
                                              _spans._set_node) | {None}


def _parent(steps: Any) -> Scope:
    """A step node's children's scope in a workflow (every inherited field set)."""
    return Scope.build(RunState(session_id="s"), conversation_id="c", dag_node="step_1", dag_node_type="step",
                 dag_depth=1, dag_order=3, phase="control", step=1, in_workflow=True, steps=steps)


def _children(start: Any, order: int | None, steps: Any, capture: SpanCapture) -> dict[str, Any]:
    parent = _parent(steps)
    node = _spans.NodeSpec("step_1_engineer", "sub_agent", order_index=order, child=order is None,
                           parent="step_1" if order is None else None)
    attrs = _spans.SharedAttributes({"gen_ai.agent.name": "engineer"})
    ctx = Context({_SCOPE_KEY: parent})
    traced = start(_spans.TracedSpanShell(), "invoke_agent engineer", attrs, node,
                   capture.provider.get_tracer("t"), ctx, parent)
    try:
        scope = traced._scope
        assert type(scope) is Scope and scope is not parent and traced._token is not None
        fields = {name: getattr(scope, name) for name in Scope.__slots__}
        assert fields.pop("owner") is traced.span and fields.pop("run") is parent.run
        return fields
    finally:
        traced.__exit__(None, None, None)
        assert traced._token is None


@pytest.mark.parametrize("order", [None, 7], ids=["child", "ordered"])
def test_the_written_in_scope_is_the_one_start_builds(order: int | None) -> None:
    ag2._generate_starts()
    steps = object()  # a plan-step tracker stand-in: inherited by identity
    capture = SpanCapture()
    try:
        generated = _children(ag2._start_agent, order, steps, capture)

        def itself(self: Any, name: str, attributes: Any, node: Any, tracer: Any, ctx: Any, known: Any) -> Any:
            return _spans.start(self, name, "agent", attributes, node, None, tracer, _spans.SpanKind.INTERNAL, ctx,
                                False, None, known)

        reference = _children(itself, order, steps, capture)
    finally:
        capture.provider.shutdown()
    assert generated == reference
    assert generated["steps"] is steps and generated["dag_node"] == "step_1_engineer"
    assert generated["dag_order"] == (3001 if order is None else 7)
    assert (generated["cursor"], generated["handoffs"], generated["event_depth"]) == (None, None, 0)
    first, second = capture.spans  # the two spans: the same attributes, in the same order
    assert list(first.attributes.items()) == list(second.attributes.items())


def _scoped(parent: Scope, node_id: str, node: Any, depth: int, order: int | None, flag: bool) -> Any:
    new = Scope.child_node(parent, node_id, node, depth, order, "c")
    return (new, flag)


def _named(state: RunState, base: str, flag: bool) -> Any:
    named = RunState.unique_node_id(state, base)  # reads _context's _GIL, which this module does not have
    return named if flag else None


def test_a_method_of_another_module_is_written_in_on_the_calls_line() -> None:
    made = specialise(_scoped, "made", {"flag": True}, inline=(Scope.child_node,))
    assert "child_node" not in made.__code__.co_names
    assert _lines(made) <= _lines(_scoped) | {None}  # child_node's own lines are another file's
    parent = _parent(None)
    node = _spans.NodeSpec("n", "sub_agent", order_index=None)
    new, flag = made(parent, "n", node, 2, None)
    expected = Scope.child_node(parent, "n", node, 2, None, "c")
    assert flag is True
    assert {s: getattr(new, s) for s in Scope.__slots__} == {s: getattr(expected, s) for s in Scope.__slots__}


def test_a_method_reading_a_global_the_caller_lacks_is_called() -> None:
    made = specialise(_named, "made", {"flag": True}, inline=(RunState.unique_node_id,))
    assert made.__code__.co_filename != _named.__code__.co_filename  # not generated: start's fallback
    state = RunState()
    assert [made(state, "a"), made(state, "a")] == ["a", "a_2"]


def test_scopes_are_made_without_an_init() -> None:
    """A child scope (one per agent turn) is a plain class call that runs no ``__init__`` (~500 instructions
    less than ``Scope.__new__(Scope)``); its fields are all set by its maker, and a call with arguments, which
    would leave them unset, is refused."""
    assert Scope.__init__ is object.__init__
    for maker in (Scope.child_node, Scope.child_event, Scope.build):
        assert "__new__" not in maker.__code__.co_names, maker
    with pytest.raises(TypeError):
        Scope(RunState())  # type: ignore[call-arg]
    root = Scope.build(RunState())
    assert {name: getattr(root, name) for name in Scope.__slots__ if name != "run"} == {
        "agent_depth": 0, "conversation_id": None, "cursor": None, "dag_depth": -1, "dag_node": None,
        "dag_node_type": None, "dag_order": 0, "event_depth": 0, "handoffs": None, "in_workflow": False,
        "owner": None, "phase": None, "step": None, "steps": None}
    for child in (root.child_event("c"), root.child_node("n", _spans.NodeSpec("n", "agent"), 0, None, "c"),
                  root.evolve(phase="p")):
        assert type(child) is Scope and all(hasattr(child, name) for name in Scope.__slots__)


def _subclasses(cls: type) -> list[type]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


def test_the_wrappers_fast_decision_is_false_and_every_span_true() -> None:
    """The method wrapper tells a started span from its two other decisions (None: straight through; _FAST:
    not recorded) by one truth test: both are false, and no span class of ours (what a builder returns) defines
    a truth of its own."""
    import cmbagent_otel.instrumentation._handoffs
    import cmbagent_otel.workflow  # every TracedSpan subclass defined

    assert ag2._FAST is not None and not ag2._FAST
    classes = _subclasses(_spans.TracedSpan)
    assert {ag2._ChatSpan, ag2._GroupChatSpan, _spans.TracedSpanShell,
            cmbagent_otel.instrumentation._handoffs._SelectionSpan} <= set(classes)
    for cls in classes:
        assert not {"__bool__", "__len__"} & {name for klass in cls.__mro__[:-1] for name in vars(klass)}, cls
    assert _spans.TracedSpanShell()


def _pair(x: Any, n: int) -> tuple[Any, int]:
    second = n + 1
    first = x * 2  # raises for x=None, after `second` is set
    return first, second


def _uses_pair(x: Any, n: int, flag: bool) -> Any:
    try:
        a, b = _pair(x, n)
    except TypeError:
        return None
    return (a, b, flag)


def _guarded(x: Any, n: int, flag: bool) -> Any:
    b = -1
    try:
        a, b = _pair(x, n)
    except TypeError:
        return ("failed", b)  # read on failure: must still be -1 when _pair raised
    return (a, b, flag)


def test_a_helpers_returned_locals_are_the_callers_targets() -> None:
    """A written-in helper's returned locals are the caller's targets themselves (no copy at the end), except a
    target the caller reads on failure: bound on the helper's way, it would show the helper's partial work."""
    made = specialise(_uses_pair, "made", {"flag": True}, inline=(_pair,))
    assert not {"_pair_first", "_pair_second"} & set(made.__code__.co_varnames), made.__code__.co_varnames
    assert made(3, 4) == _uses_pair(3, 4, True) == (6, 5, True) and made(None, 4) is None
    guarded = specialise(_guarded, "made", {"flag": True}, inline=(_pair,))
    assert "_pair_first" not in guarded.__code__.co_varnames and "_pair_second" in guarded.__code__.co_varnames
    assert guarded(None, 4) == _guarded(None, 4, True) == ("failed", -1)
    assert guarded(3, 4) == (6, 5, True)
    ag2._generate_starts()  # the agent start: its children's scope straight into its locals
    names = set(ag2._start_agent.__code__.co_varnames)  # type: ignore[union-attr]
    assert "_child_node_new" not in names, names
    # the node id and order its naming took are read by start's interrupt handler (an interrupted start keeps
    # them for its retry, tests/faults/test_faults42_interrupted_numbers.py): bound only once naming returned
    assert {"_name_node_node_id", "_name_node_order"} <= names, names
