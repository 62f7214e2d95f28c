"""What a model server writes in a response's own fields is redacted and bounded.

Found by the twenty-sixth campaign (a hostile OpenAI-compatible server on loopback, real AG2 agents
and the real ``openai`` client). The server knows the API key it was sent, and writes the response's
``id``, ``model``, the choices' ``finish_reason`` and the tool calls' ``id`` as it likes:
``gen_ai.response.id``, ``gen_ai.response.finish_reasons`` and ``gen_ai.tool.call.id`` were recorded
as given (the key echoed there went whole to every span exporter and DAG row, content capture off
too), and ``gen_ai.response.model`` was redacted but not bounded (a 1 MB model name on the span and
on every model-call metric). A metrics-only model call (a sampler dropping the span) put the
response model into the metrics unredacted. Token counts the server reports past int64 made the
metric export fail for every metric of that export (the OTLP encoder refuses them), and negative
ones were recorded as token usage.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from autogen import ConversableAgent
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import cmbagent_otel
from cmbagent_otel import semconv
from cmbagent_otel.testing import FakeOpenAIServer

from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")

MB = "x" * (1 << 20)


def _key() -> str:
    return f"QZ{secrets.token_hex(16)}ZQ"  # no key shape: only its registration (llm_config) makes it a secret


def _completion(message: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": "chatcmpl-abc123", "object": "chat.completion", "created": 0, "model": "gpt-4o",
        "choices": [{"index": 0, "message": message or {"role": "assistant", "content": "TERMINATE"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    payload.update(fields)
    return payload


def _serving(payloads: Callable[[int], dict[str, Any]]) -> Callable[[dict[str, Any], dict[str, str]],
                                                                   tuple[int, dict[str, str], bytes]]:
    count = iter(range(1_000_000))

    def answer(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/json"}, json.dumps(payloads(next(count))).encode()

    return answer


@pytest.fixture
def metrics() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    yield reader


def _run(sink: Sink, reader: InMemoryMetricReader, key: str,  # noqa: F811
         payloads: Callable[[int], dict[str, Any]], capture: bool, tool: bool = False, recorded: bool = True) -> None:
    meters = MeterProvider(metric_readers=[reader])
    provider = sink.provider if recorded else TracerProvider(sampler=ALWAYS_OFF)
    cmbagent_otel.instrument(tracer_provider=provider, meter_provider=meters, metrics=True, capture_content=capture,
                             instrument_cmbagent=False)
    try:
        with FakeOpenAIServer(raw_responder=_serving(payloads)) as server:
            config = {"config_list": [{"model": "gpt-4o", "api_key": key, "base_url": server.base_url}],
                      "cache_seed": None}
            assistant = ConversableAgent("assistant", llm_config=config, human_input_mode="NEVER")
            if not tool:
                assistant.generate_reply(messages=[{"role": "user", "content": "hi"}])
                return
            user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")

            def lookup() -> str:
                return "found"

            assistant.register_for_llm(name="lookup", description="look it up")(lookup)
            user.register_for_execution(name="lookup")(lookup)
            user.initiate_chat(assistant, message="go", max_turns=2, silent=True)
    finally:
        sink.provider.force_flush()
        meters.force_flush()


def _tool_call(call_id: str) -> Callable[[int], dict[str, Any]]:
    def payloads(n: int) -> dict[str, Any]:
        if n:
            return _completion()
        calls = [{"id": call_id, "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]
        return _completion({"role": "assistant", "content": None, "tool_calls": calls},
                           choices=[{"index": 0, "finish_reason": "tool_calls",
                                     "message": {"role": "assistant", "content": None, "tool_calls": calls}}])
    return payloads


def _metric_points(reader: InMemoryMetricReader) -> list[tuple[str, dict[str, Any]]]:
    data = reader.get_metrics_data()
    assert data is not None
    return [(metric.name, dict(point.attributes or {})) for rm in data.resource_metrics
            for sm in rm.scope_metrics for metric in sm.metrics for point in metric.data.data_points]


def _attributes(sink: Sink) -> list[tuple[str, str, Any]]:  # noqa: F811
    return [(span.name, key, value) for span in sink.memory.get_finished_spans()
            for key, value in (span.attributes or {}).items()]


def _assert_bounded(sink: Sink, reader: InMemoryMetricReader) -> None:  # noqa: F811
    for span, key, value in _attributes(sink):
        assert len(repr(value)) < 8192, (span, key, len(repr(value)))
    for name, attributes in _metric_points(reader):
        assert len(repr(attributes)) < 8192, (name, len(repr(attributes)))


@pytest.mark.parametrize("capture", [False, True], ids=["capture-off", "capture-on"])
@pytest.mark.parametrize("field", ["id", "model", "finish_reason", "finish_reason_object"])
def test_response_fields_echoing_the_key_are_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                       metrics: InMemoryMetricReader, capture: bool,
                                                       field: str) -> None:
    key = _key()

    def payloads(n: int) -> dict[str, Any]:
        if field == "id":
            return _completion(id=f"chatcmpl-{key}")
        if field == "model":
            return _completion(model=f"gpt-4o {key}")
        reason: Any = f"stop {key}" if field == "finish_reason" else {"why": key}
        return _completion(choices=[{"index": 0, "finish_reason": reason,
                                     "message": {"role": "assistant", "content": "TERMINATE"}}])

    _run(sink, metrics, key, payloads, capture)
    assert_clean(sink, caplog, key)
    assert not [point for point in _metric_points(metrics) if key in repr(point)]


def test_metrics_only_call_redacts_the_response_model(sink: Sink, metrics: InMemoryMetricReader) -> None:  # noqa: F811
    key = _key()
    _run(sink, metrics, key, lambda n: _completion(model=f"gpt-4o {key}"), capture=False, recorded=False)
    points = _metric_points(metrics)
    assert any(semconv.GEN_AI_RESPONSE_MODEL in attributes for _, attributes in points), points
    assert not [point for point in points if key in repr(point)], points


@pytest.mark.parametrize("field", ["id", "model", "finish_reason", "many_choices"])
def test_huge_response_fields_are_bounded(sink: Sink, metrics: InMemoryMetricReader, field: str) -> None:  # noqa: F811
    def payloads(n: int) -> dict[str, Any]:
        if field == "id":
            return _completion(id=MB)
        if field == "model":
            return _completion(model=MB)
        if field == "finish_reason":
            return _completion(choices=[{"index": 0, "finish_reason": MB,
                                         "message": {"role": "assistant", "content": "TERMINATE"}}])
        return _completion(choices=[{"index": i, "finish_reason": f"stop-{i:0200d}",
                                     "message": {"role": "assistant", "content": "TERMINATE"}} for i in range(5000)])

    _run(sink, metrics, _key(), payloads, capture=False)
    chats = [span for span in sink.memory.get_finished_spans() if span.name.startswith("chat")]
    assert chats and semconv.GEN_AI_RESPONSE_ID in (chats[0].attributes or {})
    _assert_bounded(sink, metrics)


@pytest.mark.parametrize("capture", [False, True], ids=["capture-off", "capture-on"])
def test_tool_call_id_echoing_the_key_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                  metrics: InMemoryMetricReader, capture: bool) -> None:
    key = _key()
    _run(sink, metrics, key, _tool_call(f"call_{key}"), capture, tool=True)
    tools = [span for span in sink.memory.get_finished_spans() if span.name.startswith("execute_tool")]
    assert tools and semconv.GEN_AI_TOOL_CALL_ID in (tools[0].attributes or {})
    assert_clean(sink, caplog, key)


def test_huge_tool_call_id_is_bounded(sink: Sink, metrics: InMemoryMetricReader) -> None:  # noqa: F811
    _run(sink, metrics, _key(), _tool_call("call_" + "A" * 1_000_000), capture=False, tool=True)
    _assert_bounded(sink, metrics)


def test_ordinary_ids_are_kept(sink: Sink, metrics: InMemoryMetricReader) -> None:  # noqa: F811
    _run(sink, metrics, _key(), _tool_call("call_Xy12abCD34efGH56"), capture=False, tool=True)
    attributes = {key: value for _, key, value in _attributes(sink)}
    assert attributes[semconv.GEN_AI_TOOL_CALL_ID] == "call_Xy12abCD34efGH56"
    assert attributes[semconv.GEN_AI_RESPONSE_ID] == "chatcmpl-abc123"
    assert attributes[semconv.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)


@pytest.mark.parametrize("count", [10**30, 2**63, -5], ids=["1e30", "2^63", "negative"])
def test_out_of_range_token_counts_are_dropped(sink: Sink, metrics: InMemoryMetricReader, count: int) -> None:  # noqa: F811
    usage = {"prompt_tokens": count, "completion_tokens": 4, "total_tokens": 7,
             "prompt_tokens_details": {"cached_tokens": count},
             "completion_tokens_details": {"reasoning_tokens": count}}
    _run(sink, metrics, _key(), lambda n: _completion(usage=usage), capture=False)
    data = metrics.get_metrics_data()
    assert data is not None
    encode_metrics(data)  # the OTLP encoder takes every point (one out of int64 failed the whole export)
    for _, key, value in _attributes(sink):
        if key.startswith("gen_ai.usage."):
            assert isinstance(value, int) and 0 <= value < 2**63, (key, value)
    chats = [span for span in sink.memory.get_finished_spans() if span.name.startswith("chat")]
    assert (chats[0].attributes or {}).get(semconv.GEN_AI_USAGE_OUTPUT_TOKENS) == 4


def _unencodable(sink: Sink, reader: InMemoryMetricReader) -> list[str]:  # noqa: F811
    """Texts the OTLP encoder refuses (lone surrogates): the attribute is dropped and a traceback logged
    on every export, or (a span name) the whole batch fails."""
    found = []
    texts = [(span.name, "name", span.name) for span in sink.memory.get_finished_spans()]
    texts += [(span, key, value) for span, key, value in _attributes(sink)]
    texts += [(name, key, value) for name, attributes in _metric_points(reader) for key, value in attributes.items()]
    for where, key, value in texts:
        for text in value if isinstance(value, tuple) else (value,):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    found.append(f"{where} {key}")
    return found


@pytest.mark.parametrize("field", ["id", "model", "finish_reason", "tool_call_id", "tool_name"])
def test_lone_surrogates_in_server_text_stay_encodable(sink: Sink, metrics: InMemoryMetricReader,  # noqa: F811
                                                       field: str) -> None:
    bad = "x\ud800y"  # JSON "\\ud800": a lone surrogate, which the OTLP encoder refuses
    if field in ("tool_call_id", "tool_name"):
        call_id, name = ("call_" + bad, "lookup") if field == "tool_call_id" else ("call_1", "lookup" + bad)

        def payloads(n: int) -> dict[str, Any]:
            if n:
                return _completion()
            calls = [{"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}]
            return _completion(choices=[{"index": 0, "finish_reason": "tool_calls",
                                         "message": {"role": "assistant", "content": None, "tool_calls": calls}}])
        # the openai client then fails to encode the next request (the tool's answer quotes the call id):
        # its own UnicodeEncodeError, with or without instrumentation
        with contextlib.suppress(UnicodeEncodeError):
            _run(sink, metrics, _key(), payloads, capture=False, tool=True)
        assert [span for span in sink.memory.get_finished_spans() if span.name.startswith("execute_tool")]
    else:
        def payloads(n: int) -> dict[str, Any]:
            if field == "id":
                return _completion(id="chatcmpl-" + bad)
            if field == "model":
                return _completion(model="gpt-4o" + bad)
            return _completion(choices=[{"index": 0, "finish_reason": "stop" + bad,
                                         "message": {"role": "assistant", "content": "TERMINATE"}}])
        _run(sink, metrics, _key(), payloads, capture=False)
    assert not _unencodable(sink, metrics)
