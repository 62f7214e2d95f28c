"""AG2's own cache (audit 22): an answer ``OpenAIWrapper.create`` takes from it is no model call.

A real ``ConversableAgent`` over the OpenAI client against the loopback server, asked the same thing twice with
AG2's cache on (``initiate_chat(cache=)``, or a ``with Cache.disk() as cache:`` block around the chats, which AG2's
agents use when given none): the second answer is the cache's, no request sent. AG2 hands it back with its first
call's ``usage`` and ``cost``, and counts it in its ``total_usage_summary`` only, not in ``actual_usage_summary``.
"""

from __future__ import annotations

import contextvars
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent
from autogen.cache import Cache
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import cmbagent_otel
from cmbagent_otel import metrics as m
from cmbagent_otel import semconv as sc
from cmbagent_otel.testing import FakeOpenAIServer
from tests.conftest import SpanCapture
from tests.dag.test_mapping import _rows

KEY = "sk-test-cache-0000000000000000"


def _cmbagent_autogen() -> bool:
    try:
        distribution("cmbagent_autogen")
    except PackageNotFoundError:
        return False
    return True


# cmbagent's fork of AG2 turns the cache off: every call reaches the model (its answers are not the cache's)
pytestmark = pytest.mark.skipif(_cmbagent_autogen(), reason="cmbagent_autogen turns AG2's cache off")


def _agents(server: FakeOpenAIServer) -> tuple[ConversableAgent, ConversableAgent]:
    config = {"config_list": [{"model": "gpt-4o-mini", "api_key": KEY, "base_url": server.base_url}]}
    return (ConversableAgent("user", llm_config=False, human_input_mode="NEVER"),
            ConversableAgent("analyst", llm_config=config, human_input_mode="NEVER"))


def _ask_twice(server: FakeOpenAIServer, how: str, tmp_path: Path) -> list[Any]:
    """Two chats asking the analyst the same, AG2's cache on (``how``); the chats' results."""
    user, analyst = _agents(server)
    # (without the diskcache package Cache.disk() is AG2's in-memory cache: it says so in a warning)
    cache = Cache.disk(cache_path_root=str(tmp_path / "cache"))
    if how == "argument":
        return [user.initiate_chat(analyst, message="go", max_turns=1, silent=True, cache=cache) for _ in range(2)]

    def in_block() -> list[Any]:
        with cache:
            return [user.initiate_chat(analyst, message="go", max_turns=1, silent=True) for _ in range(2)]

    # in a context of its own: AG2's Cache, entered again by each create() inside the block, is left the current
    # cache after it (its __exit__ restores what its inner entry found), which later tests' agents would use
    return contextvars.copy_context().run(in_block)


def _points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    return [p for r in (data.resource_metrics if data is not None else ()) for s in r.scope_metrics
            for metric in s.metrics if metric.name == name for p in metric.data.data_points]


@pytest.mark.parametrize("how", ["argument", "context"])
def test_an_answer_of_ag2s_cache_is_a_cache_hit_without_tokens_or_cost(tmp_path: Path, how: str) -> None:
    """Audit 21's Left. The cache's answer's span carried its first call's tokens and cost: the run's cost rows,
    dollars and token metrics counted a call never made. Its span now says ``cmbagent.llm.cache_hit`` and has no
    usage and no cost (its answer stays: the output message, the finish reason); the DAG's cost row counts the one
    call made, the GenAI metrics record two calls' durations and one call's tokens and cost, and the second
    conversation's cost is what AG2 says was paid (``usage_excluding_cached_inference``), not its total."""
    capture = SpanCapture()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    cmbagent_otel.instrument(tracer_provider=capture.provider, meter_provider=provider, instrument_cmbagent=False,
                             instrument_threading=False, capture_content=True)
    try:
        with FakeOpenAIServer(script=["An idea."] * 2) as server:
            with cmbagent_otel.workflow("cached chats"):
                results = _ask_twice(server, how, tmp_path)
            sent = len(server.requests)
    finally:
        cmbagent_otel.uninstrument()
    assert [r.summary for r in results] == ["An idea."] * 2 and sent == 1  # what the case is about: one call made
    asked, cached = capture.named("chat ")
    paid = asked.attributes[sc.LLM_COST_USD]
    assert paid > 0 and asked.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] > 0 and sc.LLM_CACHE_HIT not in asked.attributes
    assert cached.attributes[sc.LLM_CACHE_HIT] is True
    assert not {sc.GEN_AI_USAGE_INPUT_TOKENS, sc.GEN_AI_USAGE_OUTPUT_TOKENS, sc.LLM_COST_USD} & set(cached.attributes)
    assert cached.attributes[sc.GEN_AI_RESPONSE_MODEL] and sc.GEN_AI_OUTPUT_MESSAGES in cached.attributes
    first, second = capture.named("conversation")
    assert first.attributes[sc.LLM_COST_USD] == second.attributes[sc.LLM_COST_USD] == pytest.approx(paid)

    url = f"sqlite:///{tmp_path / 'dag.db'}"
    capture.write_dag(url)
    rows = _rows(url, "cost_records")
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (asked.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS], asked.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS])]
    assert float(rows[0]["cost_usd"]) == pytest.approx(paid, abs=1e-6)

    (duration,) = _points(reader, m.GEN_AI_CLIENT_OPERATION_DURATION)
    assert duration.count == 2
    assert sum(p.count for p in _points(reader, m.GEN_AI_CLIENT_TOKEN_USAGE)) == 2  # one call's input and output
    assert sum(p.value for p in _points(reader, m.LLM_COST)) == pytest.approx(paid)
    provider.shutdown()


def test_an_unrecorded_cache_answer_records_no_tokens_or_cost_in_the_metrics(tmp_path: Path) -> None:
    """The same with the model calls not sampled (the metrics only: the wrapper's fast path)."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    cmbagent_otel.instrument(tracer_provider=TracerProvider(sampler=ALWAYS_OFF), meter_provider=meters,
                             instrument_cmbagent=False, instrument_threading=False)
    try:
        with FakeOpenAIServer(script=["An idea."] * 2) as server:
            results = _ask_twice(server, "argument", tmp_path)
            sent = len(server.requests)
    finally:
        cmbagent_otel.uninstrument()
    assert sent == 1
    paid = results[1].cost["usage_excluding_cached_inference"]["total_cost"]
    assert 0 < paid < results[1].cost["usage_including_cached_inference"]["total_cost"]
    (duration,) = _points(reader, m.GEN_AI_CLIENT_OPERATION_DURATION)
    assert duration.count == 2
    assert sum(p.count for p in _points(reader, m.GEN_AI_CLIENT_TOKEN_USAGE)) == 2
    assert sum(p.value for p in _points(reader, m.LLM_COST)) == pytest.approx(paid)
    meters.shutdown()


def test_a_model_call_after_a_cache_answer_keeps_its_usage(tmp_path: Path) -> None:
    """The mark is the answer's only: a later call the cache cannot answer (another question) has its tokens and
    cost, and so has an uncached agent's call in the same thread."""
    capture = SpanCapture()
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        with FakeOpenAIServer(script=["An idea."] * 3) as server:
            user, analyst = _agents(server)
            _ask_twice(server, "argument", tmp_path)
            user.initiate_chat(analyst, message="another", max_turns=1, silent=True)
            sent = len(server.requests)
    finally:
        cmbagent_otel.uninstrument()
    assert sent == 2
    chats = capture.named("chat ")
    assert [sc.LLM_CACHE_HIT in s.attributes for s in chats] == [False, True, False]
    assert chats[2].attributes[sc.LLM_COST_USD] > 0 and chats[2].attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] > 0
