"""Shared pieces of the reliability tests: a real AG2 group chat with hooks for hostile parts."""

from __future__ import annotations

import contextlib
import itertools
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel
from cmbagent_otel import redaction
from cmbagent_otel.demo import order_speakers
from cmbagent_otel.testing import ScriptedModelClient, activate, offline_backend, shared_server
from tests.conftest import CUSTOM_CLIENT_KEYS, custom_client_config, custom_client_key

needs_custom_client = pytest.mark.skipif(
    custom_client_key() is None,
    reason=f"this AG2 line takes a custom model client class under none of {', '.join(CUSTOM_CLIENT_KEYS)}",
)

ENGINEER_SCRIPT: list[Any] = [
    {"tool_calls": [{"id": "call_rel_1", "name": "peak_position", "arguments": {"multipole": 2}}]},
    "```python\nprint('peaks at 220, 540')\n```",
]
ORDER = ["engineer", "executor", "engineer", "executor", "researcher"]
_loopback_keys = itertools.count(1)


def peak_position(multipole: int) -> str:
    """Position of an acoustic peak (toy model)."""
    return f"peak near l={220 * multipole}"


def scripted_agent(name: str, script: Sequence[Any], *, cls: Any = None, client: Any = ScriptedModelClient,
                   **kwargs: Any) -> Any:
    from autogen import ConversableAgent

    kwargs.setdefault("human_input_mode", "NEVER")
    if on_loopback(client):
        key = f"offline-{name}-{next(_loopback_keys)}"  # the loopback server answers each key from its script
        config = {"model": "scripted", "api_key": key, "base_url": shared_server().base_url}
        agent = (cls or ConversableAgent)(name, llm_config={"config_list": [config], "cache_seed": None}, **kwargs)
        agent._offline_api_key = key
        activate(agent, script)
        return agent
    # AG2 matches the registered class by name against the config's custom client key
    agent = (cls or ConversableAgent)(name, llm_config=custom_client_config(client.__name__), **kwargs)
    agent.register_model_client(client, script=list(script))
    return agent


def on_loopback(client: Any) -> bool:
    """Whether an agent scripted with ``client`` talks to the loopback OpenAI-compatible server: the plain
    :class:`ScriptedModelClient` on a line whose offline backend is the server (cmbagent_autogen), so the
    real ``openai`` client runs there. A client of the test's own (hostile, failing) stays a custom client."""
    return client is ScriptedModelClient and offline_backend() == "server"


def rescript(agent: Any, client: Any, script: Sequence[Any]) -> None:
    """(Re)attach ``script`` to an agent built by :func:`scripted_agent` (registering a tool rebuilds its
    model client)."""
    if on_loopback(client):
        activate(agent, script)
    else:
        agent.register_model_client(client, script=list(script))


def group_chat(
    work_dir: Path,
    *,
    agent_cls: Any = None,
    client: Any = ScriptedModelClient,
    message: Any = "Carry out the current step.",
    engineer_script: Sequence[Any] = tuple(ENGINEER_SCRIPT),
    tool: Callable[..., Any] = peak_position,
    speaker: Callable[[Any, Any], Any] | None = None,
    executor: Any = None,
    order: Sequence[str] = tuple(ORDER),
    before_run: Callable[[list[Any]], None] | None = None,
) -> Any:
    """A 4-agent group chat (control, engineer, executor, researcher) with a tool and code.

    Every part can be replaced by a hostile one; ``before_run(agents)`` is called once the
    chat is built (e.g. to arm a hostile property). Returns AG2's ``ChatResult``.
    """
    import autogen
    from autogen import ConversableAgent, GroupChat, GroupChatManager
    from autogen.coding import LocalCommandLineCodeExecutor

    work_dir.mkdir(parents=True, exist_ok=True)
    engineer = scripted_agent("engineer", engineer_script, cls=agent_cls, client=client)
    researcher = scripted_agent("researcher", ["Step done. TERMINATE"], cls=agent_cls, client=client)
    control = scripted_agent("control", ["Proceed."], cls=agent_cls, client=client)
    runner = ConversableAgent(
        "executor", llm_config=False, human_input_mode="NEVER",
        code_execution_config={"executor": executor or LocalCommandLineCodeExecutor(work_dir=work_dir, timeout=60)},
    )
    autogen.register_function(tool, caller=engineer, executor=runner, name="peak_position",
                              description="acoustic peak")
    rescript(engineer, client, engineer_script)
    chat = GroupChat([control, engineer, runner, researcher], messages=[], max_round=len(order) + 1,
                     speaker_selection_method=speaker or order_speakers(order))
    manager = GroupChatManager(chat, llm_config=False, silent=True,
                               is_termination_msg=lambda m: "TERMINATE" in str(m.get("content")))
    if before_run is not None:
        before_run([control, engineer, runner, researcher])
    return control.initiate_chat(manager, message=message, max_turns=1, silent=True)


