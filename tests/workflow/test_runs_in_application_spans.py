"""One run, one trace, also inside a span of the application's (session 37; docs/spans.md "One run, one trace").

The run id is the trace id: two runs opened inside one span that is not a run of ours shared its trace and
were stored as one run. The first run of ours in such a trace stays in it; a later one starts its own trace,
linked to the span it was opened in; a span that is not sampled stays the parent.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from cmbagent_otel import phase, workflow


def _runs(capture) -> list:
    return [s for s in capture.spans if s.name.startswith("workflow ")]


def test_a_second_run_in_an_application_span_starts_its_own_trace(capture) -> None:
    with capture.provider.get_tracer("app").start_as_current_span("POST /analyses") as request:
        for name in ("a", "b"):
            with workflow(name), phase("control"):
                pass
    first, second = _runs(capture)
    app = request.get_span_context()
    assert first.parent.span_id == app.span_id and first.context.trace_id == app.trace_id
    assert second.parent is None and second.context.trace_id != app.trace_id
    assert [link.context.span_id for link in second.links] == [app.span_id]
    for run in (first, second):  # each run's phase in its run's trace
        (p,) = [s for s in capture.named("phase") if s.parent.span_id == run.context.span_id]
        assert p.context.trace_id == run.context.trace_id


def test_runs_under_an_unsampled_span_stay_under_it(capture) -> None:
    unsampled = NonRecordingSpan(SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(0)))
    with trace.use_span(unsampled):
        for name in ("a", "b"):
            with workflow(name):
                pass
    assert _runs(capture) == []  # the SDK's parent-based sampler drops both, as the application chose
