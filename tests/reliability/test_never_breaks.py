"""The instrumented application never breaks.

Each test runs the same real AG2 group chat twice, uninstrumented and instrumented, with
a hostile part that makes *our* wrappers' own code fail (properties that raise, objects
whose ``str``/``repr`` raise, non-UTF-8 and huge values, model responses whose attributes
raise, failing span processors, exporters and tracer providers), and asserts the
application observes exactly the same thing: the same chat history, summary and cost, or
the same exception (type and args). Application exceptions must pass through every
wrapper unchanged (the very same object) while the span is marked ERROR.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from autogen import ConversableAgent
from autogen.coding import LocalCommandLineCodeExecutor
from autogen.io import IOStream
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanProcessor
from opentelemetry.trace import StatusCode

from cmbagent_otel.testing import ScriptedModelClient

from .conftest import (
    ON_CMBAGENT_AUTOGEN,
    Capture,
    group_chat,
    instrumented_with,
    needs_custom_client,
    outcome,
    scripted_agent,
)

pytestmark = needs_custom_client


class AppError(Exception):
    """The application's own exception."""


class AppAbort(BaseException):
    """An application exception AG2 does not catch (like KeyboardInterrupt)."""


def same_outcome(tmp_path: Path, run: Any, *, capture: Capture | None = None,
                 capture_content: bool | None = None) -> tuple[Any, Capture]:
    """Run ``run(work_dir)`` plain then instrumented; assert the app saw the same thing."""
    plain = outcome(lambda: run(tmp_path / "plain"))
    cap = capture or Capture()
    with instrumented_with(cap, capture_content=capture_content):
        traced = outcome(lambda: run(tmp_path / "traced"))
    assert traced == plain
    return plain, cap


# --- hostile agents ------------------------------------------------------------------------------

class DescriptionRaises(ConversableAgent):
    @property
    def description(self) -> str:
        raise AppError("description unavailable")

    @description.setter
    def description(self, value: str) -> None:
        pass


class NameRaises(ConversableAgent):
    @property
    def name(self) -> str:
        raise AppError("name unavailable")


class Unprintable(str):
    """A string whose str()/repr()/format() raise (AG2 itself only hashes and compares it)."""

    __slots__ = ()

    def __str__(self) -> str:
        raise AppError("no str")

    def __repr__(self) -> str:
        raise AppError("no repr")

    def __format__(self, spec: str) -> str:
        raise AppError("no format")


class NameUnprintable(ConversableAgent):
    @property
    def name(self) -> str:
        return Unprintable(self._name)


class DescriptionUnprintable(ConversableAgent):
    @property
    def description(self) -> str:
        return Unprintable("a hostile agent")

    @description.setter
    def description(self, value: str) -> None:
        pass


@pytest.mark.parametrize("agent_cls", [DescriptionRaises, NameRaises])
def test_agent_property_raises(tmp_path: Path, agent_cls: Any) -> None:
    """AG2 itself reads these properties: the app fails, and fails identically when traced
    (cmbagent_autogen's group chat never reads a description: there only our wrappers meet it, and the
    app still succeeds)."""
    plain, _ = same_outcome(tmp_path, lambda d: group_chat(d, agent_cls=agent_cls), capture_content=True)
    if ON_CMBAGENT_AUTOGEN and agent_cls is DescriptionRaises:
        assert plain[0] == "ok"
    else:
        assert plain[:2] == ("raised", AppError)


@pytest.mark.parametrize("capture_content", [False, True])
@pytest.mark.parametrize("agent_cls", [NameUnprintable, DescriptionUnprintable])
def test_agent_name_or_description_unprintable(tmp_path: Path, agent_cls: Any, capture_content: bool) -> None:
    plain, cap = same_outcome(tmp_path, lambda d: group_chat(d, agent_cls=agent_cls),
                              capture_content=capture_content)
    if ON_CMBAGENT_AUTOGEN and agent_cls is NameUnprintable:  # its cost table (pandas) prints the agent's name
        assert plain[:3] == ("raised", AppError, ("no str",))
    else:
        assert plain[0] == "ok"
    assert cap.named("chat scripted")  # what could be described is still traced


