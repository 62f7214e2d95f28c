"""Ctrl-C as a phase opens, after it took one of the run's numbers besides its index (44th fault campaign).

``phase._open`` takes the run's phase index into the ``taken`` list ``__enter__`` holds (session 42), then
describes the span: a planning phase takes the run's planning number (the first planning phase is cmbagent's own
at order 0, a later one at ``1000 + index``), a ``one_shot`` phase the ``execute`` node's number (``execute``,
then ``execute_2``). Those were taken with ``next()`` on each description, and the retry of an interrupted open
(``_taken_interrupted``) described the phase again: a ``KeyboardInterrupt`` raised as the number's ``next()``
returned, as ``_described`` returned or as ``_open`` returned took a second one. The first planning phase was
recorded at order 1001 (none at 0), the first one_shot as ``execute_2`` at 1001 (no ``execute``). Forced with
``conftest.interrupt_at`` at the first C call's return once the counter advanced, and at those returns.
"""

from __future__ import annotations

from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from cmbagent_otel import phase, workflow
from cmbagent_otel._context import _PLANNINGS_KEY, RunState
from cmbagent_otel.workflow import EXECUTE_NODE, ONE_SHOT_PHASE
from tests.conftest import SpanCapture

from .conftest import Hit, interrupt_at


def _counter_at(key: str, taken: int) -> Hit:
    """The first C call's return in a method of the run's state once its counter ``key`` handed out ``taken``."""
    def hit(frame: FrameType, event: str, _arg: Any) -> bool:
        state = frame.f_locals.get("self") if event == "c_return" else None
        if type(state) is not RunState:
            return False
        return repr(state._counters.get(key)) == f"count({taken + 1})"
    return hit


def _returns(name: str) -> Hit:
    return lambda frame, event, _arg: (event == "return" and frame.f_code.co_name == name
                                       and type(frame.f_locals.get("self")) is phase)


_POINTS: dict[str, Callable[[str], Hit]] = {
    "number-taken": lambda key: _counter_at(key, 1),
    "described": lambda key: _returns("_described"),
    "opened": lambda key: _returns("_open"),
}


def _phases(capture: SpanCapture) -> list[tuple[Any, Any, Any]]:
    return [(s.attributes.get("cmbagent.dag.node"), s.attributes.get("cmbagent.dag.order_index"),
             s.attributes.get("error.type")) for s in capture.spans if s.name.startswith("phase ")]


@pytest.mark.parametrize("point", list(_POINTS))
def test_ctrl_c_as_a_planning_phase_takes_its_number_keeps_it_cmbagents_planning(capture: SpanCapture,
                                                                                 point: str) -> None:
    """Fails on 5712a9c at "number-taken", "described" and "opened": the first planning phase at order 1001."""
    with workflow("faults44"):
        with interrupt_at(_POINTS[point](_PLANNINGS_KEY)), phase("planning"):
            pytest.fail("the block was entered")
        with phase("planning"):
            pass
    assert _phases(capture) == [("planning", 0, "KeyboardInterrupt"), ("planning_2", 1002, None)]


@pytest.mark.parametrize("point", list(_POINTS))
def test_ctrl_c_as_a_one_shot_phase_takes_its_number_keeps_its_execute_node(capture: SpanCapture,
                                                                             point: str) -> None:
    """Fails on 5712a9c at each point: the first one_shot's node ``execute_2`` at order 1001."""
    with workflow("faults44"):
        with interrupt_at(_POINTS[point](EXECUTE_NODE)), phase(ONE_SHOT_PHASE):
            pytest.fail("the block was entered")
        with phase(ONE_SHOT_PHASE):
            pass
    assert _phases(capture) == [("execute", 1, "KeyboardInterrupt"), ("execute_2", 1002, None)]
