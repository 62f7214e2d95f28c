"""What a user of the real cmbagent package sees, twenty-first audit (session 46): LangChain chat models.

Real LangChain chat models (``ChatOpenAI``, ``ChatAnthropic``, ``ChatGoogleGenerativeAI``) answered by a loopback
server, called inside a ``cmbagent_otel.workflow`` block with the real cmbagent installed (the integration hooks
LangChain only then); spans read back from memory. No MARS source needed: these run wherever the LangChain 0.3
packages are installed (``./dev setup`` puts them in the cmbagent_autogen venv).
"""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")
pytest.importorskip("langchain_core", reason="langchain-core is not installed")

import cmbagent_otel
from cmbagent_otel import semconv as sc
from cmbagent_otel.testing import FakeOpenAIServer

from .scripted_cmbagent import API_KEYS
from .test_cmbagent_runs import SpanCapture
from .test_cmbreal19_audit import IDEA_USAGE, RESPONSE_MODEL, _langchain_answers, api_keys_absent

pytestmark = pytest.mark.cmbagent_autogen

IDEA, METHODS = "Write an idea for a paper on the CMB", "Write the methods"


@pytest.fixture
def traced() -> Iterator[SpanCapture]:
    """Spans of this test's cmbagent_otel instrumentation (content capture on) in memory."""
    capture = SpanCapture()
    cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False, instrument_threading=False,
                             capture_content=True)
    try:
        yield capture
    finally:
        cmbagent_otel.uninstrument()


def _chats(capture: SpanCapture) -> list[Any]:
    return [s for s in capture.spans if s.name.startswith("chat ")]


def _said(span: Any) -> list[str]:
    """The texts of the captured output message of ``span``."""
    return [p["content"] for p in json.loads(span.attributes[sc.GEN_AI_OUTPUT_MESSAGES])[0]["parts"]
            if p["type"] == "text"]


def _asked(span: Any) -> list[str]:
    """The texts of the captured input messages of ``span``."""
    return [p["content"] for m in json.loads(span.attributes[sc.GEN_AI_INPUT_MESSAGES]) for p in m["parts"]]


# --- the entry points that bypass invoke ----------------------------------------------------------------------
def _human(text: str) -> Any:
    from langchain_core.messages import HumanMessage

    return HumanMessage(text)


# each entry point: what it does with the model -> the prompts of the model calls it makes, in order
ENTRIES: dict[str, tuple[Callable[[Any], Any], list[str]]] = {
    "invoke": (lambda llm: llm.invoke(IDEA), [IDEA]),  # held: one span, not one more for its generate
    "generate": (lambda llm: llm.generate([[_human(IDEA)], [_human(METHODS)]]), [IDEA, METHODS]),
    "generate_prompt": (lambda llm: llm.generate_prompt([llm._convert_input(IDEA)]), [IDEA]),
    "agenerate": (lambda llm: asyncio.run(llm.agenerate([[_human(IDEA)], [_human(METHODS)]])), [IDEA, METHODS]),
    "call": (lambda llm: llm([_human(IDEA)]), [IDEA]),
    "predict": (lambda llm: llm.predict(IDEA), [IDEA]),
    "predict_messages": (lambda llm: llm.predict_messages([_human(IDEA)]), [IDEA]),
    "apredict": (lambda llm: asyncio.run(llm.apredict(IDEA)), [IDEA]),
}


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_langchain_entry_points_that_bypass_invoke_are_chat_spans(traced: SpanCapture, entry: str) -> None:
    """Audit 20's Left. Only a chat model's ``invoke`` / ``ainvoke`` / ``stream`` / ``astream`` were wrapped; its
    ``generate`` / ``agenerate`` (LangChain's batched calls), ``generate_prompt`` (what chains of
    ``BaseLanguageModel`` call), ``__call__`` and the deprecated ``predict`` / ``predict_messages`` / ``apredict``
    reach the model without them: model calls with no span, no LLM event and no cost row. Each model call they
    make (``generate`` of two prompts is two) is now a ``chat <model>`` span of the run, with its usage, response
    model, cost and, with capture on, its own prompt and answer; ``invoke`` stays one span."""
    pytest.importorskip("langchain_openai", reason="langchain_openai is not installed")
    from langchain_openai import ChatOpenAI

    call, prompts = ENTRIES[entry]
    with FakeOpenAIServer(raw_responder=_langchain_answers) as server:
        llm = ChatOpenAI(model="gpt-4o-mini", api_key=API_KEYS["OPENAI"], base_url=server.base_url, max_retries=0)
        if not hasattr(llm, {"call": "__call__"}.get(entry, entry)):  # (the deprecated ones: gone in 1.x)
            pytest.skip(f"this langchain-core has no {entry}")
        with cmbagent_otel.workflow("paper review"), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # LangChain's about predict & co.
            call(llm)
    (root,) = [s for s in traced.spans if s.parent is None]
    chats = _chats(traced)
    assert [(s.name, s.attributes[sc.GEN_AI_RESPONSE_MODEL], s.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS],
             s.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS]) for s in chats] == [
        ("chat gpt-4o-mini", RESPONSE_MODEL, *IDEA_USAGE)] * len(prompts)
    assert sorted(_asked(s)[0] for s in chats) == sorted(prompts)
    for span in chats:
        assert span.parent is not None and span.parent.span_id == root.context.span_id
        assert span.attributes[sc.LLM_COST_USD] > 0
        assert _said(span) == ["An idea."]
        assert api_keys_absent(span)


