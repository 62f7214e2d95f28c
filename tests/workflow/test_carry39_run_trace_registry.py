"""Session 39, carried-over limits: the registry of the traces runs were opened in (docs/spans.md "One run, one
trace").

The first run of ours in another span's trace stays in it, a later one starts its own trace; the traces are
remembered per process, the newest 65,536. The registry forgot the oldest first, also a trace still getting
runs: a service's long-lived span opening a run a minute was forgotten after 65,536 other traces' runs, and its
next run joined that trace again, stored as one run with its first. Now each run in a trace counts as a use and
the least recently used is forgotten. The bound is made 4 here (the same code; 65,536 traces would cost the test
seconds), so the case is reached deterministically.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Any

import pytest
from opentelemetry import trace

from cmbagent_otel import workflow

workflow_module = importlib.import_module("cmbagent_otel.workflow")  # the package's name is the class
BOUND = 4


@pytest.fixture
def small_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workflow_module, "_RUN_TRACES", OrderedDict())
    monkeypatch.setattr(workflow_module, "_RUN_TRACES_MAX", BOUND)


def _stays_in(capture: Any, name: str, span: Any) -> bool:
    """Whether the run ``name`` stayed inside ``span`` (its trace), else it started its own, linked to ``span``."""
    (run,) = [s for s in capture.spans if s.name == f"workflow {name}"]
    app = span.get_span_context()
    if run.parent is not None:
        assert run.parent.span_id == app.span_id and run.context.trace_id == app.trace_id
        return True
    assert run.context.trace_id != app.trace_id and [link.context.span_id for link in run.links] == [app.span_id]
    return False


def test_a_trace_still_getting_runs_is_not_forgotten(capture: Any, small_registry: None) -> None:
    """Fails on d1ab575 (``assert not True`` for ``again 2``: the service's trace, forgotten though a run had
    just been opened in it, was joined again)."""
    tracer = capture.provider.get_tracer("app")
    service = tracer.start_span("service loop")
    requests = 0

    def other_traces(count: int) -> None:
        nonlocal requests
        for _ in range(count):
            requests += 1
            with tracer.start_as_current_span(f"POST /analyses/{requests}"), workflow(f"request {requests}"):
                pass

    def run_in_service(name: str) -> bool:
        with trace.use_span(service), workflow(name):
            pass
        return _stays_in(capture, name, service)

    assert run_in_service("first")
    other_traces(BOUND - 1)
    assert not run_in_service("again 1")
    other_traces(BOUND - 1)  # the oldest of the other traces are forgotten, not the service's
    assert not run_in_service("again 2")
    # what is left (docs/spans.md): a trace in which no run was opened during BOUND other traces' first runs
    # is forgotten, and its next run stays in it again
    other_traces(BOUND)
    assert run_in_service("after idle")
    service.end()
