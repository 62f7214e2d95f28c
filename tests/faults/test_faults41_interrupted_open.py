"""Ctrl-C inside a phase's ``_open`` after it took the phase's index (thirty-ninth fault campaign; session 40's
carried-over Left).

``_Block.__enter__`` describes the block's span (``_open``) before starting it; a phase's ``_open`` takes the run's
next phase index first. A ``KeyboardInterrupt`` raised after that (a signal handler runs when a call returns or a
function is entered), and before ``__enter__`` held what ``_open`` returned, left the index to no block: no span
of the interrupted phase, the next phase numbered 2. The index is now taken into a list ``__enter__`` holds (in
one C call, so an interrupt as it returns finds it there) and the phase is recorded under it, failed
(``error.type=KeyboardInterrupt``), as one interrupted before its span started is
(``test_carry40_interrupted_block_entry.py``). Forced at each point with ``conftest.interrupt_at``.
"""

from __future__ import annotations

import sys

import pytest
from opentelemetry import trace

from cmbagent_otel import phase, workflow
from tests.conftest import SpanCapture

from .conftest import Hit, called_from, interrupt_at

_MODULE = sys.modules[workflow.__module__]  # the package exports the class under the module's name
_PHASE_OPEN = _MODULE.phase._open.__code__
_ENTER = _MODULE._Block.__enter__.__code__
_TAKERS = {"take_phase_index", "next_phase_index"}  # this branch's, main's


_POINTS: dict[str, Hit] = {
    # the call that took the index returns (its value lost to the caller on main)
    "index-taken": lambda frame, event, _: event == "return" and frame.f_code.co_name in _TAKERS
    and called_from(frame, _PHASE_OPEN),
    # describing the span, after the index: is_planning_phase's entry (called from _open, or what it calls)
    "describing": lambda frame, event, _: event == "call" and frame.f_code is _MODULE.is_planning_phase.__code__,
    # _open returns its span, not started, to __enter__ (lost there on main)
    "open-returns": lambda frame, event, _: event == "return" and frame.f_code is _PHASE_OPEN
    and called_from(frame, _ENTER),
}


@pytest.mark.parametrize("point", list(_POINTS))
def test_ctrl_c_in_a_phases_open_after_it_took_its_index_records_that_phase(capture: SpanCapture, point: str) -> None:
    """Fails on 3c387d5: no span of phase ``a`` and phase ``b`` numbered 2."""
    with workflow("faults41"):
        with interrupt_at(_POINTS[point]), phase("a"):
            pytest.fail("the block was entered")
        assert trace.get_current_span().name == "workflow faults41"  # the phase's span is not current
        with phase("b"):
            pass
    assert not trace.get_current_span().get_span_context().is_valid
    spans = {s.name: s for s in capture.spans}
    assert sorted(spans) == ["phase a", "phase b", "workflow faults41"]
    assert spans["phase a"].attributes["error.type"] == "KeyboardInterrupt"
    assert spans["phase a"].attributes["cmbagent.phase.index"] == 1
    assert spans["phase b"].attributes["cmbagent.phase.index"] == 2


def test_a_phase_refused_by_its_nesting_takes_no_index(capture: SpanCapture) -> None:
    """A pin: a nesting error (an ``Exception``, raised before the index is taken) records nothing."""
    with workflow("faults41"):
        with phase("a"), pytest.raises(_MODULE.WorkflowNestingError), phase("inner"):
            pass
        with phase("b"):
            pass
    spans = {s.name: s for s in capture.spans}
    assert sorted(spans) == ["phase a", "phase b", "workflow faults41"]
    assert spans["phase b"].attributes["cmbagent.phase.index"] == 2
