"""Secrets in the resource the package builds from the environment.

``OTEL_RESOURCE_ATTRIBUTES`` (and the resource detectors ``OTEL_EXPERIMENTAL_RESOURCE_DETECTORS``
names) take their values from the environment of a deployment, where a collector's credentials
or a database URL are easily pasted (``db.password=...``, ``collector.url=https://u:pw@...``).
The provider built by ``instrument()`` put them on its resource as given, and the resource goes
with every span to each exporter: the OTLP payload and the console exporter's output held them
whole. The resource's attributes are now redacted as span attributes are.
"""

from __future__ import annotations

import io
import secrets

import pytest
from autogen import ConversableAgent
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

import cmbagent_otel
from cmbagent_otel.provider import build_meter_provider, build_tracer_provider
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

from .test_secrets import OtlpGrpcReceiver, new_markers


def test_secrets_in_resource_attributes_never_reach_the_exporters(monkeypatch: pytest.MonkeyPatch) -> None:
    shaped, shapeless = new_markers()
    password = f"PW{secrets.token_hex(8)}"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES",
                       f"deployment.environment=staging,db.password={shapeless},auth.header.value=Bearer%20{shaped},"
                       f"collector.url=https://svc:{password}@collector.example.org/v1")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "resource-test")
    console = io.StringIO()
    receiver = OtlpGrpcReceiver()
    # the provider instrument() builds when the application set none (an earlier test may have set
    # the global one, which instrument() would use instead)
    provider = build_tracer_provider("none", span_exporters=[
        ConsoleSpanExporter(out=console), GrpcExporter(endpoint=f"127.0.0.1:{receiver.port}", insecure=True)])
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False)
    try:
        assistant = ConversableAgent("assistant", llm_config={"config_list": [
            {"model": "scripted", client_key(): "ScriptedModelClient"}], "cache_seed": None},
            human_input_mode="NEVER")
        assistant.register_model_client(ScriptedModelClient, script=["noted"])
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
        user.initiate_chat(assistant, message="hello", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
        provider.shutdown()
        receiver.stop()
    attributes = dict(provider.resource.attributes)
    assert attributes["deployment.environment"] == "staging" and attributes["service.name"] == "resource-test"
    assert "collector.example.org" in str(attributes["collector.url"])
    payload = b"".join(receiver.payloads)
    assert b"staging" in payload and "staging" in console.getvalue()  # the resource reached both
    for marker in (shaped, shapeless, password):
        assert marker not in repr(attributes)
        assert marker not in console.getvalue()
        assert marker.encode() not in payload


def test_the_meter_provider_has_the_redacted_resource_too(monkeypatch: pytest.MonkeyPatch) -> None:
    _, shapeless = new_markers()
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"deployment.environment=staging,collector.api.key={shapeless}")
    reader = InMemoryMetricReader()
    meters = build_meter_provider("none", metric_readers=[reader])
    assert meters is not None
    try:
        meters.get_meter("test").create_counter("runs").add(1)
        data = reader.get_metrics_data()
        assert data is not None
        shown = repr([dict(m.resource.attributes) for m in data.resource_metrics])
    finally:
        meters.shutdown()
    assert "staging" in shown and shapeless not in shown
