"""Secrets never reach telemetry: spans, span events, statuses, resources, logs, DB rows.

A fresh marker secret is planted through every path an API key or token can take in an
AG2 application (``llm_config`` of a custom model client and of the real OpenAI client
against the loopback server, environment variables, Authorization headers, exception
messages, tool arguments and message content with content capture on); then every
attribute of every span, every log record at DEBUG, and every row of every table of the
DAG database written through ``DagSpanExporter`` is searched for it.

Two marker shapes: ``sk-MARKER...`` (recognised by its shape) and a shapeless
``MARKER...`` that can only be caught because we learned it is a secret (config key name,
environment variable name, header name).
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel
from cmbagent_otel import _spans, redaction
from cmbagent_otel.testing import FakeOpenAIServer, ScriptedModelClient

from .conftest import group_chat, needs_custom_client


def new_markers() -> tuple[str, str]:
    """(shaped, shapeless) marker secrets, unique per test."""
    return f"sk-MARKER{secrets.token_hex(12)}", f"MARKER{secrets.token_hex(12)}"


class Sink:
    """Where telemetry can end up: in-memory spans, a DAG SQLite DB, the provider's resource."""

    def __init__(self, tmp_path: Path) -> None:
        self.memory = InMemorySpanExporter()
        self.db = tmp_path / "dag.db"
        self.dag = DagSpanExporter(f"sqlite:///{self.db}")
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        self.provider.add_span_processor(SimpleSpanProcessor(self.dag))

    def texts(self) -> Iterator[tuple[str, str]]:
        """(where, text) for everything telemetry recorded."""
        for span in self.memory.get_finished_spans():
            yield f"span {span.name} name", span.name
            yield f"span {span.name} status", str(span.status.description)
            for key, value in (span.attributes or {}).items():
                yield f"span {span.name} attribute {key}", f"{key}={value!r}"
            for event in span.events:
                yield f"span {span.name} event {event.name}", event.name
                for key, value in (event.attributes or {}).items():
                    yield f"span {span.name} event {event.name} {key}", f"{key}={value!r}"
            for key, value in span.resource.attributes.items():
                yield f"span resource {key}", f"{key}={value!r}"
        for key, value in self.provider.resource.attributes.items():
            yield f"provider resource {key}", f"{key}={value!r}"
        if self.db.exists():
            conn = sqlite3.connect(self.db)
            try:
                tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                for table in tables:
                    for row in conn.execute(f'SELECT * FROM "{table}"'):
                        yield f"db {table}", repr(row)
            finally:
                conn.close()


@pytest.fixture
def sink(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Sink]:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    s = Sink(tmp_path)
    yield s
    cmbagent_otel.uninstrument()
    _spans.set_tracer_provider(None)
    s.provider.shutdown()


def instrument(sink: Sink) -> None:
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=True, instrument_cmbagent=False)


def assert_clean(sink: Sink, caplog: pytest.LogCaptureFixture, *markers: str, expect_spans: bool = True) -> None:
    sink.provider.force_flush()
    spans = sink.memory.get_finished_spans()
    if expect_spans:
        assert spans, "the scenario produced no spans"
        assert sink.db.exists() and sink.dag.stats()["exported"] > 0
    leaks = [where for where, text in sink.texts() if any(m in text for m in markers)]
    for record in caplog.records:
        text = record.getMessage() + (caplog.handler.format(record) if record.exc_info else "")
        if any(m in text for m in markers) and record.name.split(".")[0] in ("cmbagent_otel", "opentelemetry"):
            leaks.append(f"log {record.name}: {record.getMessage()[:80]}")
    assert not leaks, f"secret leaked into: {leaks}"


# AG2 0.14 strips api_key (and headers) from OpenAIWrapper._config_list; the instrumentor
# learns them from each agent's llm_config. "app-registers" also checks the explicit API.
KEYS_FROM_LLM_CONFIG = pytest.mark.parametrize("registered", [
    pytest.param(False, id="instrumentor-registers"),
    pytest.param(True, id="app-registers"),
])


def register(registered: bool, *agents: Any) -> None:
    """The fix, applied from the application side: learn the keys in each agent's llm_config."""
    if registered:
        for agent in agents:
            redaction.register_secrets_in(agent.llm_config)


def echo_agent(name: str, reply: str, config: dict[str, Any]) -> ConversableAgent:
    agent = ConversableAgent(name, llm_config={"config_list": [config], "cache_seed": None},
                             human_input_mode="NEVER")
    agent.register_model_client(ScriptedModelClient, script=[reply])
    return agent


# --- llm_config ------------------------------------------------------------------------------------