# --- hostile messages and values ------------------------------------------------------------------

@pytest.mark.parametrize("capture_content", [False, True])
def test_message_whose_str_and_repr_raise(tmp_path: Path, capture_content: bool) -> None:
    same_outcome(tmp_path, lambda d: group_chat(d, message=Unprintable("Carry out the step.")),
                 capture_content=capture_content)


class HostileObject:
    def __str__(self) -> str:
        raise AppError("no str")

    def __repr__(self) -> str:
        raise AppError("no repr")


@pytest.mark.parametrize("capture_content", [False, True])
def test_message_dict_with_hostile_fields(tmp_path: Path, capture_content: bool) -> None:
    message = {"content": "Carry out the step.", "role": "user", "context": {"blob": HostileObject()}}
    same_outcome(tmp_path, lambda d: group_chat(d, message=message), capture_content=capture_content)


SURROGATES = "bad \udcff\udc80 bytes \ud800 end"
HUGE = "x" * 5_000_000


@pytest.mark.parametrize("capture_content", [False, True])
def test_non_utf8_and_huge_values(tmp_path: Path, capture_content: bool) -> None:
    script = [
        {"tool_calls": [{"id": "call_rel_1", "name": "peak_position",
                         "arguments": {"multipole": 2, "note": SURROGATES}}]},
        "```python\nprint('peaks')\n```",
    ]

    def tool(multipole: int, note: str = "") -> str:
        return HUGE + note

    _, cap = same_outcome(
        tmp_path, lambda d: group_chat(d, message=SURROGATES + HUGE, engineer_script=script, tool=tool),
        capture_content=capture_content,
    )
    for span in cap.spans:
        for value in (span.attributes or {}).values():
            if isinstance(value, str):
                assert len(value) <= 16384  # every attribute stays bounded


# --- hostile model responses ----------------------------------------------------------------------

class EvilFloat(float):
    """A cost AG2 can add up, but whose float() conversion raises."""

    def __float__(self) -> float:
        raise AppError("no float")


class HostileResponse:
    """A model response whose standard attributes raise; AG2 only uses the client's methods
    (and ``hasattr(response, "id")``, so the id is an unprintable string instead)."""

    def __init__(self, text: Any) -> None:
        self._text = text
        self.cost = None
        self.id = Unprintable("resp-1")

    @property
    def usage(self) -> Any:
        raise AppError("usage unavailable")

    @property
    def choices(self) -> Any:
        raise AppError("choices unavailable")

    @property
    def model(self) -> Any:
        raise AppError("model unavailable")

    def __repr__(self) -> str:
        raise AppError("no repr")


class HostileClient(ScriptedModelClient):
    def create(self, params: dict[str, Any]) -> Any:
        response = super().create(params)
        return HostileResponse(response.choices[0].message._raw)

    def message_retrieval(self, response: Any) -> list[Any]:
        raw = response._text
        return [raw if raw.get("tool_calls") else (raw.get("content") or "")]

    def cost(self, response: Any) -> float:
        return EvilFloat(0.001)

    @staticmethod
    def get_usage(response: Any) -> dict[str, Any]:
        return {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "cost": 0.001, "model": "scripted"}


@pytest.mark.parametrize("capture_content", [False, True])
def test_model_response_attributes_raise(tmp_path: Path, capture_content: bool) -> None:
    plain, cap = same_outcome(tmp_path, lambda d: group_chat(d, client=HostileClient),
                              capture_content=capture_content)
    if ON_CMBAGENT_AUTOGEN:  # its cost table reads response.model, after the model call returned
        assert plain[:3] == ("raised", AppError, ("model unavailable",))
    else:
        assert plain[0] == "ok"
    llm = cap.named("chat scripted")
    assert llm and all(s.status.status_code is not StatusCode.ERROR for s in llm)


# --- hostile telemetry pipeline ---------------------------------------------------------------------

