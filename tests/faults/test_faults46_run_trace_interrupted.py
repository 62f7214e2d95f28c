"""A run registered as its trace's first, interrupted before its span started (44th fault campaign's Left).

A run opened inside another instrumentation's (or the application's) span stays in that span's trace when it is
the first run there, and ``workflow._open`` registers the trace for it (``_trace_of_its_own``); a later run in
the trace starts a trace of its own, linked. A ``KeyboardInterrupt`` inside ``_open`` after the registration (at
any point a signal handler runs: a Python function's entry, a C call's return) left the run in no span, and the
next run in that trace was put into a trace of its own, as if the first had been recorded there. The run is now
recorded where it was registered, failed (``error.type=KeyboardInterrupt``), as one interrupted as its span
started is (test_carry40_interrupted_block_entry).
"""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from opentelemetry import trace

from cmbagent_otel import workflow
from tests.conftest import SpanCapture

from .conftest import interrupt_at

workflow_module = importlib.import_module("cmbagent_otel.workflow")  # the package's name is the class
_OPEN = workflow._open.__code__
_OURS = str(Path(workflow_module.__file__).parent)


def _in_open(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code is _OPEN:
            return True
        frame = frame.f_back
    return False


def test_a_run_interrupted_after_its_trace_was_registered_is_recorded_there(capture: SpanCapture) -> None:
    """Fails on main 75098e5: no span of the interrupted run ``first 1`` (each point after the registration)."""
    tracer = capture.provider.get_tracer("app")
    points = 0
    for n in itertools.count(1):
        seen: list[str] = []
        with tracer.start_as_current_span(f"request {n}") as request:
            registered = request.get_span_context().trace_id

            def nth(frame: FrameType, event: str, _arg: Any, n: int = n, seen: list[str] = seen,
                    registered: int = registered) -> bool:
                if not ((event == "call" or (event == "c_return" and frame.f_code.co_filename.startswith(_OURS)))
                        and registered in workflow_module._RUN_TRACES and _in_open(frame)):
                    return False
                seen.append(f"{event} {frame.f_code.co_name}")
                return len(seen) == n

            try:
                with interrupt_at(nth), workflow(f"first {n}"):
                    pass
            except pytest.fail.Exception:  # no n-th point: every point after the registration was met
                assert n > 1, "no point inside _open after the registration"
                break
            assert trace.get_current_span() is request  # the run's span is not current
            with workflow(f"second {n}"):
                pass
        points += 1
        app = request.get_span_context()
        first = capture.one(f"workflow first {n}")
        assert first.attributes is not None and first.attributes["error.type"] == "KeyboardInterrupt", seen[-1]
        assert first.parent is not None and first.parent.span_id == app.span_id, seen[-1]
        assert first.context.trace_id == app.trace_id
        second = capture.one(f"workflow second {n}")
        assert second.context.trace_id != app.trace_id, seen[-1]
        assert [link.context.span_id for link in second.links] == [app.span_id]
    assert points >= 5, points  # the registration, the eviction check, the description: 9 on 3.11
