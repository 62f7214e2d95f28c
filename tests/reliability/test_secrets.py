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

import autogen
import pytest
from autogen import ConversableAgent
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel
from cmbagent_otel import redaction, semconv
from cmbagent_otel.testing import FakeOpenAIServer, ScriptedModelClient
from tests.conftest import client_key

from .conftest import group_chat, needs_custom_client

# what a test here learns is forgotten after it: the tests run after this file (and its own later tests) must
# not depend on the words it taught (a learned word is redacted everywhere, inside longer words too)
pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _llm_config_accepts(**fields: Any) -> bool:
    """Whether this AG2's config schema takes ``fields`` in an OpenAI config entry (ag2 0.9.0's rejects
    ``azure_ad_token`` and ``max_retries``; 0.9.10 and later take them)."""
    entry = {"model": "scripted", client_key(): "ScriptedModelClient", "api_key": "sk-probe", **fields}
    try:  # the schema check only: a custom client class is not built before it is registered
        ConversableAgent("probe", llm_config={"config_list": [entry], "cache_seed": None}, human_input_mode="NEVER")
    except Exception:
        return False
    return True


def _needs_config_fields(*names: str, **values: Any) -> pytest.MarkDecorator:
    fields = {name: "probe" if name == "azure_ad_token" else 0 for name in names} | values
    names = tuple(fields)
    return pytest.mark.skipif(not _llm_config_accepts(**fields),
                              reason=f"this AG2 line (autogen {autogen.__version__}) rejects {', '.join(names)} "
                                     "in a config entry: no application there can hold a secret in it")


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
@_needs_config_fields("azure_ad_token")
def test_api_key_in_custom_client_config(sink: Sink, caplog: pytest.LogCaptureFixture, registered: bool) -> None:
    shaped, shapeless = new_markers()
    config = {"model": "scripted", client_key(): "ScriptedModelClient", "api_key": shapeless,
              "azure_ad_token": shaped}
    instrument(sink)
    # the model echoes its own key, the user pastes both keys: content capture is on
    assistant = echo_agent("assistant", f"my key is {shapeless}", config)
    user = echo_agent("user", "thanks", config)
    register(registered, assistant, user)
    user.initiate_chat(assistant, message=f"keys: {shapeless} and {shaped}", max_turns=1, silent=True)
    assert_clean(sink, caplog, shaped, shapeless)


@needs_custom_client
def test_a_key_replaced_inside_the_client_config_list_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture) -> None:
    _, first = new_markers()
    _, rotated = new_markers()
    config = {"model": "scripted", client_key(): "ScriptedModelClient", "api_key": first}
    instrument(sink)
    assistant = ConversableAgent("assistant", llm_config={"config_list": [config], "cache_seed": None},
                                 human_input_mode="NEVER")
    assistant.register_model_client(ScriptedModelClient, script=["first answer", f"the new key is {rotated}"])
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    user.initiate_chat(assistant, message="hello", max_turns=1, silent=True)
    for entry in assistant.client._config_list:  # the key is rotated in place between two model calls
        entry["api_key"] = rotated
    user.initiate_chat(assistant, message="hello again", max_turns=1, silent=True, clear_history=False)
    assert_clean(sink, caplog, rotated)


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
    # the openai client retries no 401: max_retries only says so where the line's schema takes it (not the fork's)
    no_retries = {"max_retries": 0} if _llm_config_accepts(max_retries=0) else {}
    with FakeOpenAIServer(status=401) as server:
        config = {"model": "gpt-4o-mini", "api_key": shapeless, "base_url": server.base_url, **no_retries}
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


@needs_custom_client
@pytest.mark.parametrize("name", ["AZURE_OPENAI_KEY", "DB_PASS", "GITHUB_PAT", "SESSION_COOKIE", "SSH_PRIVATE_KEY",
                                  "PROJECT_CONNECTION_STRING"])