@needs_custom_client
@KEYS_FROM_LLM_CONFIG
def test_api_key_in_custom_client_config(sink: Sink, caplog: pytest.LogCaptureFixture, registered: bool) -> None:
    shaped, shapeless = new_markers()
    config = {"model": "scripted", "model_client_cls": "ScriptedModelClient", "api_key": shapeless,
              "azure_ad_token": shaped}
    instrument(sink)
    # the model echoes its own key, the user pastes both keys: content capture is on
    assistant = echo_agent("assistant", f"my key is {shapeless}", config)
    user = echo_agent("user", "thanks", config)
    register(registered, assistant, user)
    user.initiate_chat(assistant, message=f"keys: {shapeless} and {shaped}", max_turns=1, silent=True)
    assert_clean(sink, caplog, shaped, shapeless)


@KEYS_FROM_LLM_CONFIG
def test_api_key_to_loopback_openai_server(sink: Sink, caplog: pytest.LogCaptureFixture, registered: bool) -> None:
    shaped, shapeless = new_markers()
    with FakeOpenAIServer(script=[f"echo {shapeless}", f"echo {shaped}"]) as server:
        config = {"model": "gpt-4o-mini", "api_key": shapeless, "base_url": server.base_url,
                  "default_headers": {"Authorization": f"Bearer {shaped}"}}
        instrument(sink)
        assistant = ConversableAgent("assistant", llm_config={"config_list": [config], "cache_seed": None},
                                     human_input_mode="NEVER")
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", default_auto_reply=shaped)
        register(registered, assistant)
        user.initiate_chat(assistant, message=f"the key {shapeless}", max_turns=2, silent=True)
        # the real openai client sent the key: it is in the request the server saw
        assert any(shapeless in str(r["headers"]) or shaped in str(r["headers"]) for r in server.requests)
    assert_clean(sink, caplog, shaped, shapeless)


def test_openai_error_with_key_in_message(sink: Sink, caplog: pytest.LogCaptureFixture) -> None:
    shaped, shapeless = new_markers()
    with FakeOpenAIServer(status=401) as server:
        config = {"model": "gpt-4o-mini", "api_key": shapeless, "base_url": server.base_url, "max_retries": 0}
        instrument(sink)
        assistant = ConversableAgent("assistant", llm_config={"config_list": [config], "cache_seed": None},
                                     human_input_mode="NEVER")
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
        with pytest.raises(Exception):  # noqa: B017 - whatever the openai client raises for 401
            user.initiate_chat(assistant, message=f"use {shaped}", max_turns=1, silent=True)
    assert_clean(sink, caplog, shaped, shapeless)


# --- environment variables ------------------------------------------------------------------------

@needs_custom_client
def test_env_var_secrets(sink: Sink, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
                         tmp_path: Path) -> None:
    shaped, shapeless = new_markers()
    token = f"TOKEN{secrets.token_hex(12)}"
    monkeypatch.setenv("OPENAI_API_KEY", shaped)
    monkeypatch.setenv("SOME_TOKEN", token)
    monkeypatch.setenv("MY_SERVICE_PASSWORD", shapeless)
    instrument(sink)  # instrument() re-reads secret-looking environment variables
    script = [
        {"tool_calls": [{"id": "call_env_1", "name": "peak_position",
                         "arguments": {"multipole": 2, "note": f"{token} {shapeless} {shaped}"}}]},
        f"```python\nprint('{token}')\n```",
    ]

    def tool(multipole: int, note: str = "") -> str:
        return f"peak {multipole} {note}"

    group_chat(tmp_path / "chat", message=f"env: {token} {shapeless} {shaped}", engineer_script=script, tool=tool)
    assert_clean(sink, caplog, shaped, shapeless, token)


# --- headers ---------------------------------------------------------------------------------------

@needs_custom_client
@KEYS_FROM_LLM_CONFIG
def test_authorization_header_in_content(sink: Sink, caplog: pytest.LogCaptureFixture, registered: bool) -> None:
    shaped, shapeless = new_markers()
    bearer = secrets.token_urlsafe(24)
    config = {"model": "scripted", "model_client_cls": "ScriptedModelClient",
              "default_headers": {"Authorization": f"Bearer {bearer}", "X-Api-Key": shapeless}}
    instrument(sink)
    assistant = echo_agent("assistant", f"curl -H 'Authorization: Bearer {bearer}' -H 'X-Api-Key: {shapeless}'",
                           config)
    user = echo_agent("user", "ok", config)
    register(registered, assistant, user)
    message = {"content": f"call it, key {shaped}",
               "headers": {"Authorization": f"Bearer {bearer}", "x-api-key": shapeless}}
    user.initiate_chat(assistant, message=message, max_turns=1, silent=True)
    assert_clean(sink, caplog, bearer, shapeless, shaped)


# --- exceptions ------------------------------------------------------------------------------------

class KeyRejected(Exception):
    pass


