"""Instrumentor state lives in one instrument() ... uninstrument() cycle, never in module globals."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from autogen import ConversableAgent
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel
from cmbagent_otel import semconv
from cmbagent_otel._spans import workflow_tracers
from cmbagent_otel.instrumentation.ag2 import AG2Instrumentor
from cmbagent_otel.testing import offline_agent

from .roomy import RoomyAgent


class SpanCapture:
    def __init__(self) -> None:
        self.memory = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))

    @property
    def spans(self) -> list:
        return list(self.memory.get_finished_spans())


def chat_in_workflow(label: str) -> None:
    alice = offline_agent("alice", [f"answer {label}"])
    bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
    with cmbagent_otel.workflow(label), cmbagent_otel.phase("control"), cmbagent_otel.step(1, "ask"):
        bob.initiate_chat(alice, message=f"question {label}", max_turns=1, silent=True)


def test_ag2_and_workflow_spans_have_distinct_scopes(instrumented):
    chat_in_workflow("scopes")
    scopes = {s.name: s.instrumentation_scope.name for s in instrumented.spans}
    assert scopes["workflow scopes"] == scopes["phase control"] == scopes["step 1"] == semconv.SCOPE_WORKFLOW
    for name in ("conversation alice", "invoke_agent alice", "chat scripted"):
        assert scopes[name] == semconv.SCOPE_AG2, name
    versions = {s.instrumentation_scope.version for s in instrumented.spans}
    assert versions == {cmbagent_otel.__version__}


def test_uninstrument_drops_the_provider_and_the_capture_settings():
    first, second = SpanCapture(), SpanCapture()
    instrumentor = AG2Instrumentor()
    instrumentor.instrument(tracer_provider=first.provider, capture_content=True)
    try:
        chat_in_workflow("first")
    finally:
        instrumentor.uninstrument()
    assert instrumentor._state is None
    assert {s.name for s in first.spans} >= {"workflow first", "chat scripted"}
    assert any(semconv.GEN_AI_INPUT_MESSAGES in s.attributes for s in first.spans)
    count = len(first.spans)

    # a new cycle with another provider and default settings: nothing of the first one is left
    instrumentor.instrument(tracer_provider=second.provider)
    try:
        chat_in_workflow("second")
    finally:
        instrumentor.uninstrument()
    assert len(first.spans) == count
    assert {s.name for s in second.spans} >= {"workflow second", "chat scripted"}
    assert not any(semconv.GEN_AI_INPUT_MESSAGES in s.attributes for s in second.spans)

    # uninstrumented: the workflow API no longer routes to either provider
    with cmbagent_otel.workflow("after"):
        pass
    assert len(first.spans) == count and "workflow after" not in {s.name for s in second.spans}


def test_workflow_routing_is_released_by_each_holder_independently():
    outer, inner = SpanCapture(), SpanCapture()
    with workflow_tracers.routed_to(outer.provider):
        AG2Instrumentor().instrument(tracer_provider=inner.provider)
        try:
            with cmbagent_otel.workflow("while instrumented"):
                pass
        finally:
            AG2Instrumentor().uninstrument()
        with cmbagent_otel.workflow("after uninstrument"):
            pass
    assert [s.name for s in inner.spans] == ["workflow while instrumented"]
    assert [s.name for s in outer.spans] == ["workflow after uninstrument"]


def test_workflow_api_without_instrument_uses_the_global_provider():
    """In a fresh process: the app sets its SDK provider globally, never calls instrument()."""
    script = textwrap.dedent("""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import cmbagent_otel

        with cmbagent_otel.workflow("before the provider"):
            pass  # no provider yet: nothing recorded, nothing raised
        memory = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        trace.set_tracer_provider(provider)
        with cmbagent_otel.workflow("global"), cmbagent_otel.phase("planning"):
            pass
        print(sorted((s.name, s.instrumentation_scope.name) for s in memory.get_finished_spans()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(sorted([("phase planning", semconv.SCOPE_WORKFLOW),
                                             ("workflow global", semconv.SCOPE_WORKFLOW)]))


def test_instrument_binds_one_set_of_run_metrics_for_all_its_instrumentors():
    """instrument() binds the workflow API through itself and through the AG2 instrumentor (and the
    cmbagent one when cmbagent is there): same providers, so one tracer and one set of run metrics."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    capture = SpanCapture()
    cmbagent_otel.instrument(tracer_provider=capture.provider, meter_provider=MeterProvider(metric_readers=[reader]),
                             instrument_threading=False)
    try:
        metrics = workflow_tracers.current_metrics()
        tracer = workflow_tracers.current()
        AG2Instrumentor().uninstrument()  # releases the AG2 instrumentor's binding only
        assert workflow_tracers.current_metrics() is metrics
        assert workflow_tracers.current() is tracer
        with cmbagent_otel.workflow("bound once"):
            pass
    finally:
        cmbagent_otel.uninstrument()
    assert [s.name for s in capture.spans] == ["workflow bound once"]
    data = reader.get_metrics_data()
    names = [m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
    assert names and len(names) == len(set(names))


def test_an_agent_given_the_id_of_a_dropped_one_gets_its_own_facts(instrumented):
    """The per-agent facts are found by the agent's id with no identity check (``ag2._remember``): an entry
    must go when its agent does, so that a new agent that gets a dropped one's id (memory reused) never
    takes its name, its attributes or its sub-agent node."""
    state = AG2Instrumentor()._state
    seen: set[int] = set()
    reused = 0
    gc.freeze()  # the collections below then walk only this test's objects (40 full ones took 17-38 s)
    try:
        for index in range(40):
            # a RoomyAgent's freed block is the next one's: the id is given again (pymalloc's pools
            # made that chance, so the last assertion could fail on one AG2 line and not another)
            agent = RoomyAgent(f"agent{index}", llm_config=False, human_input_mode="NEVER",
                               default_auto_reply=f"answer {index}")
            key = id(agent)
            reused += key in seen
            seen.add(key)
            agent.generate_reply(messages=[{"role": "user", "content": "question"}])
            assert key in state.agents
            del agent
            gc.collect()
            assert key not in state.agents  # gone with its agent, before the id can be given again
    finally:
        gc.unfreeze()
    names = [span.attributes[semconv.GEN_AI_AGENT_NAME] for span in instrumented.spans
             if span.name.startswith("invoke_agent")]
    assert names == [f"agent{index}" for index in range(40)]
    assert reused, "no id was given twice: the case this test is about did not happen"