class RaisingProcessor(SpanProcessor):
    def __init__(self, on_start: bool = True, on_end: bool = True) -> None:
        self._start, self._end = on_start, on_end

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self._start:
            raise AppError("processor on_start")

    def on_end(self, span: Any) -> None:
        if self._end:
            raise AppError("processor on_end")

    def shutdown(self) -> None:
        raise AppError("processor shutdown")

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        raise AppError("processor flush")


class RaisingExporter(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[Any]) -> Any:
        self.calls += 1
        raise AppError("exporter down")

    def shutdown(self) -> None:
        raise AppError("exporter shutdown")


@pytest.mark.parametrize(("on_start", "on_end"), [(True, False), (False, True), (True, True)])
def test_span_processor_raises(tmp_path: Path, on_start: bool, on_end: bool) -> None:
    plain, _ = same_outcome(tmp_path, group_chat, capture=Capture(RaisingProcessor(on_start, on_end)),
                            capture_content=True)
    assert plain[0] == "ok"


@pytest.mark.parametrize("processor", [SimpleSpanProcessor, BatchSpanProcessor])
def test_exporter_raises(tmp_path: Path, processor: Any) -> None:
    exporter = RaisingExporter()
    plain, cap = same_outcome(tmp_path, group_chat, capture=Capture(processor(exporter)))
    cap.provider.force_flush()
    assert plain[0] == "ok" and exporter.calls > 0