@needs_custom_client
@KEYS_FROM_LLM_CONFIG
def test_exception_messages_with_key(sink: Sink, caplog: pytest.LogCaptureFixture, registered: bool) -> None:
    shaped, shapeless = new_markers()

    class ScriptedModelClient2(ScriptedModelClient):
        def create(self, params: dict[str, Any]) -> Any:
            raise KeyRejected(f"invalid api key {shapeless} (also tried {shaped})", {"api_key": shapeless})

    config = {"model": "scripted", "model_client_cls": "ScriptedModelClient2", "api_key": shapeless}
    instrument(sink)
    assistant = ConversableAgent("assistant", llm_config={"config_list": [config], "cache_seed": None},
                                 human_input_mode="NEVER")
    assistant.register_model_client(ScriptedModelClient2)
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    register(registered, assistant)
    with pytest.raises(KeyRejected) as info:
        user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)
    assert shapeless in str(info.value)  # the application still sees its own exception unchanged
    failed = [s for s in sink.memory.get_finished_spans() if s.events]
    assert failed and failed[0].events[0].name == "exception"
    assert_clean(sink, caplog, shaped, shapeless)


@needs_custom_client
@pytest.mark.parametrize("fails", [False, True])
def test_tool_arguments_and_errors_with_key(sink: Sink, caplog: pytest.LogCaptureFixture, tmp_path: Path,
                                            fails: bool) -> None:
    shaped, _ = new_markers()
    script = [{"tool_calls": [{"id": "call_key_1", "name": "peak_position",
                               "arguments": {"multipole": 1, "api_key": shaped, "note": f"key={shaped}"}}]}]

    def tool(multipole: int, api_key: str = "", note: str = "") -> str:
        if fails:
            raise KeyRejected(f"rejected {api_key}")
        return f"accepted {api_key}"

    instrument(sink)
    group_chat(tmp_path / "chat", engineer_script=script, tool=tool, order=["engineer", "executor", "researcher"])
    assert_clean(sink, caplog, shaped)


# --- provider built from the environment -----------------------------------------------------------

def test_owned_provider_resource_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    shaped, shapeless = new_markers()
    monkeypatch.setenv("OPENAI_API_KEY", shaped)
    monkeypatch.setenv("ANTHROPIC_API_KEY", shapeless)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "secret-test")
    caplog.set_level(logging.DEBUG)
    memory = InMemorySpanExporter()
    provider = cmbagent_otel.instrument(exporters="none", span_exporters=[memory], set_global=False,
                                        capture_content=True, instrument_cmbagent=False)
    try:
        assert isinstance(provider, TracerProvider)
        with FakeOpenAIServer(script=[f"the key is {shapeless}"]) as server:
            config = {"model": "gpt-4o-mini", "api_key": shaped, "base_url": server.base_url}
            assistant = ConversableAgent("assistant", llm_config={"config_list": [config], "cache_seed": None},
                                         human_input_mode="NEVER")
            user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
            user.initiate_chat(assistant, message=f"{shaped} / {shapeless}", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
    texts = [f"{k}={v!r}" for k, v in provider.resource.attributes.items()]
    for span in memory.get_finished_spans():
        texts += [f"{k}={v!r}" for k, v in (span.attributes or {}).items()] + [str(span.status.description)]
    assert memory.get_finished_spans()
    assert not [t for t in texts if shaped in t or shapeless in t]
    ours = [r for r in caplog.records if r.name.split(".")[0] in ("cmbagent_otel", "opentelemetry")]
    assert not [r for r in ours if shaped in r.getMessage() or shapeless in r.getMessage()]


def test_memoised_redaction_catches_secrets_registered_after_caching() -> None:
    """Histories are redacted through a memo; a secret learned later must still be caught."""
    _, shapeless = new_markers()
    text = f"use {shapeless} for the archive"
    cache = redaction.RedactionCache(max_len=64, max_chars=10**6)
    message = {"role": "user", "content": text}
    assert cache.redact(text) == text  # not known as a secret yet: memoised as is
    assert shapeless in (redaction.safe_text([message]) or "")
    redaction.register_secret(shapeless)
    assert cache.redact(text) == f"use {redaction.REDACTED} for the archive"
    after = redaction.safe_text([message])
    assert after is not None and shapeless not in after and redaction.REDACTED in after


def test_redaction_memo_is_bounded() -> None:
    cache = redaction.RedactionCache(max_len=100, max_chars=1000)
    for i in range(200):
        assert cache.redact(f"value number {i:03d}") == f"value number {i:03d}"
        assert sum(len(k) + len(v) for k, v in cache.entries().items()) <= 1000
    long_text = "x" * 101
    assert cache.redact(long_text) == long_text and long_text not in cache.entries()