def test_env_var_secrets_under_other_common_names(sink: Sink, caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    """Names that say "key", "pass", "pat" as a word, a cookie, a private key, a connection string."""
    _, shapeless = new_markers()
    monkeypatch.setenv(name, shapeless)
    instrument(sink)
    script = [{"tool_calls": [{"id": "call_env_2", "name": "peak_position",
                               "arguments": {"multipole": 2, "note": shapeless}}]}, "done"]

    def tool(multipole: int, note: str = "") -> str:
        return f"peak {multipole} {note}"

    group_chat(tmp_path / "chat", message=f"env: {shapeless}", engineer_script=script, tool=tool)
    assert_clean(sink, caplog, shapeless)


VISIBLE_ENV_NAMES = ("PYTHONPATH", "MANPATH", "KEYBOARD_LAYOUT", "PASSAGE_COUNT", "MONKEY_MODE",
                     "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "XAUTHORITY", "SSH_AUTH_SOCK")


def test_env_names_that_are_not_secrets_stay_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not secrets: a person's name (git's author) or a path would be redacted wherever it appears."""
    for name in VISIBLE_ENV_NAMES:
        monkeypatch.setenv(name, f"visible-{name}")
    redaction.reload_settings()
    text = " ".join(f"visible-{name}" for name in VISIBLE_ENV_NAMES)
    assert redaction.redact(text) == text


@pytest.mark.parametrize("name", ["HTTP_AUTHORIZATION", "PROXY_AUTHORIZATION", "BASIC_AUTH", "OAUTH_CLIENT_STATE",
                                  "AUTHENTICATION_VALUE", "GIT_AUTHOR_AUTH"])
def test_env_names_saying_auth_stay_secret(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    value = f"hidden-{secrets.token_hex(8)}"
    monkeypatch.setenv(name, value)
    redaction.reload_settings()
    assert value not in redaction.redact(f"the value: {value}")


# --- headers ---------------------------------------------------------------------------------------

@needs_custom_client
@KEYS_FROM_LLM_CONFIG
def test_authorization_header_in_content(sink: Sink, caplog: pytest.LogCaptureFixture, registered: bool) -> None:
    shaped, shapeless = new_markers()
    bearer = secrets.token_urlsafe(24)
    config = {"model": "scripted", client_key(): "ScriptedModelClient",
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

    config = {"model": "scripted", client_key(): "ScriptedModelClient2", "api_key": shapeless}
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


def test_tool_arguments_learned_again_after_the_learned_secrets_moved_on() -> None:
    """The same tool-argument text again is learned again (a text is skipped only when it held nothing):
    its secret, pushed out of the bounded learned set meanwhile, is redacted again."""
    _, shapeless = new_markers()
    arguments = f'{{"path": "/data/run", "password": "{shapeless}"}}'
    clean = '{"path": "/data/run", "multipole": 220}'
    for _ in range(2):
        redaction.learn_secrets_in(clean)
        redaction.learn_secrets_in(arguments)
        assert shapeless not in (redaction.redact(f"opened with {shapeless}") or "")
        for i in range(redaction.MAX_LEARNED + 1):  # push it out of the learned set
            redaction.learn_secret(f"filler-secret-{i:04d}-{shapeless[:4]}")
        assert shapeless in (redaction.redact(f"opened with {shapeless}") or "")
    assert redaction.redact(clean) == clean


# --- a secret-named tool argument through every path ------------------------------------------------

PG_ENV = "CMBAGENT_OTEL_TEST_PG_URL"


class UpstreamRejected(Exception):
    pass


class OtlpGrpcReceiver:
    """A real OTLP/gRPC trace receiver on loopback that keeps every request's raw bytes."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        self.payloads: list[bytes] = []
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(self._export)},  # raw bytes in and out
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _export(self, request: bytes, context: Any) -> bytes:
        self.payloads.append(request)
        return b""  # an empty ExportTraceServiceResponse: full success

    def stop(self) -> None:
        self._server.stop(None)


@pytest.fixture
def pg_url(pg_schema: Any) -> Iterator[str | None]:
    """A fresh schema on the test PostgreSQL (``None`` when it is not configured: the test runs without it)."""
    import os

    if not os.environ.get(PG_ENV):
        yield None
        return
    with pg_schema() as url:
        yield url