def test_a_failing_generate_fails_its_span_and_raises_the_apps_error(traced: SpanCapture) -> None:
    """A ``generate`` the server answers HTTP 500: the application gets ``openai``'s error unchanged, the call's
    span is failed with it (no usage, no output captured)."""
    pytest.importorskip("langchain_openai", reason="langchain_openai is not installed")
    import openai
    from langchain_openai import ChatOpenAI

    def overloaded(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        return 500, {"Content-Type": "application/json"}, b'{"error": {"message": "overloaded"}}'

    with FakeOpenAIServer(raw_responder=overloaded) as server:
        llm = ChatOpenAI(model="gpt-4o-mini", api_key=API_KEYS["OPENAI"], base_url=server.base_url, max_retries=0)
        with cmbagent_otel.workflow("paper review"), pytest.raises(openai.InternalServerError) as raised:
            llm.generate([[_human(IDEA)]])
    (chat,) = _chats(traced)
    assert chat.status.status_code is StatusCode.ERROR
    assert chat.attributes[sc.ERROR_TYPE] == type(raised.value).__name__
    assert sc.GEN_AI_USAGE_INPUT_TOKENS not in chat.attributes and sc.GEN_AI_OUTPUT_MESSAGES not in chat.attributes


def test_outside_a_run_the_generate_family_calls_through(traced: SpanCapture) -> None:
    """Outside any run ``generate`` records nothing and answers as without us."""
    pytest.importorskip("langchain_openai", reason="langchain_openai is not installed")
    from langchain_openai import ChatOpenAI

    with FakeOpenAIServer(raw_responder=_langchain_answers) as server:
        llm = ChatOpenAI(model="gpt-4o-mini", api_key=API_KEYS["OPENAI"], base_url=server.base_url, max_retries=0)
        result = llm.generate([[_human(IDEA)]])
    assert result.generations[0][0].text == "An idea."
    assert traced.spans == []


# --- answers whose content is a list of blocks ----------------------------------------------------------------
CLAUDE, GEMINI = "claude-3-5-sonnet-20241022", "gemini-2.5-pro"

# each answer: the provider's body of it -> the text a user reads in the captured output
BLOCKS: dict[str, tuple[dict[str, Any], str]] = {
    # extended thinking: the reasoning block is not the answer's text
    "anthropic_thinking": ({"content": [{"type": "thinking", "thinking": "The CMB is old.", "signature": "c2ln"},
                                        {"type": "text", "text": "An idea."}]}, "An idea."),
    # a text and a tool call (a model with tools bound)
    "anthropic_tool_use": ({"content": [{"type": "text", "text": "Let me look that up."},
                                        {"type": "tool_use", "id": "toolu_1", "name": "search",
                                         "input": {"query": "CMB"}}], "stop_reason": "tool_use"},
                           "Let me look that up."),
    "anthropic_two_texts": ({"content": [{"type": "text", "text": "An idea. "}, {"type": "text", "text": "Two."}]},
                            "An idea. Two."),
    # Gemini's parts: two texts (LangChain keeps them a list) and a thought
    "gemini_parts": ({"parts": [{"text": "The CMB is old.", "thought": True}, {"text": "An idea. "},
                                {"text": "Two."}]}, "An idea. Two."),
}


def _block_answers(case: str) -> Callable[[dict[str, Any], dict[str, str]], tuple[int, dict[str, str], bytes]]:
    """Anthropic's Messages API or Gemini's ``generateContent`` answering with ``BLOCKS[case]``'s content."""
    body, _ = BLOCKS[case]

    def answer(request: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if case.startswith("anthropic"):
            reply: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": CLAUDE,
                                     "stop_reason": "end_turn", "stop_sequence": None,
                                     "usage": {"input_tokens": 30, "output_tokens": 7}, **body}
        else:
            reply = {"candidates": [{"content": {**body, "role": "model"}, "finishReason": "STOP", "index": 0}],
                     "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 9, "totalTokenCount": 49},
                     "modelVersion": GEMINI}
        return 200, {"Content-Type": "application/json"}, json.dumps(reply).encode()

    return answer


@pytest.mark.parametrize("case", list(BLOCKS))
def test_an_answer_of_content_blocks_is_captured_as_its_text(traced: SpanCapture, case: str) -> None:
    """Audit 20's Left. ``ChatAnthropic`` answers with a list of content blocks when there is more than one text
    block, extended thinking or a tool call, ``ChatGoogleGenerativeAI`` when Gemini answers in several parts or
    thinks: with capture on, such a call's span had no output message (only a ``str`` content was read). Its
    text blocks are now the captured answer, joined as LangChain's ``BaseMessage.text`` joins them; reasoning and
    tool calls are not its text. The application's message is what it was."""
    with FakeOpenAIServer(raw_responder=_block_answers(case)) as server:
        root = server.base_url.removesuffix("/v1")
        if case.startswith("anthropic"):
            module = pytest.importorskip("langchain_anthropic", reason="langchain_anthropic is not installed")
            llm = module.ChatAnthropic(model=CLAUDE, api_key="sk-ant-scripted", base_url=root, max_retries=0)
        else:
            module = pytest.importorskip("langchain_google_genai", reason="langchain_google_genai is not installed")
            llm = module.ChatGoogleGenerativeAI(model=GEMINI, google_api_key=API_KEYS["GEMINI"], transport="rest",
                                                client_options={"api_endpoint": root}, max_retries=0)
        with cmbagent_otel.workflow("paper review"):
            message = llm.invoke(IDEA)
    assert isinstance(message.content, list)  # what the case is about: LangChain gave a list
    (chat,) = _chats(traced)
    assert _said(chat) == [BLOCKS[case][1]]
    assert _asked(chat) == [IDEA]
    calls = [p for p in json.loads(chat.attributes[sc.GEN_AI_OUTPUT_MESSAGES])[0]["parts"] if p["type"] != "text"]
    assert calls == ([{"type": "tool_call", "name": "search", "id": "toolu_1", "arguments": {"query": "CMB"}}]
                     if case == "anthropic_tool_use" else [])


# --- tool calls in the captured content -----------------------------------------------------------------------
def _tool_answers(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """OpenAI's chat completions: a call of the ``search`` tool, then (the prompt holding its result) a text."""
    answered = any(m.get("role") == "tool" for m in body.get("messages", ()))
    message: dict[str, Any] = {"role": "assistant", "content": "The CMB is 13.8 Gyr old."} if answered else {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"query": "CMB age"}'}}]}
    answer = {"id": "chatcmpl-lc", "object": "chat.completion", "created": 0, "model": RESPONSE_MODEL,
              "choices": [{"index": 0, "message": message, "finish_reason": "stop" if answered else "tool_calls"}],
              "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}
    return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode()


def test_a_langchain_calls_tool_calls_are_in_its_captured_content(traced: SpanCapture) -> None:
    """With capture on, a LangChain call answering with a tool call had an output message of one empty text (the
    call, what a user looks for in Jaeger, was lost), and the next call's prompt lost the assistant's tool call
    and the tool answer's call id. Now the output message holds the ``tool_call`` part (name, arguments, id;
    finish reason ``tool_call``) and the prompt the ``tool_call`` and ``tool_call_response`` parts, as AG2's own
    calls record them."""
    pytest.importorskip("langchain_openai", reason="langchain_openai is not installed")
    from langchain_core.messages import ToolMessage
    from langchain_openai import ChatOpenAI

    def search(query: str) -> str:
        """Search the literature."""
        return "13.8 Gyr"

    with FakeOpenAIServer(raw_responder=_tool_answers) as server:
        llm = ChatOpenAI(model="gpt-4o-mini", api_key=API_KEYS["OPENAI"], base_url=server.base_url,
                         max_retries=0).bind_tools([search])
        with cmbagent_otel.workflow("paper review"):
            asked = llm.invoke(IDEA)
            answer = llm.invoke([_human(IDEA), asked, ToolMessage("13.8 Gyr", tool_call_id="call_1")])
    assert asked.tool_calls[0]["name"] == "search" and answer.content == "The CMB is 13.8 Gyr old."
    first, second = _chats(traced)
    (said,) = json.loads(first.attributes[sc.GEN_AI_OUTPUT_MESSAGES])
    assert said["finish_reason"] == "tool_call"
    assert said["parts"] == [
        {"type": "tool_call", "name": "search", "id": "call_1", "arguments": {"query": "CMB age"}}]
    assert [(m["role"], [p["type"] for p in m["parts"]]) for m in json.loads(
        second.attributes[sc.GEN_AI_INPUT_MESSAGES])] == [
        ("user", ["text"]), ("assistant", ["tool_call"]), ("tool", ["tool_call_response"])]
    assert json.loads(second.attributes[sc.GEN_AI_INPUT_MESSAGES])[2]["parts"] == [
        {"type": "tool_call_response", "response": "13.8 Gyr", "id": "call_1"}]
    assert _said(second) == ["The CMB is 13.8 Gyr old."]


# --- LangChain's cache ----------------------------------------------------------------------------------------
def test_an_answer_of_langchains_cache_is_a_cache_hit_without_tokens_or_cost(traced: SpanCapture) -> None:
    """With LangChain's cache on (``set_llm_cache``), a prompt asked again is answered from the cache: no request
    is sent, yet its span carried the cached call's tokens and was priced again, so the step's cost row and the
    run's dollars counted a call that cost nothing. Now such a span says ``cmbagent.llm.cache_hit`` and has no
    usage and no cost (LangChain marks the cached answer ``usage_metadata['total_cost'] = 0``); the first call
    keeps its usage and cost."""
    pytest.importorskip("langchain_openai", reason="langchain_openai is not installed")
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import get_llm_cache, set_llm_cache
    from langchain_openai import ChatOpenAI

    before = get_llm_cache()
    set_llm_cache(InMemoryCache())
    try:
        with FakeOpenAIServer(raw_responder=_langchain_answers) as server:
            llm = ChatOpenAI(model="gpt-4o-mini", api_key=API_KEYS["OPENAI"], base_url=server.base_url,
                             max_retries=0)
            with cmbagent_otel.workflow("paper review"):
                answers = [llm.invoke(IDEA).content for _ in range(2)]
            sent = len(server.requests)
    finally:
        set_llm_cache(before)
    assert answers == ["An idea."] * 2 and sent == 1
    asked, cached = _chats(traced)
    assert (asked.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS], asked.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS]) == \
        IDEA_USAGE and asked.attributes[sc.LLM_COST_USD] > 0 and sc.LLM_CACHE_HIT not in asked.attributes
    assert cached.attributes[sc.LLM_CACHE_HIT] is True
    assert not {sc.GEN_AI_USAGE_INPUT_TOKENS, sc.GEN_AI_USAGE_OUTPUT_TOKENS, sc.LLM_COST_USD} & set(cached.attributes)
    assert _said(cached) == ["An idea."]
