"""Coexistence with other wrapt-based instrumentations of AG2 (OpenInference's AG2Instrumentor, a plain wrapper).

Ours records every span whether the other wrapped first or after, the other keeps working, and
each uninstrument removes only its own wrapper, in any order.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import wrapt
from autogen.agentchat import conversable_agent
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel
from cmbagent_otel.demo import group_chat_step

openinference_ag2 = pytest.importorskip("openinference.instrumentation.ag2")

# our span tree of the four-agent chat (tool call, code execution; its five handoffs are events on the
# manager's span): the same alone or with others
CHAT_TREE_LENGTH = 12
CHAT_HANDOFFS = 5
METHODS = ("initiate_chat", "a_initiate_chat", "generate_reply", "a_generate_reply", "execute_function",
           "a_execute_function")


class Memory:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def take(self) -> list[str]:
        names = [s.name for s in self.exporter.get_finished_spans()]
        self.exporter.clear()
        return names

    def handoffs(self) -> int:
        return sum(1 for s in self.exporter.get_finished_spans() for e in s.events if e.name == "cmbagent.handoff")


def chat(tmp_path: Any) -> None:
    group_chat_step(str(tmp_path), [{"tool_calls": [{"name": "peak_position", "arguments": {"multipole": 2}}]},
                                    "```python\nprint('peaks at 220, 540')\n```"],
                    ["engineer", "executor", "engineer", "executor", "researcher"])


class OpenInference:
    def __init__(self) -> None:
        self.memory = Memory()
        self.instrumentor = openinference_ag2.AG2Instrumentor()

    def instrument(self) -> None:
        # cmbagent_autogen provides `autogen` without the `ag2` distribution OpenInference checks for
        self.instrumentor.instrument(tracer_provider=self.memory.provider, skip_dep_check=True)

    def uninstrument(self) -> None:
        self.instrumentor.uninstrument()


class Ours:
    def __init__(self) -> None:
        self.memory = Memory()

    def instrument(self) -> None:
        cmbagent_otel.instrument(tracer_provider=self.memory.provider, instrument_cmbagent=False,
                                 instrument_threading=False)

    def uninstrument(self) -> None:
        cmbagent_otel.uninstrument()


@pytest.mark.parametrize(("first", "remove_first"), list(itertools.product(["openinference", "ours"], repeat=2)))
def test_with_openinference_in_any_order(tmp_path, first, remove_first):
    originals = {name: vars(conversable_agent.ConversableAgent)[name] for name in METHODS}
    ours, other = Ours(), OpenInference()
    tools = {"ours": ours, "openinference": other}
    second = "ours" if first == "openinference" else "openinference"
    tools[first].instrument()
    tools[second].instrument()
    try:
        chat(tmp_path / "both")
        # the handoffs stay on our spans even when OpenInference's span is current inside ours
        assert (ours.memory.handoffs(), other.memory.handoffs()) == (CHAT_HANDOFFS, 0)
        assert len(ours.memory.take()) == CHAT_TREE_LENGTH  # every span of ours, not the 20-of-34 of before
        assert other.memory.take()  # theirs still records too
        remove_second = "ours" if remove_first == "openinference" else "openinference"
        tools[remove_first].uninstrument()
        chat(tmp_path / "one")
        left = tools[remove_second]
        if remove_first == "ours":
            assert ours.memory.take() == []
            assert other.memory.take()  # our uninstrument left their wrapper working
        else:
            recorded = ours.memory.take()
            # OpenInference restores the methods it found: ours survives when it was there first
            assert len(recorded) == CHAT_TREE_LENGTH or first == "openinference"
        left.uninstrument()
    finally:
        cmbagent_otel.uninstrument()
        other.uninstrument()
    chat(tmp_path / "none")
    assert ours.memory.take() == [] and other.memory.take() == []
    if not (first == "ours" and remove_first == "ours"):
        # OpenInference restores what it found; only when it found ours does an (inert) wrapper of ours stay
        for name, original in originals.items():
            assert vars(conversable_agent.ConversableAgent)[name] is original, name


def test_with_a_plain_wrapt_wrapper_before_and_after(tmp_path):
    calls: list[str] = []

    def counting(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        calls.append(instance.name)
        return wrapped(*args, **kwargs)

    cls = conversable_agent.ConversableAgent
    original = vars(cls)["generate_reply"]
    ours = Ours()
    wrapt.wrap_function_wrapper(cls, "generate_reply", counting)  # before ours
    users = vars(cls)["generate_reply"]
    try:
        ours.instrument()
        try:
            chat(tmp_path / "before")
            assert len(ours.memory.take()) == CHAT_TREE_LENGTH and calls
        finally:
            ours.uninstrument()
        assert vars(cls)["generate_reply"] is users  # only ours removed
        ours.instrument()
        wrapt.wrap_function_wrapper(cls, "generate_reply", counting)  # after ours
        outer = vars(cls)["generate_reply"]
        calls.clear()
        try:
            chat(tmp_path / "after")
            assert len(ours.memory.take()) == CHAT_TREE_LENGTH and calls
        finally:
            ours.uninstrument()
        # ours was in the middle: taken out, the user's two wrappers still chained and working
        assert vars(cls)["generate_reply"] is outer and outer.__wrapped__ is users
        calls.clear()
        chat(tmp_path / "without ours")
        assert ours.memory.take() == [] and calls
    finally:
        cls.generate_reply = original


def test_only_methods_that_end_in_a_function_get_a_plain_patch():
    from cmbagent_otel.instrumentation.ag2 import _plain_patchable

    def counting(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return wrapped(*args, **kwargs)

    class Host:
        def method(self) -> int:
            return 1

        @staticmethod
        def static() -> int:
            return 2

        @classmethod
        def klass(cls) -> int:
            return 3

    plain = {name: _plain_patchable("Host", vars(Host)[name]) for name in ("method", "static", "klass")}
    for name in ("method", "static", "klass"):  # another instrumentation's proxies, two deep
        wrapt.wrap_function_wrapper(Host, name, counting)
        wrapt.wrap_function_wrapper(Host, name, counting)
    proxied = {name: _plain_patchable("Host", vars(Host)[name]) for name in ("method", "static", "klass")}
    # a plain function binds like a method: a staticmethod or classmethod (bare or proxied) keeps a proxy
    assert plain == proxied == {"method": True, "static": False, "klass": False}
    assert (Host().method(), Host.static(), Host().static(), Host.klass()) == (1, 2, 2, 3)
    assert _plain_patchable("", vars(Host)["method"]) is False  # a module function: always a proxy
