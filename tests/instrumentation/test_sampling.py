"""Unsampled work: decided before anything is built, context still propagated, the app unchanged.

With ``always_off``, an unsampled parent (parent-based sampling, the SDK's default) or no SDK
provider at all, the AG2 wrappers record no span and build no attributes; what remains is the
trace context (executed code gets the unsampled parent's ``TRACEPARENT``, so its own spans are
not sampled either) and what never depends on spans (metrics: see test_metrics.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import cmbagent_otel
from cmbagent_otel import semconv
from cmbagent_otel._spans import SamplingProbe, make_tracer
from cmbagent_otel.demo import group_chat_step

PRINT_TRACEPARENT = "```python\nimport os\nprint('TP=' + os.environ.get('TRACEPARENT', 'none'))\n```"
_PRINTED = re.compile(r"TP=(00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}|none)")


def _provider(sampler: Any) -> tuple[TracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def _chat(work_dir: Path) -> Any:
    return group_chat_step(str(work_dir), [{"tool_calls": [{"name": "peak_position", "arguments": {"multipole": 2}}]},
                                           PRINT_TRACEPARENT], ["engineer", "executor", "engineer", "executor",
                                                                "researcher"])


def _traceparent(result: Any) -> str:
    """What the executed code printed as its TRACEPARENT."""
    (printed,) = _PRINTED.findall(json.dumps(result.chat_history))
    return str(printed)


def _sampled(traceparent: str) -> bool:
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)  # bit 0; bit 1 is W3C level 2's "random"


@pytest.fixture
def python_on_path(monkeypatch: Any) -> None:
    # AG2's executor runs `python` from PATH: this venv's
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("TRACEPARENT", raising=False)


def test_unsampled_parent_records_nothing_and_hands_its_context_on(tmp_path, python_on_path):
    provider, memory = _provider(ParentBased(ALWAYS_ON))
    parent = SpanContext(trace_id=0x1234, span_id=0x5678, is_remote=True, trace_flags=TraceFlags(0))
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        result = _chat(tmp_path)
    finally:
        otel_context.detach(token)
        cmbagent_otel.uninstrument()
    assert memory.get_finished_spans() == ()
    assert "TERMINATE" in result.chat_history[-1]["content"]
    # the code's process got the unsampled trace's context: its own spans are not sampled either
    assert _traceparent(result) == "00-00000000000000000000000000001234-0000000000005678-00"


def test_always_off_records_nothing_but_the_chat_runs_as_without(tmp_path, python_on_path):
    provider, memory = _provider(ALWAYS_OFF)
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        with cmbagent_otel.workflow("off"), cmbagent_otel.phase("control"), cmbagent_otel.step(1, "fit"):
            result = _chat(tmp_path)
    finally:
        cmbagent_otel.uninstrument()
    assert memory.get_finished_spans() == ()
    assert "TERMINATE" in result.chat_history[-1]["content"]
    assert not _sampled(_traceparent(result))


def test_a_sampled_trace_is_recorded_in_full(tmp_path, python_on_path):
    """The ratio sampler is not read ahead: the SDK decides, a sampled trace has every span."""
    provider, memory = _provider(ParentBased(TraceIdRatioBased(1.0)))
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        result = _chat(tmp_path)
    finally:
        cmbagent_otel.uninstrument()
    spans = memory.get_finished_spans()
    code = next(s for s in spans if s.name == "execute_code python")
    traceparent = _traceparent(result)
    assert traceparent.startswith(f"00-{code.context.trace_id:032x}-{code.context.span_id:016x}-")
    assert _sampled(traceparent)
    kinds = {s.attributes[semconv.SPAN_KIND] for s in spans}
    assert {semconv.KIND_CONVERSATION, semconv.KIND_AGENT, semconv.KIND_LLM, semconv.KIND_TOOL,
            semconv.KIND_CODE} <= kinds


def test_probe_reads_the_sampler_ahead_only_when_it_can():
    def drops(sampler: Any, parent: Any = None) -> bool:
        provider = TracerProvider(sampler=sampler)
        probe = SamplingProbe(make_tracer(semconv.SCOPE_AG2, provider))
        ctx = trace.set_span_in_context(parent) if parent is not None else otel_context.Context()
        return probe.drops(ctx)

    unsampled = NonRecordingSpan(SpanContext(1, 2, is_remote=False, trace_flags=TraceFlags(0)))
    sampled_remote = NonRecordingSpan(SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(1)))
    assert drops(ALWAYS_OFF) and drops(ALWAYS_OFF, sampled_remote)
    assert drops(ParentBased(ALWAYS_ON), unsampled)
    assert not drops(ParentBased(ALWAYS_ON))  # a root: the root sampler samples it
    assert drops(ParentBased(ALWAYS_OFF))  # a root the root sampler drops
    assert not drops(ParentBased(ALWAYS_ON), sampled_remote)  # a sampled remote parent: recorded
    assert not drops(TraceIdRatioBased(0.5), unsampled)  # not parent-based: the SDK decides
    assert not drops(ParentBased(ALWAYS_ON, local_parent_not_sampled=ALWAYS_ON), unsampled)
    assert SamplingProbe(trace.NoOpTracer()).drops(otel_context.Context())


def test_probe_says_it_drops_every_span_only_for_a_tracer_that_does():
    """``drops_all`` (what the wrappers read before calling ``drops()``): a no-op tracer and ``always_off``
    once classified; never a sampler that may record, nor before the probe has looked at its tracer."""
    def drops_all(tracer: Any) -> tuple[bool, bool]:
        probe = SamplingProbe(tracer)
        before = probe.drops_all
        probe.drops(otel_context.Context())
        return before, probe.drops_all

    assert drops_all(trace.NoOpTracer()) == (False, True)
    assert drops_all(make_tracer(semconv.SCOPE_AG2, TracerProvider(sampler=ALWAYS_OFF))) == (False, True)
    for sampler in (ParentBased(ALWAYS_OFF), ParentBased(ALWAYS_ON), TraceIdRatioBased(0.5), ALWAYS_ON):
        assert drops_all(make_tracer(semconv.SCOPE_AG2, TracerProvider(sampler=sampler))) == (False, False)


def test_probe_of_the_global_tracer_follows_the_provider_set_later():
    """In a fresh process: a proxy tracer drops everything until the app sets its SDK provider,
    then reads that provider's sampler (parent-based: an unsampled parent is dropped ahead)."""
    script = textwrap.dedent("""
        from opentelemetry import context, trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
        from cmbagent_otel import semconv
        from cmbagent_otel._spans import SamplingProbe, make_tracer

        probe = SamplingProbe(make_tracer(semconv.SCOPE_AG2))
        unsampled = trace.set_span_in_context(NonRecordingSpan(SpanContext(1, 2, False, TraceFlags(0))))
        before = probe.drops(context.Context())
        all_before = probe.drops_all  # the proxy's no-op tracer drops all only until a provider is set
        trace.set_tracer_provider(TracerProvider())
        print(before, all_before, probe.drops(context.Context()), probe.drops(unsampled),
              probe.drops(context.Context()), probe.drops_all)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "False", "False", "True", "False", "False"]
