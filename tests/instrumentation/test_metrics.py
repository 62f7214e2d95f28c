"""GenAI client metrics and run-level metrics, read back from an in-memory reader and over real OTLP.

The offline planning/control demo (workflow, phases, plan steps, group chats, tool call, failed code
runs) is instrumented with a MeterProvider of our own; what it records must match its spans (the
token counts, the cost, the number of model calls, runs, steps and failed code runs), follow the
GenAI conventions (names, units, attributes, bucket boundaries), and not depend on sampling.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from opentelemetry import metrics as otel_metrics
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import cmbagent_otel
from cmbagent_otel import metrics as m
from cmbagent_otel import semconv
from cmbagent_otel.demo import run_demo
from cmbagent_otel.testing import FakeOpenAIServer, ScriptedModelClient, offline_agent, offline_backend

TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
# opentelemetry-api before 1.30 (1.28 is the oldest supported) takes no bucket advice: an application's own
# MeterProvider then keeps its SDK's default boundaries (the one build_meter_provider() makes sets ours by View)
BUCKET_ADVICE = ("explicit_bucket_boundaries_advisory"
                 in inspect.signature(otel_metrics.Meter.create_histogram).parameters)
OUR_METRICS = {m.GEN_AI_CLIENT_TOKEN_USAGE, m.GEN_AI_CLIENT_OPERATION_DURATION, m.LLM_COST, m.CODE_EXECUTION_FAILURES,
               m.GEN_AI_WORKFLOW_DURATION, m.WORKFLOW_DURATION, m.STEP_DURATION}


class Recorded:
    """Spans and metrics of one instrumented run."""

    def __init__(self, sampler: Any = None) -> None:
        self.spans_memory = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans_memory))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    @property
    def spans(self) -> list[Any]:
        return list(self.spans_memory.get_finished_spans())

    def metrics(self) -> dict[str, Any]:
        """name -> (scope name, Metric) of everything recorded so far."""
        found: dict[str, Any] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found[metric.name] = (scope.scope.name, metric)
        return found

    def points(self, name: str) -> list[Any]:
        found = self.metrics().get(name)
        return list(found[1].data.data_points) if found else []


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    rec = Recorded()
    yield rec
    rec.meter_provider.shutdown()
    rec.tracer_provider.shutdown()


def run_instrumented(rec: Recorded, work_dir: Any, **options: Any) -> None:
    cmbagent_otel.instrument(tracer_provider=rec.tracer_provider, meter_provider=rec.meter_provider,
                             instrument_cmbagent=False, instrument_threading=False, **options)
    try:
        run_demo(str(work_dir))
    finally:
        cmbagent_otel.uninstrument()


def _by_type(points: list[Any]) -> dict[str, Any]:
    return {p.attributes[m.GEN_AI_TOKEN_TYPE]: p for p in points}


def test_genai_client_metrics_match_the_model_calls(recorded, tmp_path):
    run_instrumented(recorded, tmp_path)
    chats = [s for s in recorded.spans if s.attributes[semconv.SPAN_KIND] == semconv.KIND_LLM]
    assert chats
    metrics = recorded.metrics()
    assert set(metrics) >= OUR_METRICS
    scope, usage = metrics[m.GEN_AI_CLIENT_TOKEN_USAGE]
    assert (scope, usage.unit) == (semconv.SCOPE_AG2, "{token}")
    tokens = _by_type(list(usage.data.data_points))
    assert set(tokens) == {"input", "output"}
    assert tokens["input"].sum == sum(s.attributes[semconv.GEN_AI_USAGE_INPUT_TOKENS] for s in chats)
    assert tokens["output"].sum == sum(s.attributes[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] for s in chats)
    assert tokens["input"].count == tokens["output"].count == len(chats)
    if BUCKET_ADVICE:
        assert list(tokens["input"].explicit_bounds) == TOKEN_BUCKETS
    chat = chats[0].attributes
    server = {k: chat[k] for k in (semconv.SERVER_ADDRESS, semconv.SERVER_PORT) if k in chat}
    assert dict(tokens["input"].attributes) == {
        m.GEN_AI_TOKEN_TYPE: "input", semconv.GEN_AI_OPERATION_NAME: "chat",
        semconv.GEN_AI_PROVIDER_NAME: chat[semconv.GEN_AI_PROVIDER_NAME],
        semconv.GEN_AI_REQUEST_MODEL: "scripted", semconv.GEN_AI_RESPONSE_MODEL: "scripted", **server}

    scope, duration = metrics[m.GEN_AI_CLIENT_OPERATION_DURATION]
    assert (scope, duration.unit) == (semconv.SCOPE_AG2, "s")
    (point,) = duration.data.data_points
    assert point.count == len(chats) and point.sum > 0
    if BUCKET_ADVICE:
        assert list(point.explicit_bounds) == DURATION_BUCKETS
    assert semconv.ERROR_TYPE not in point.attributes

    (cost,) = recorded.points(m.LLM_COST)
    assert cost.value == pytest.approx(sum(s.attributes[semconv.LLM_COST_USD] for s in chats))
    assert semconv.GEN_AI_OPERATION_NAME not in cost.attributes


def test_run_level_metrics(recorded, tmp_path):
    run_instrumented(recorded, tmp_path)
    spans = {s.name: s for s in recorded.spans}
    metrics = recorded.metrics()
    for name in (m.GEN_AI_WORKFLOW_DURATION, m.WORKFLOW_DURATION, m.STEP_DURATION):
        scope, metric = metrics[name]
        assert (scope, metric.unit) == (semconv.SCOPE_WORKFLOW, "s")
    (run,) = recorded.points(m.GEN_AI_WORKFLOW_DURATION)
    assert dict(run.attributes) == {semconv.GEN_AI_WORKFLOW_NAME: "planning_and_control"} and run.count == 1
    (run,) = recorded.points(m.WORKFLOW_DURATION)
    assert dict(run.attributes) == {semconv.WORKFLOW_NAME: "planning_and_control",
                                    semconv.WORKFLOW_MODE: "planning-control"}
    workflow = spans["workflow planning_and_control"]
    assert run.sum == pytest.approx((workflow.end_time - workflow.start_time) / 1e9, rel=0.2)
    steps = recorded.points(m.STEP_DURATION)
    assert sum(p.count for p in steps) == len([s for s in recorded.spans if s.name.startswith("step ")]) == 3
    for point in steps:
        assert point.attributes[semconv.PHASE] == "control"
        assert point.attributes[semconv.WORKFLOW_NAME] == "planning_and_control"
        assert semconv.STEP_AGENT in point.attributes
    failed_codes = [s for s in recorded.spans
                    if s.name.startswith("execute_code") and s.attributes[semconv.CODE_EXIT_CODE] != 0]
    (failures,) = recorded.points(m.CODE_EXECUTION_FAILURES)
    assert failures.value == len(failed_codes) == 2
    assert dict(failures.attributes) == {semconv.CODE_LANGUAGE: "python", semconv.ERROR_TYPE: "nonzero_exit_code"}


def test_metrics_do_not_depend_on_sampling(tmp_path):
    sampled, unsampled = Recorded(), Recorded(sampler=ALWAYS_OFF)
    try:
        run_instrumented(sampled, tmp_path / "sampled")
        run_instrumented(unsampled, tmp_path / "unsampled")
        assert sampled.spans and not unsampled.spans
        for name in OUR_METRICS:
            a, b = sampled.points(name), unsampled.points(name)
            assert {frozenset(p.attributes.items()) for p in a} == {frozenset(p.attributes.items()) for p in b}, name
            assert _total(a) == _total(b), name
        assert _by_type(sampled.points(m.GEN_AI_CLIENT_TOKEN_USAGE))["input"].sum == \
            _by_type(unsampled.points(m.GEN_AI_CLIENT_TOKEN_USAGE))["input"].sum
    finally:
        for rec in (sampled, unsampled):
            rec.meter_provider.shutdown()


def _total(points: list[Any]) -> Any:
    """How many recordings (histograms) or how much (counters) ``points`` hold."""
    return sum(p.count if hasattr(p, "count") else p.value for p in points)


class ProviderDown(RuntimeError):
    pass


def test_a_failed_model_call_has_its_duration_with_error_type_and_no_tokens(recorded):
    from autogen import ConversableAgent

    server = None
    if offline_backend() == "client":
        class FailingClient(ScriptedModelClient):
            def create(self, params: dict[str, Any]) -> Any:
                raise ProviderDown("503")

        config = {"config_list": [{"model": "scripted", "model_client_cls": "FailingClient"}], "cache_seed": None}
        agent = ConversableAgent("analyst", llm_config=config, human_input_mode="NEVER")
        agent.register_model_client(FailingClient)
        expected: Any = ProviderDown
    else:  # a provider refusing the request (400: the OpenAI client does not retry it)
        server = FakeOpenAIServer(status=400).start()
        config = {"config_list": [{"model": "scripted", "api_key": "sk-test-failing-000000",
                                   "base_url": server.base_url}], "cache_seed": None}
        agent = ConversableAgent("analyst", llm_config=config, human_input_mode="NEVER")
        expected = Exception
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    cmbagent_otel.instrument(tracer_provider=recorded.tracer_provider, meter_provider=recorded.meter_provider,
                             instrument_cmbagent=False, instrument_threading=False)
    try:
        with pytest.raises(expected) as raised:
            user.initiate_chat(agent, message="go", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
        if server is not None:
            server.stop()
    (point,) = recorded.points(m.GEN_AI_CLIENT_OPERATION_DURATION)
    assert point.attributes[semconv.ERROR_TYPE] == type(raised.value).__qualname__ and point.count == 1
    assert recorded.points(m.GEN_AI_CLIENT_TOKEN_USAGE) == []
    assert recorded.points(m.LLM_COST) == []


@pytest.mark.parametrize("switch", ["argument", "environment"])
def test_metrics_off_switch(recorded, tmp_path, monkeypatch, switch):
    if switch == "environment":
        monkeypatch.setenv("CMBAGENT_OTEL_METRICS", "false")
        run_instrumented(recorded, tmp_path)
    else:
        run_instrumented(recorded, tmp_path, metrics=False)
    assert recorded.spans  # tracing itself is untouched
    assert recorded.metrics() == {}


def test_no_meter_provider_of_our_own_by_default(capture, monkeypatch):
    """OTEL_METRICS_EXPORTER unset: instrument() builds no MeterProvider (metrics go to the global one)."""
    from opentelemetry import metrics as otel_metrics

    from cmbagent_otel.provider import build_meter_provider

    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    assert build_meter_provider() is None
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    assert build_meter_provider() is None
    before = otel_metrics.get_meter_provider()
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        agent = offline_agent("solo", ["hi"])
        offline_agent("user", ["x"]).initiate_chat(agent, message="go", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
    assert otel_metrics.get_meter_provider() is before


# --- over OTLP ---------------------------------------------------------------------------------------------
class MetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """A loopback OTLP/gRPC metrics receiver keeping every request."""

    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, MetricsReceiver]]:
    receiver = MetricsReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", receiver
    finally:
        server.stop(None)


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, MetricsReceiver]]:
    receiver = MetricsReceiver()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            request = metrics_service_pb2.ExportMetricsServiceRequest()
            request.ParseFromString(body)
            receiver.Export(request, None)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/metrics", receiver
    finally:
        server.shutdown()
        server.server_close()


def _received(receiver: MetricsReceiver) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for request in receiver.requests:
        for resource in request.resource_metrics:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}.get("service.name")
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found[metric.name] = (service, scope.scope.name, metric)
    return found


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_metrics_over_otlp_from_the_environment(capture, tmp_path, monkeypatch, request, protocol):
    endpoint, receiver = request.getfixturevalue("grpc_receiver" if protocol == "grpc" else "http_receiver")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # only the flush at uninstrument() exports
    monkeypatch.setenv("OTEL_SERVICE_NAME", "metrics-test")
    # set_global=False: the built MeterProvider is ours alone, shut down (flushed) by uninstrument()
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False, instrument_threading=False,
                             set_global=False)
    try:
        run_demo(str(tmp_path))
    finally:
        cmbagent_otel.uninstrument()
    received = _received(receiver)
    assert set(received) >= OUR_METRICS
    service, scope, usage = received[m.GEN_AI_CLIENT_TOKEN_USAGE]
    assert (service, scope, usage.unit) == ("metrics-test", semconv.SCOPE_AG2, "{token}")
    points = usage.histogram.data_points
    by_type = {next(a.value.string_value for a in p.attributes if a.key == m.GEN_AI_TOKEN_TYPE): p for p in points}
    chats = [s for s in capture.spans if s.attributes[semconv.SPAN_KIND] == semconv.KIND_LLM]
    assert by_type["input"].sum == sum(s.attributes[semconv.GEN_AI_USAGE_INPUT_TOKENS] for s in chats)
    assert list(by_type["output"].explicit_bounds) == TOKEN_BUCKETS
    _, scope, steps = received[m.STEP_DURATION]
    assert scope == semconv.SCOPE_WORKFLOW and sum(p.count for p in steps.histogram.data_points) == 3
    _, _, failures = received[m.CODE_EXECUTION_FAILURES]
    assert sum(p.as_int for p in failures.sum.data_points) == 2
