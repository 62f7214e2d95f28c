"""asyncio cancellation of instrumented async agent calls: the app's ``CancelledError`` comes out
unchanged (its message too), every span ends with an error status naming it, the OTel context of
the cancelling task is as before, and the loop reports no unretrieved task exception."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from autogen import ConversableAgent
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import cmbagent_otel
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key


@pytest.fixture
def memory() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cmbagent_otel.instrument(tracer_provider=provider, capture_content=True, instrument_cmbagent=False)
    yield exporter
    cmbagent_otel.uninstrument()
    provider.shutdown()


def _run(scenario: Any) -> list[dict[str, Any]]:
    """Run ``scenario`` in a fresh loop; returns what the loop's exception handler was told."""
    reported: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        await scenario()

    asyncio.run(main())
    return reported


def test_a_generate_reply_cancelled_during_the_model_call(memory: InMemorySpanExporter) -> None:
    inside, release = threading.Event(), threading.Event()

    def responder(messages: Any) -> str:
        inside.set()
        release.wait(60)
        return "too late"

    agent = ConversableAgent("assistant", human_input_mode="NEVER", llm_config={
        "config_list": [{"model": "scripted", client_key(): "ScriptedModelClient"}], "cache_seed": None})
    agent.register_model_client(ScriptedModelClient, responder=responder)
    seen: list[BaseException] = []

    async def scenario() -> None:
        before = otel_context.get_current()
        task = asyncio.create_task(agent.a_generate_reply(messages=[{"role": "user", "content": "hi"}]))
        await asyncio.get_running_loop().run_in_executor(None, inside.wait)
        task.cancel("the app stops it")
        try:
            await task
        except asyncio.CancelledError as exc:
            seen.append(exc)
        finally:
            release.set()
        assert otel_context.get_current() is before

    reported = _run(scenario)
    assert [type(e) for e in seen] == [asyncio.CancelledError] and seen[0].args == ("the app stops it",)
    assert not reported
    spans = {s.name: s for s in memory.get_finished_spans()}
    agent_span = spans["invoke_agent assistant"]
    assert agent_span.status.status_code is StatusCode.ERROR
    assert "CancelledError" in (agent_span.status.description or "")
    assert spans["chat scripted"].parent.span_id == agent_span.context.span_id  # ended, under its agent


def test_a_initiate_chat_cancelled_in_an_async_reply(memory: InMemorySpanExporter) -> None:
    seen: list[BaseException] = []

    async def scenario() -> None:
        entered, never = asyncio.Event(), asyncio.Event()

        async def waits(recipient: Any, messages: Any = None, sender: Any = None, config: Any = None) -> Any:
            entered.set()
            await never.wait()
            return True, "never"

        assistant = ConversableAgent("assistant", llm_config=False, human_input_mode="NEVER")
        assistant.register_reply([ConversableAgent, None], waits)
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
        before = otel_context.get_current()
        task = asyncio.create_task(user.a_initiate_chat(assistant, message="hi", max_turns=1, silent=True))
        await entered.wait()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError as exc:
            seen.append(exc)
        assert otel_context.get_current() is before

    reported = _run(scenario)
    assert [type(e) for e in seen] == [asyncio.CancelledError]
    assert not reported
    names = {s.name: s for s in memory.get_finished_spans()}
    for name in ("conversation assistant", "invoke_agent assistant"):
        assert names[name].status.status_code is StatusCode.ERROR, name
        assert names[name].end_time is not None