def outcome(run: Callable[[], Any]) -> tuple[Any, ...]:
    """What the application observed: the result's contents, or the exception's type and args."""
    try:
        result = run()
    except BaseException as exc:
        return ("raised", type(exc), exc.args)
    if hasattr(result, "chat_history"):
        return ("ok", result.chat_history, result.summary, result.cost)
    return ("ok", result)


class Capture:
    """An SDK provider with an in-memory exporter, plus optional extra (hostile) processors."""

    def __init__(self, *processors: SpanProcessor, provider: TracerProvider | None = None) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = provider or TracerProvider(shutdown_on_exit=False)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        for processor in processors:
            self.provider.add_span_processor(processor)

    @property
    def spans(self) -> list[Any]:
        return sorted(self.exporter.get_finished_spans(), key=lambda s: s.start_time or 0)

    def named(self, prefix: str) -> list[Any]:
        return [s for s in self.spans if s.name.startswith(prefix)]


@contextlib.contextmanager
def instrumented_with(capture: Capture, capture_content: bool | None = None) -> Iterator[Capture]:
    """``cmbagent_otel.instrument`` into ``capture``; always uninstrumented afterwards."""
    cmbagent_otel.instrument(tracer_provider=capture.provider, capture_content=capture_content,
                             instrument_cmbagent=False)
    try:
        yield capture
    finally:
        cmbagent_otel.uninstrument()
        with contextlib.suppress(Exception):  # a hostile processor may fail its shutdown too
            capture.provider.shutdown()


@pytest.fixture(autouse=True)
def _no_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGEN_USE_DOCKER", "False")
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    assert not cmbagent_otel.is_instrumented()


@pytest.fixture
def registered_key(isolated_secrets: None, monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered key without a key shape: only its registration makes it a secret. It is one of
    the application's first keys, so its encoded forms are registered with it (past
    ``redaction._ENCODED_MAX`` keys a process registers none: the keys the tests before it registered
    count, and in a full run they passed that bound)."""
    monkeypatch.setattr(redaction, "_encoded_count", 0)
    key = "QZ" + secrets.token_urlsafe(30)[:30].replace("-", "A").replace("_", "B")
    redaction.register_secret(key)
    return key


def _on_cmbagent_autogen() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("cmbagent_autogen")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


ON_CMBAGENT_AUTOGEN = _on_cmbagent_autogen()


@pytest.fixture(autouse=True)
def _fork_chat_files(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """cmbagent_autogen's GroupChatManager writes every group chat message to ``chats/`` under the current
    directory (a cmbagent add-on), and fails when there is none: each test runs in a fresh directory that
    has one. Other AG2 lines write nothing there, and their tests keep the directory they were started in."""
    if ON_CMBAGENT_AUTOGEN:
        cwd = tmp_path_factory.mktemp("cwd")
        (cwd / "chats").mkdir()
        monkeypatch.chdir(cwd)