class BrokenProvider(TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        raise AppError("no tracer")


def test_tracer_provider_raises(tmp_path: Path) -> None:
    plain, cap = same_outcome(tmp_path, group_chat, capture=Capture(provider=BrokenProvider(shutdown_on_exit=False)))
    assert plain[0] == "ok" and cap.spans == []


def test_app_exception_and_failing_processor_together(tmp_path: Path) -> None:
    """The app's exception wins over telemetry errors raised while recording it."""

    def speaker(last: Any, chat: Any) -> Any:
        raise AppError("speaker function failed", 7)

    same_outcome(tmp_path, lambda d: group_chat(d, speaker=speaker), capture=Capture(RaisingProcessor()))


# --- application exceptions propagate unchanged through every wrapper ---------------------------------

def traced_raise(tmp_path: Path, run: Any, error: BaseException, span_prefix: str) -> Capture:
    """``run`` must raise ``error`` itself (same object) instrumented, and the same type/args plain."""
    plain = outcome(lambda: run(tmp_path / "plain"))
    assert plain[:2] == ("raised", type(error))
    cap = Capture()
    with instrumented_with(cap), pytest.raises(type(error)) as info:
        run(tmp_path / "traced")
    assert info.value is error
    assert (type(info.value), info.value.args) == plain[1:]
    failed = [s for s in cap.named(span_prefix) if s.status.status_code is StatusCode.ERROR]
    assert failed, f"no ERROR span {span_prefix!r} in {[s.name for s in cap.spans]}"
    assert failed[0].attributes["error.type"] == type(error).__qualname__
    return cap


def test_reply_function_exception_propagates(tmp_path: Path) -> None:
    error = AppError("reply failed", {"step": 2})

    def run(work_dir: Path) -> Any:
        agent = scripted_agent("researcher", ["unused"])

        def failing_reply(recipient: Any, messages: Any = None, sender: Any = None, config: Any = None) -> Any:
            raise error

        agent.register_reply([ConversableAgent, None], failing_reply, position=0)
        user = scripted_agent("user", ["hi"])
        return user.initiate_chat(agent, message="hello", max_turns=1, silent=True)

    cap = traced_raise(tmp_path, run, error, "invoke_agent researcher")
    assert cap.named("conversation researcher")[0].status.status_code is StatusCode.ERROR


def test_model_client_exception_propagates(tmp_path: Path) -> None:
    error = AppError("provider exploded")

    class FailingClient(ScriptedModelClient):
        def create(self, params: dict[str, Any]) -> Any:
            raise error

    traced_raise(tmp_path, lambda d: group_chat(d, client=FailingClient), error, "chat scripted")


def test_tool_exception_is_reported_by_ag2_and_span_fails(tmp_path: Path) -> None:
    def tool(multipole: int) -> str:
        raise AppError("tool failed")

    plain, cap = same_outcome(tmp_path, lambda d: group_chat(d, tool=tool))
    assert plain[0] == "ok"  # AG2 turns tool exceptions into an error message
    span = cap.named("execute_tool peak_position")[0]
    assert span.status.status_code is StatusCode.ERROR


def test_tool_base_exception_propagates(tmp_path: Path) -> None:
    error = AppAbort("operator abort")

    def tool(multipole: int) -> str:
        raise error

    traced_raise(tmp_path, lambda d: group_chat(d, tool=tool), error, "execute_tool peak_position")


def test_code_executor_exception_propagates(tmp_path: Path) -> None:
    error = AppError("sandbox unavailable")

    class FailingExecutor(LocalCommandLineCodeExecutor):
        # fails inside the base class's (traced) execute_code_blocks
        def _execute_code_dont_check_setup(self, code_blocks: Any) -> Any:
            raise error

    traced_raise(tmp_path, lambda d: group_chat(d, executor=FailingExecutor(work_dir=d)), error, "execute_code")


def test_speaker_function_exception_propagates(tmp_path: Path) -> None:
    error = AppError("no next speaker", 3)

    def speaker(last: Any, chat: Any) -> Any:
        raise error

    # the selection is a handoff event on the manager's span: the exception fails that span on its way out
    cap = traced_raise(tmp_path, lambda d: group_chat(d, speaker=speaker), error, "invoke_agent chat_manager")
    (manager,) = cap.named("invoke_agent chat_manager")
    (handoff,) = [e for e in manager.events if e.name == "cmbagent.handoff"]
    assert handoff.attributes["error.type"] == type(error).__qualname__
    assert handoff.attributes["exception.message"] == str(error)


class FailingInput(IOStream):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def print(self, *objects: Any, sep: str = " ", end: str = "\n", flush: bool = False) -> None:
        pass

    def send(self, message: Any) -> None:
        pass

    def input(self, prompt: str = "", *, password: bool = False) -> str:
        raise self.error


def test_human_input_exception_propagates(tmp_path: Path) -> None:
    error = AppError("terminal closed")

    def run(work_dir: Path) -> Any:
        human = scripted_agent("human", ["unused"], human_input_mode="ALWAYS")
        assistant = scripted_agent("assistant", ["What next?"])
        with IOStream.set_default(FailingInput(error)):
            return assistant.initiate_chat(human, message="hello", max_turns=2, silent=True)

    traced_raise(tmp_path, run, error, "await_human_input human")


def test_async_reply_exception_propagates(tmp_path: Path) -> None:
    error = AppError("async reply failed")

    def run(work_dir: Path) -> Any:
        agent = scripted_agent("researcher", ["unused"])

        async def failing_reply(recipient: Any, messages: Any = None, sender: Any = None, config: Any = None) -> Any:
            raise error

        agent.register_reply([ConversableAgent, None], failing_reply, position=0)
        user = scripted_agent("user", ["hi"])
        return asyncio.run(user.a_initiate_chat(agent, message="hello", max_turns=1, silent=True))

    traced_raise(tmp_path, run, error, "invoke_agent researcher")


def test_return_values_pass_through_unchanged(tmp_path: Path) -> None:
    """Wrapped methods return the very objects AG2 returns."""
    sentinel = SimpleNamespace(marker="app object")

    def run(work_dir: Path) -> Any:
        agent = scripted_agent("researcher", ["unused"])

        def reply(recipient: Any, messages: Any = None, sender: Any = None, config: Any = None) -> Any:
            return True, sentinel

        agent.register_reply([ConversableAgent, None], reply, position=0)
        return agent.generate_reply(messages=[{"role": "user", "content": "hi"}], sender=None)

    cap = Capture()
    with instrumented_with(cap, capture_content=True):
        assert run(tmp_path) is sentinel
    assert run(tmp_path) is sentinel
    assert cap.named("invoke_agent researcher")
