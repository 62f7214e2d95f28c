"""Session 40 (carried over, the thirty-sixth fault campaign's Left (1)): Ctrl-C in a block's ``__enter__``
before its span starts.

``_Block.__enter__`` describes the block's span first (``_open``: a phase takes the run's next phase index, a
one_shot phase the ``execute`` node id, a workflow the trace's first run), then starts it. A
``KeyboardInterrupt`` raised in between (a signal handler runs at a function's entry) left what ``_open``
took to no block: the next phase was numbered 2 and the interrupted one was in no span. The span is now
started and ended as interrupted there (``error.type=KeyboardInterrupt``), as an interrupt just after the
start is. Forced at the entry of the calls between ``_open`` and ``start()``'s ``try`` with ``conftest.interrupt_at``.
"""

from __future__ import annotations

import sys

import pytest
from opentelemetry import trace

from cmbagent_otel import _spans, phase, workflow
from tests.conftest import SpanCapture

from .conftest import Hit, called_from, interrupt_at

_MODULE = sys.modules[workflow.__module__]  # the package exports the class under the module's name
_ENTER = _MODULE._Block.__enter__.__code__


def _entry_of(name: str, filename: str, up: int) -> Hit:
    """The entry of the call ``name`` (defined in ``filename``) made ``up`` frames below ``_Block.__enter__``."""
    return lambda frame, event, _: event == "call" and frame.f_code.co_name == name \
        and frame.f_code.co_filename == filename and called_from(frame, _ENTER, up)


_POINTS = {
    # the block's own _entered (a workflow's overrides it), the span's __enter__, start() before its try
    "_entered": _entry_of("_entered", _MODULE.__file__, 1),
    "TracedSpan.__enter__": _entry_of("__enter__", _spans.__file__, 1),
    "start": _entry_of("start", _spans.__file__, 2),
}


@pytest.mark.parametrize("point", list(_POINTS))
def test_ctrl_c_before_a_phase_span_starts_records_that_phase(capture: SpanCapture, point: str) -> None:
    """Fails on 86547de: no span of phase ``a`` and phase ``b`` numbered 2."""
    with workflow("carry40"):
        with interrupt_at(_POINTS[point]), phase("a"):
            pytest.fail("the block was entered")
        assert trace.get_current_span().name == "workflow carry40"  # the phase's span is not current
        with phase("b"):
            pass
    assert not trace.get_current_span().get_span_context().is_valid
    spans = {s.name: s for s in capture.spans}
    assert spans["phase a"].attributes["error.type"] == "KeyboardInterrupt"
    assert spans["phase a"].attributes["cmbagent.phase.index"] == 1
    assert spans["phase b"].attributes["cmbagent.phase.index"] == 2
    assert all(s.end_time is not None for s in spans.values())


@pytest.mark.parametrize("point", list(_POINTS))
def test_ctrl_c_before_a_workflow_span_starts_records_that_run(capture: SpanCapture, point: str) -> None:
    with interrupt_at(_POINTS[point]), workflow("interrupted"):
        pytest.fail("the block was entered")
    assert not trace.get_current_span().get_span_context().is_valid, "the interrupted span is still current"
    with workflow("next"):
        pass
    spans = {s.name: s for s in capture.spans}
    assert spans["workflow interrupted"].attributes["error.type"] == "KeyboardInterrupt"
    assert spans["workflow next"].parent is None
    assert spans["workflow next"].context.trace_id != spans["workflow interrupted"].context.trace_id
