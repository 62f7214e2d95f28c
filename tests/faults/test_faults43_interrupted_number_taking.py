"""Ctrl-C as a block's span start takes the run's number for its DAG node (41st fault campaign; session 42's Left).

``_name_node`` names a DAG node from the run's counters: a unique id takes the next number for its base (``a``,
then ``a_2``), a child node first the next index among its parent's children. Session 42 kept the id for the
workflow API's retry of an interrupted start once the id was named (``_keep_taken``/``retake_node``), but a
``KeyboardInterrupt`` raised as the counter's ``next()`` returned (a signal handler runs when a call returns)
or as ``_name_node`` returned to ``start`` lost the number with the return value: the counter had advanced and
the retry took the next one (phase ``a`` recorded as ``a_2``, no node ``a``; step 1 as ``step_1_2``; a redo as
``step_1_redo_1_2``, or under the parent's next child index). Forced with ``conftest.interrupt_at`` at the first
C call's return after the counter advanced (wherever the number is taken), and at ``_name_node``'s return.
"""

from __future__ import annotations

from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from cmbagent_otel import phase, redo, step, workflow
from cmbagent_otel._context import CHILDREN_KEY, RunState
from cmbagent_otel._spans import _name_node
from tests.conftest import SpanCapture

from .conftest import Hit, interrupt_at


def _naming(frame: FrameType) -> bool:
    """``frame`` names a DAG node: ``_name_node``, or ``_spans.start``/a generated ``start_<kind>`` (where
    ``_name_node`` is written in) before the node's id is bound."""
    code = frame.f_code
    return code is _name_node.__code__ or (code.co_name.startswith("start") and "node_id" not in frame.f_locals)


def _counter_at(key: str, taken: int) -> Hit:
    """The first C call's return to a frame naming a node, or to one it called to take a number
    (``RunState.take``), once the run's counter ``key`` has handed out ``taken`` (the number the interrupted
    start took is then with that return, or kept)."""
    def hit(frame: FrameType, event: str, _arg: Any) -> bool:
        if event != "c_return" or not (_naming(frame) or (frame.f_back is not None and _naming(frame.f_back))):
            return False
        state = next((v for v in (frame.f_locals.get("state"), frame.f_locals.get("self")) if type(v) is RunState),
                     None)
        counter = state._counters.get(key) if state is not None else None
        return repr(counter) == f"count({taken + 1})"
    return hit


def _name_node_returns(frame: FrameType, event: str, _arg: Any) -> bool:
    return event == "return" and frame.f_code is _name_node.__code__


def _nodes(capture: SpanCapture) -> list[tuple[str, Any, Any, Any]]:
    return [(s.name, s.attributes.get("cmbagent.dag.node"), s.attributes.get("cmbagent.dag.order_index"),
             s.attributes.get("error.type")) for s in capture.spans if "cmbagent.dag.node_type" in s.attributes]


_PHASE_POINTS: dict[str, Hit] = {"number-taken": _counter_at("a", 1), "named": _name_node_returns}


@pytest.mark.parametrize("point", list(_PHASE_POINTS))
def test_ctrl_c_as_a_phase_takes_its_number_keeps_its_node_id(capture: SpanCapture, point: str) -> None:
    """Fails on 5d6278f: phase ``a``'s node is ``a_2``, the next phase ``a`` is ``a_3``."""
    with workflow("faults43"):
        with interrupt_at(_PHASE_POINTS[point]), phase("a"):
            pytest.fail("the block was entered")
        with phase("a"):  # a second phase of the same name: the next number
            pass
    assert [(name, node, error) for name, node, _, error in _nodes(capture)] == [
        ("phase a", "a", "KeyboardInterrupt"), ("phase a", "a_2", None)]


_STEP_POINTS: dict[str, Hit] = {"number-taken": _counter_at("step_1", 1), "named": _name_node_returns}


@pytest.mark.parametrize("point", list(_STEP_POINTS))
def test_ctrl_c_as_a_step_takes_its_number_keeps_its_node_id(capture: SpanCapture, point: str) -> None:
    """Fails on 5d6278f: step 1's node is ``step_1_2``."""
    with workflow("faults43"), phase("control"):
        with interrupt_at(_STEP_POINTS[point]), step(1, "first", agent="engineer"):
            pytest.fail("the block was entered")
        with step(2, "second", agent="engineer"):
            pass
    assert [(name, node, error) for name, node, _, error in _nodes(capture)][1:] == [
        ("step 1", "step_1", "KeyboardInterrupt"), ("step 2", "step_2", None)]


def _redo_points() -> dict[str, Callable[[str], Hit]]:
    # a redo is a child node: the parent's next child index first, then its unique id's number
    return {"index-taken": lambda parent: _counter_at(CHILDREN_KEY + parent, 1),
            "number-taken": lambda parent: _counter_at(f"{parent}_redo_1", 1),
            "named": lambda parent: _name_node_returns}


@pytest.mark.parametrize("point", list(_redo_points()))
def test_ctrl_c_as_a_redo_takes_its_numbers_keeps_its_node_id_and_order(capture: SpanCapture, point: str) -> None:
    """Fails on 5d6278f: the redo's node is ``step_1_redo_1_2``, or its order the parent's second child's."""
    with workflow("faults43"), phase("control"), step(1, "first", agent="engineer"):
        with interrupt_at(_redo_points()[point]("step_1")), redo(1, 1):
            pytest.fail("the block was entered")
        with redo(1, 2):
            pass
    assert [(node, order, error) for _, node, order, error in _nodes(capture)][2:] == [
        ("step_1_redo_1", 1001, "KeyboardInterrupt"), ("step_1_redo_2", 1002, None)]
