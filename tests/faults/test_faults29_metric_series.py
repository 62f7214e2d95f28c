"""Twenty-ninth fault campaign: the model-call metrics' series are bounded like the run metrics'.

Session 34 capped the three run-level histograms at :data:`metrics.SERIES_MAX` attribute sets. The
model-call instruments were left uncapped ("they follow the configuration"), but two of their
attributes come from outside the configuration: ``gen_ai.response.model`` is what the server answers
(a router or proxy names a deployment per response, a dated snapshot changes, a hostile server sends
any text), and ``cmbagent.code.language`` is what the model wrote after a code fence. The SDK (1.45, no
cardinality limit) keeps every attribute set for the provider's life: on 0c80923 a server naming a new
model per response made a new series in the duration histogram, the token histogram (two per call) and
the cost counter per call, for ever. Now every instrument records at most ``SERIES_MAX`` attribute sets,
then one overflow series (``otel.metric.overflow=true``); every call is still counted.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from itertools import count
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

import cmbagent_otel
from cmbagent_otel import metrics
from cmbagent_otel.testing import FakeOpenAIServer, ScriptedModelClient, offline_backend

OVERFLOW = "otel.metric.overflow"


@pytest.fixture
def meters() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield provider, reader
    provider.shutdown()


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    return {metric.name: list(metric.data.data_points) for resource in data.resource_metrics
            for scope in resource.scope_metrics for metric in scope.metrics}


def _assert_bounded(points: list[Any], total: int, per_series: int = 1) -> None:
    """At most SERIES_MAX series and the overflow one; ``total`` recordings in all, none lost."""
    assert len(points) <= metrics.SERIES_MAX + 1, len(points)
    counted = sum(getattr(point, "count", None) or point.value for point in points)
    assert counted == total, (counted, total)
    overflow = [point for point in points if point.attributes.get(OVERFLOW) is True]
    assert len(overflow) == 1 and dict(overflow[0].attributes) == {OVERFLOW: True}


class _RenamingClient(ScriptedModelClient):
    """The offline model client, answering as a router does: each response names another model."""

    def create(self, params: dict[str, Any]) -> Any:
        response = super().create(params)
        response.model = f"gpt-4o-{next(_numbers)}"
        return response


_numbers = count()


def _renaming_server(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    n = next(_numbers)
    return 200, {"Content-Type": "application/json"}, json.dumps({
        "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": f"gpt-4o-{n}",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()


def test_a_server_naming_a_new_model_per_response_keeps_the_model_metrics_bounded(
        meters: tuple[MeterProvider, InMemoryMetricReader]) -> None:
    """Real AG2 (``OpenAIWrapper.create``) with the offline model client where the AG2 line takes one, else
    the real ``openai`` client and the loopback server; each answer names another model (``gpt-4o-<n>``)."""
    from autogen import OpenAIWrapper

    calls = metrics.SERIES_MAX + 60
    provider, reader = meters
    cmbagent_otel.instrument(tracer_provider=TracerProvider(), meter_provider=provider, set_global=False,
                             instrument_cmbagent=False, instrument_threading=False)
    try:
        with contextlib.ExitStack() as stack:
            if offline_backend() == "client":
                client = OpenAIWrapper(config_list=[{"model": "gpt-4o", "model_client_cls": "_RenamingClient"}],
                                       cache_seed=None)
                client.register_model_client(_RenamingClient)
            else:
                server = stack.enter_context(FakeOpenAIServer(raw_responder=_renaming_server))
                client = OpenAIWrapper(config_list=[{"model": "gpt-4o", "api_key": "sk-test-series-0000000000",
                                                     "base_url": server.base_url}], cache_seed=None)
            for _ in range(calls):
                client.create(messages=[{"role": "user", "content": "hi"}])
    finally:
        cmbagent_otel.uninstrument()
    found = _points(reader)
    _assert_bounded(found[metrics.GEN_AI_CLIENT_OPERATION_DURATION], calls)
    _assert_bounded(found[metrics.GEN_AI_CLIENT_TOKEN_USAGE], 2 * calls)
    # the cost counter (a sum, not a count): a series per model too, bounded the same way
    assert len(found.get(metrics.LLM_COST, [])) <= metrics.SERIES_MAX + 1
    kept = [p for p in found[metrics.GEN_AI_CLIENT_OPERATION_DURATION] if OVERFLOW not in p.attributes]
    assert {p.attributes["gen_ai.response.model"] for p in kept} >= {"gpt-4o-0", "gpt-4o-1"}  # the first kept whole


def test_code_failures_tagged_with_any_language_keep_their_counter_bounded(
        meters: tuple[MeterProvider, InMemoryMetricReader]) -> None:
    """The failure counter's ``cmbagent.code.language`` is the model's fence word (AG2 refuses an unknown
    one: a failure per block) and its ``error.type`` an exception's class: both from outside."""
    provider, reader = meters
    model = metrics.model_metrics(provider)
    assert model is not None
    failures = metrics.SERIES_MAX + 40
    for n in range(failures):
        model.code_failure(f"lang{n}", "nonzero_exit_code")
    _assert_bounded(_points(reader)[metrics.CODE_EXECUTION_FAILURES], failures)