def db_texts(url: str) -> Iterator[tuple[str, str]]:
    """(table, repr(row)) for every row of every table of the database at ``url``."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            for table in inspect(conn).get_table_names():
                for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                    yield table, repr(tuple(row))
    finally:
        engine.dispose()


def spill_texts(directory: Path) -> Iterator[tuple[str, str]]:
    import gzip

    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        yield str(path.name), raw.decode("latin-1")


def login_chat(marker: str, nested: str) -> None:
    """A real AG2 chat: the model asks for the ``login`` tool with a password (and a JSON
    string argument nesting a token), the tool raises with both in its message, then the
    model provider fails with an exception quoting them again."""
    import json

    import autogen

    calls = {"n": 0}

    def responder(messages: list[dict[str, Any]]) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            options = json.dumps({"region": "eu", "api_token": nested})
            return {"tool_calls": [{"id": "call_login", "name": "login",
                                    "arguments": {"user": "ana", "password": marker, "options": options}}]}
        raise UpstreamRejected(f"upstream rejected the login of ana with {marker} ({nested})")

    assistant = ConversableAgent(
        "assistant", human_input_mode="NEVER",
        llm_config={"config_list": [{"model": "scripted", client_key(): "ScriptedModelClient"}],
                    "cache_seed": None})
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")

    def login(user: str, password: str, options: str = "") -> str:
        raise PermissionError(f"login refused for {user}: password {password} options {options}")

    autogen.register_function(login, caller=assistant, executor=user, name="login", description="log in")
    assistant.register_model_client(ScriptedModelClient, responder=responder)  # after: tools rebuild the client
    with pytest.raises(UpstreamRejected) as info:
        user.initiate_chat(assistant, message="log in as ana", max_turns=2, silent=True)
    assert marker in str(info.value)  # the application still sees its own exception unchanged
    assert calls["n"] == 2


@needs_custom_client
@pytest.mark.parametrize("capture", [False, True], ids=["capture-off", "capture-on"])
def test_tool_password_never_leaks_on_any_path(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              pg_url: str | None, capture: bool) -> None:
    import io

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from cmbagent_otel.ingest import IngestServer

    caplog.set_level(logging.DEBUG)  # every logger, every level
    marker, nested = f"MARKER{secrets.token_hex(12)}", f"NESTED{secrets.token_hex(12)}"
    console = io.StringIO()
    memory = InMemorySpanExporter()
    receiver = OtlpGrpcReceiver()
    direct_url = f"sqlite:///{tmp_path / 'direct.db'}"
    ingest_url = f"sqlite:///{tmp_path / 'ingest.db'}"
    spill_dir = tmp_path / "spill"
    # the database is down: every batch goes to the spill directory
    spilling = DagSpanExporter("postgresql+psycopg://u:p@127.0.0.1:1/down", timeout=0, spill_dir=spill_dir)
    ingest = IngestServer(ingest_url, host="127.0.0.1", port=0, grpc_port=0).start()
    exporters: list[Any] = [
        memory,
        ConsoleSpanExporter(out=console),
        GrpcExporter(endpoint=f"127.0.0.1:{receiver.port}", insecure=True),
        HttpExporter(endpoint=ingest.endpoint),
        GrpcExporter(endpoint=ingest.grpc_endpoint, insecure=True),
        DagSpanExporter(direct_url),
        spilling,
    ]
    if pg_url is not None:
        exporters.append(DagSpanExporter(pg_url))
    provider = TracerProvider()
    for exporter in exporters:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    cmbagent_otel.instrument(tracer_provider=provider, capture_content=capture, instrument_cmbagent=False)
    try:
        login_chat(marker, nested)
    finally:
        cmbagent_otel.uninstrument()
        provider.shutdown()
        receiver.stop()
        ingest.stop()

    spans = memory.get_finished_spans()
    tools = [s for s in spans if s.name == "execute_tool login"]
    assert len(tools) == 1 and tools[0].status.description  # the tool failed, with its error text
    assert any(e.name == "exception" for s in spans for e in s.events)  # the provider's exception
    assert spilling.stats()["spilled"] == len(spans)
    assert receiver.payloads and ingest.spans_written == 2 * len(spans)

    texts: list[tuple[str, str]] = []
    for span in spans:
        texts += [(f"span {span.name}", span.name), (f"span {span.name} status", str(span.status.description))]
        texts += [(f"span {span.name} attribute {k}", f"{k}={v!r}") for k, v in (span.attributes or {}).items()]
        for event in span.events:
            texts += [(f"span {span.name} event {event.name} {k}", f"{k}={v!r}")
                      for k, v in (event.attributes or {}).items()]
    texts.append(("console exporter", console.getvalue()))
    texts += [("otlp payload", p.decode("latin-1")) for p in receiver.payloads]
    texts.append(("otlp encoding", encode_spans(spans).SerializeToString().decode("latin-1")))
    texts += [(f"direct db {t}", r) for t, r in db_texts(direct_url)]
    texts += [(f"ingest db {t}", r) for t, r in db_texts(ingest_url)]
    if pg_url is not None:
        texts += [(f"postgresql db {t}", r) for t, r in db_texts(pg_url)]
    texts += [(f"spill {name}", text) for name, text in spill_texts(spill_dir)]
    # every log record but AG2's own (the application logs its own events as it sees fit)
    texts += [(f"log {r.name}", r.getMessage() + (caplog.handler.format(r) if r.exc_info else ""))
              for r in caplog.records if r.name.split(".")[0] not in ("ag2", "autogen")]
    assert any(r.name.startswith("cmbagent_otel") for r in caplog.records)
    assert any(where.startswith("direct db execution_events") for where, _ in texts)
    assert any(where.startswith("spill ") for where, _ in texts)
    if capture:  # the arguments are recorded, with the secret values replaced
        arguments = tools[0].attributes[semconv.GEN_AI_TOOL_CALL_ARGUMENTS]
        assert "ana" in arguments and redaction.REDACTED in arguments
    leaks = sorted({where for where, text in texts if marker in text or nested in text})
    assert not leaks, f"secret leaked into: {leaks}"
