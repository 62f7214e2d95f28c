"""An application exception whose ``__str__`` raises still fails its spans.

It passes through every wrapper unchanged (the same object), and the spans it leaves
through are marked ERROR with its type, as for any other exception: recording it must not
depend on ``str(exc)`` (the SDK's ``record_exception`` calls it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent
from opentelemetry.trace import StatusCode

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.testing import ScriptedModelClient

from .conftest import Capture, group_chat, instrumented_with, needs_custom_client, scripted_agent

pytestmark = needs_custom_client


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class UnprintableAbort(BaseException):
    def __str__(self) -> str:
        raise RuntimeError("no str")


def reply_raises(error: BaseException) -> Any:
    def run(work_dir: Path) -> Any:
        agent = scripted_agent("researcher", ["unused"])

        def reply(recipient: Any, messages: Any = None, sender: Any = None, config: Any = None) -> Any:
            raise error

        agent.register_reply([ConversableAgent, None], reply, position=0)
        user = scripted_agent("user", ["hi"])
        return user.initiate_chat(agent, message="hello", max_turns=1, silent=True)
    return run


def model_raises(error: BaseException) -> Any:
    class FailingClient(ScriptedModelClient):
        def create(self, params: dict[str, Any]) -> Any:
            raise error

    return lambda d: group_chat(d, client=FailingClient)


def tool_raises(error: BaseException) -> Any:
    def tool(multipole: int) -> str:
        raise error

    return lambda d: group_chat(d, tool=tool)


def speaker_raises(error: BaseException) -> Any:
    def speaker(last: Any, chat: Any) -> Any:
        raise error

    return lambda d: group_chat(d, speaker=speaker)


@pytest.mark.parametrize(("make", "error_cls", "span_prefix"), [
    (reply_raises, Unprintable, "invoke_agent researcher"),
    (model_raises, Unprintable, "chat scripted"),
    (tool_raises, UnprintableAbort, "execute_tool peak_position"),  # AG2 reports an Exception as a message
    (speaker_raises, Unprintable, "invoke_agent chat_manager"),
], ids=["reply", "model", "tool", "speaker"])
def test_unprintable_app_exception_fails_its_spans(tmp_path: Path, make: Any, error_cls: type,
                                                   span_prefix: str) -> None:
    error = error_cls("hidden")
    cap = Capture()
    with instrumented_with(cap, capture_content=True), pytest.raises(error_cls) as info:
        make(error)(tmp_path)
    assert info.value is error
    spans = cap.named(span_prefix)
    assert spans, [s.name for s in cap.spans]
    failed = [s for s in spans if s.status.status_code is StatusCode.ERROR]
    assert failed, f"{span_prefix} not failed: {[(s.name, s.status) for s in spans]}"
    assert failed[0].attributes["error.type"] == error_cls.__qualname__
    events = [e for s in cap.spans for e in s.events if e.name in ("exception", "cmbagent.handoff")]
    assert any((e.attributes or {}).get("exception.message") == "<exception str() failed>" for e in events)


def test_unprintable_exception_in_a_step_fails_step_phase_and_workflow() -> None:
    error = Unprintable()
    cap = Capture()
    with instrumented_with(cap), pytest.raises(Unprintable) as info, \
            workflow("w", mode="planning-control"), phase("control"), step(1, "fit"):
        raise error
    assert info.value is error
    spans = {s.name.split()[0]: s for s in cap.spans}
    for kind in ("workflow", "phase", "step"):
        assert spans[kind].status.status_code is StatusCode.ERROR, kind
        assert spans[kind].attributes["error.type"] == "Unprintable"
