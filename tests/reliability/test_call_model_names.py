"""A model named by the call itself never carries a key into span names or metrics.

Found by the fifteenth campaign. The eleventh redacted the model of a config entry
(``gen_ai.request.model``, ``chat <model>``), but a call that names its own model
(``OpenAIWrapper.create(model=...)``: AG2's per-call override, a proxy's routing string such as
``gpt-4o?api_key=…``) took precedence as given: the span name ``chat gpt-4o?api_key=<key>`` went to
every span exporter (the DAG rows redact span names again, the OTLP payload and the console did
not), and the ``gen_ai.request.model`` attribute of the model-call metrics (duration, token usage,
cost) held it whole, with and without a recorded span. The call's model is redacted like the
config's now (``redaction.redact_name``, memoised).
"""

from __future__ import annotations

import secrets

import pytest
from autogen import ConversableAgent
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import cmbagent_otel
from cmbagent_otel import redaction
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

from .conftest import needs_custom_client
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _metric_texts(reader: InMemoryMetricReader) -> list[str]:
    data = reader.get_metrics_data()
    assert data is not None
    return [f"{metric.name} {dict(point.attributes or {})!r}" for rm in data.resource_metrics
            for sm in rm.scope_metrics for metric in sm.metrics for point in metric.data.data_points]


@needs_custom_client
@pytest.mark.parametrize("which", ["registered", "named"])
@pytest.mark.parametrize("recorded", [True, False], ids=["span", "metrics-only"])
def test_a_calls_own_model_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                       which: str, recorded: bool) -> None:
    key = f"QZXW{secrets.token_hex(10)}WXZQ"
    if which == "registered":
        redaction.register_secret(key)
        model = f"gpt-4o@{key}"
    else:
        model = f"gpt-4o?api_key={key}"  # a proxy's routing string: the key under its name
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    try:
        # metrics-only: a sampler that drops every span, so the model call takes the unrecorded path
        tracer_provider = sink.provider if recorded else TracerProvider(sampler=ALWAYS_OFF)
        cmbagent_otel.instrument(tracer_provider=tracer_provider, meter_provider=meters, capture_content=True,
                                 instrument_cmbagent=False)
        assistant = ConversableAgent("assistant", llm_config={"config_list": [
            {"model": "scripted", client_key(): "ScriptedModelClient"}], "cache_seed": None},
            human_input_mode="NEVER")
        assistant.register_model_client(ScriptedModelClient, script=["ok"])
        messages = [{"role": "user", "content": "peaks?"}]
        assistant.client.create(messages=messages, model=model, cache_seed=None)
        metrics = _metric_texts(reader)
    finally:
        cmbagent_otel.uninstrument()
        meters.shutdown()
    assert any("gen_ai.request.model" in text for text in metrics), metrics
    assert not [text for text in metrics if key in text], metrics
    if recorded:
        names = [span.name for span in sink.memory.get_finished_spans()]
        assert any(name.startswith("chat gpt-4o") for name in names), names
        assert_clean(sink, caplog, key)
