"""Thirtieth fault campaign: what ``SamplingProbe`` takes for sure.

The probe decides "not recorded" before anything is built, from the tracer's class and its sampler's.
It took any subclass of the SDK's ``ParentBased`` for the SDK's own (and of ``NoOpTracer``, of the SDK
tracer): a sampler subclass that keeps every agent turn whatever the parent (a common way of sampling
"the interesting spans") had them dropped ahead, for ever, as its delegates would have dropped them.
Now only the classes themselves are classified; a subclass is "may record" and the SDK decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, ParentBased, SamplingResult

import cmbagent_otel
from cmbagent_otel import semconv
from cmbagent_otel._spans import SamplingProbe, make_tracer
from cmbagent_otel.testing import offline_agent


class _AgentTurnsAlways(ParentBased):
    """Parent-based, except that every agent turn is kept."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Sequence[Any] | None = None,
                      trace_state: Any = None) -> SamplingResult:
        if name.startswith("invoke_agent"):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return super().should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)


def test_a_parent_based_subclass_keeping_agent_turns_has_them_recorded() -> None:
    """Fails on e66d960 with [] == ['invoke_agent solo', ...]: the probe took the subclass for
    ParentBased(ALWAYS_OFF) and dropped the root turn ahead."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=_AgentTurnsAlways(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False)
    try:
        for _ in range(2):  # again once the probe has classified its tracer
            offline_agent("solo", ["ok"]).generate_reply(messages=[{"role": "user", "content": "q"}])
    finally:
        cmbagent_otel.uninstrument()
        provider.shutdown()
    assert [s.name for s in memory.get_finished_spans() if s.name.startswith("invoke_agent")] == \
        ["invoke_agent solo"] * 2


class _RecordingNoOp(trace.NoOpTracer):
    """A tracer deriving from the no-op one that starts real spans (a vendor's wrapper, say)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        return self.real.start_span(*args, **kwargs)


class _OwnTracer(SdkTracer):  # type: ignore[misc]
    """An SDK tracer subclass: it may start spans its own way, whatever its sampler says."""


def test_subclasses_of_the_tracers_it_knows_are_may_record() -> None:
    def classified(tracer: Any) -> tuple[bool, bool]:
        probe = SamplingProbe(tracer)
        return probe.drops(otel_context.Context()), probe.drops_all

    assert classified(_RecordingNoOp(make_tracer(semconv.SCOPE_AG2, TracerProvider()))) == (False, False)
    sdk = make_tracer(semconv.SCOPE_AG2, TracerProvider(sampler=ALWAYS_OFF))
    sdk.__class__ = _OwnTracer
    assert classified(sdk) == (False, False)
    # the classes themselves: as before
    assert classified(make_tracer(semconv.SCOPE_AG2, TracerProvider(sampler=ALWAYS_OFF))) == (True, True)
    assert classified(trace.NoOpTracer()) == (True, True)
