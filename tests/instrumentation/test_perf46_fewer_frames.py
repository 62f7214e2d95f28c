"""Frames a model call no longer makes (issue 13, session 46).

The model call's builder is generated from ``ag2._llm`` with ``register_llm_config_secrets`` (``_content``) and
``ModelMetrics.live`` written in, its unrecorded path from ``ag2._llm_fast`` with ``live`` written in, and its recorder
with ``usage_attributes`` (``_models``) written in, nested in ``_response_facts``: ``_specialise._Inline`` now writes in
a function of another module that the caller's module imports under its own name (the same object), and the helpers a
written-in helper calls. These tests pin that no such frame is left, and that what they did is still done: the usage
attributes on the span, the metrics of an unrecorded call, a helper not imported by its name left as a call.
(A key replaced inside a config entry between two calls: ``tests/reliability/test_secrets.py``.)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import cmbagent_otel
from cmbagent_otel import metrics
from cmbagent_otel._specialise import specialise
from cmbagent_otel.instrumentation import _content, _models, ag2
from cmbagent_otel.testing import offline_agent
from tests.conftest import SpanCapture

_HELPERS = {"usage_attributes", "register_llm_config_secrets", "live"}


def _frames_of_a_chat(sender: Any, answerer: Any) -> list[tuple[str, str]]:
    """The functions of ``_models``, ``_content`` and ``metrics`` called while the two agents chat (one model call),
    each with its caller's name."""
    files = {_models.__file__, _content.__file__, metrics.__file__}
    called: list[tuple[str, str]] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename in files:
            called.append((frame.f_code.co_name, frame.f_back.f_code.co_name))

    with _profiled(profile):
        sender.initiate_chat(answerer, message="hi", max_turns=1, silent=True)
    return called


@contextlib.contextmanager
def _profiled(profile: Any) -> Iterator[None]:
    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(None)


def test_a_recorded_model_call_makes_no_frame_of_its_written_in_helpers(instrumented: SpanCapture) -> None:
    sender = offline_agent("asker", ["hello"] * 3)
    answerer = offline_agent("answerer", ["one", "two", "three"])
    sender.initiate_chat(answerer, message="hi", max_turns=1, silent=True)  # agents' facts computed first
    instrumented.exporter.clear()
    called = _frames_of_a_chat(sender, answerer)
    assert not _HELPERS.intersection(name for name, _ in called), called
    (call,) = instrumented.named("chat ")
    assert call.attributes["gen_ai.usage.input_tokens"] >= 0 and call.attributes["gen_ai.usage.output_tokens"] >= 0


def test_an_unrecorded_model_call_reads_live_metrics_in_its_own_frame() -> None:
    """Sampler off, a meter provider set: no ``live`` frame, and the call's duration and tokens are recorded."""
    reader = InMemoryMetricReader()
    cmbagent_otel.instrument(tracer_provider=TracerProvider(sampler=ALWAYS_OFF),
                             meter_provider=MeterProvider(metric_readers=[reader]), instrument_cmbagent=False)
    try:
        sender = offline_agent("asker", ["hello"] * 3)
        answerer = offline_agent("answerer", ["one", "two", "three"])
        called = _frames_of_a_chat(sender, answerer)
    finally:
        cmbagent_otel.uninstrument()
    # (the metrics' own end, ``_ModelCall.ended``, still asks: a path of live metrics only)
    assert ("live", "_llm_fast") not in called and ("live", "ended") in called, called
    data = reader.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage"} <= names, names


def test_the_generated_builders_are_copies_with_the_helpers_written_in() -> None:
    ag2._generate_starts()  # what the first instrument() does
    for function, gone in ((ag2._llm, {"register_llm_config_secrets", "live"}), (ag2._llm_fast, {"live"}),
                           (ag2._record_llm, {"_response_facts", "usage_attributes"})):
        made = ag2._MADE[function]
        assert made is not function and made.__name__ == function.__name__
        assert not gone.intersection(made.__code__.co_names), made.__code__.co_names
        assert made.__code__.co_filename == function.__code__.co_filename


def test_a_helper_of_another_module_is_written_in_only_under_its_own_name() -> None:
    """``config_info`` is ``_models``' and ``ag2`` imports no ``config_info``: the copy calls it (as ``_model_call``
    itself does, through the fallback), the same result."""
    assert "config_info" not in vars(ag2)
    made = specialise(ag2._model_call, "_model_call", {}, inline=(_models.config_info,))
    assert "_func" in made.__code__.co_names  # the fallback: a plain function calling _model_call

    class Client:
        _config_list = [{"model": "gpt-4o", "api_type": "openai"}]

    assert made(Client(), {}).request_model == ag2._model_call(Client(), {}).request_model == "gpt-4o"


def test_what_unsampled_means_is_bound_per_patched_method() -> None:
    """The wrappers read what an unrecordable span means (``_FAST``: the method's fast path; ``None``: straight
    through) from a value bound when the method is patched, not by testing ``fast`` per call: an unsampled chat
    still takes the fast path of a turn and a model call, and calls a conversation (no fast path) straight
    through."""
    cmbagent_otel.instrument(tracer_provider=TracerProvider(sampler=ALWAYS_OFF), instrument_cmbagent=False)
    try:
        sender = offline_agent("asker", ["hello"] * 3)
        answerer = offline_agent("answerer", ["one", "two", "three"])
        patched = vars(type(sender))["generate_reply"]
        assert "_FAST" not in patched.__code__.co_names and "unsampled" in patched.__code__.co_freevars
        called: list[str] = []

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code.co_filename == ag2.__file__:
                called.append(frame.f_code.co_name)

        with _profiled(profile):
            sender.initiate_chat(answerer, message="hi", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
    assert {"_agent_fast", "_llm_fast"} <= set(called), called
    assert not {"_agent", "_llm", "_conversation"}.intersection(called), called


def test_a_calls_own_request_parameters_are_its_own(instrumented: SpanCapture) -> None:
    """A model call passing a request parameter (``temperature``) gets it on its span, and the calls around it, which
    pass none, get their config's attributes (the cached ones), not that call's."""
    agent = offline_agent("caller", ["one", "two", "three"])
    messages = [{"role": "user", "content": "hi"}]
    agent.client.create(messages=messages)
    agent.client.create(messages=messages, temperature=0.25)
    agent.client.create(messages=messages)
    plain, own, again = instrumented.named("chat ")
    assert own.attributes["gen_ai.request.temperature"] == 0.25
    assert "gen_ai.request.temperature" not in plain.attributes and "gen_ai.request.temperature" not in again.attributes
    assert list(again.attributes) == list(plain.attributes)
