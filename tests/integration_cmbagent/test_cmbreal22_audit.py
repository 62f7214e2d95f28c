"""What a user of the real cmbagent package sees, twenty-second audit (session 47): a LangChain stream's tool
calls, AG2's own cache.

Real LangChain chat models answered by a loopback server inside a ``cmbagent_otel.workflow`` block with the real
cmbagent installed (the integration hooks LangChain only then); spans read back from memory.
"""

from __future__ import annotations

import asyncio
import functools
import json
import operator
import os
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

import cmbagent_otel
from cmbagent_otel import semconv as sc
from cmbagent_otel.testing import FakeOpenAIServer

from . import test_cmbreal21_audit as audit21
from .scripted_cmbagent import API_KEYS
from .test_cmbagent_runs import SpanCapture
from .test_cmbreal19_audit import RESPONSE_MODEL, api_keys_absent

pytestmark = pytest.mark.cmbagent_autogen

IDEA = "Write an idea for a paper on the CMB"


traced = audit21.traced  # the fixture: spans in memory, content capture on


# --- a stream's tool calls ------------------------------------------------------------------------------------
# OpenAI's streamed tool calls: each delta a piece of one call (by index), its id and name in the first piece
STREAMED_CALLS = [("call_1", "search", ['{"que', 'ry": "CMB', ' age"}']),
                  ("call_2", "plot", ['{"x": [1, ', '2], "title": "T"}'])]
# what the application's LangChain says the calls are (its summed chunks' ``tool_calls``)
JOINED = [{"type": "tool_call", "name": "search", "id": "call_1", "arguments": {"query": "CMB age"}},
          {"type": "tool_call", "name": "plot", "id": "call_2", "arguments": {"x": [1, 2], "title": "T"}}]


def _streamed_tool_calls(fails: bool = False) -> Any:
    """A ``ChatOpenAI`` stream answering with text then the two calls of ``STREAMED_CALLS`` in pieces
    (interleaved, as parallel calls come), then the usage chunk; ``fails``: an error event after the pieces."""
    def answer(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        head = {"id": "chatcmpl-lc", "created": 0, "model": RESPONSE_MODEL, "object": "chat.completion.chunk"}

        def delta(d: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
            return {**head, "choices": [{"index": 0, "delta": d, "finish_reason": reason}]}

        chunks = [delta({"role": "assistant", "content": "Looking."})]
        for piece in range(3):
            for index, (call_id, name, args) in enumerate(STREAMED_CALLS):
                if piece < len(args):
                    call: dict[str, Any] = {"index": index, "function": {"arguments": args[piece]}}
                    if piece == 0:
                        call.update(id=call_id, type="function", function={"name": name, "arguments": args[0]})
                    chunks.append(delta({"tool_calls": [call]}))
        if fails:
            chunks.append({"error": {"message": "overloaded", "type": "server_error"}})
        chunks.append(delta({}, "tool_calls"))
        chunks.append({**head, "choices": [], "usage": {"prompt_tokens": 21, "completion_tokens": 9,
                                                        "total_tokens": 30}})
        sse = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        return 200, {"Content-Type": "text/event-stream"}, sse

    return answer


def _model(server: FakeOpenAIServer) -> Any:
    pytest.importorskip("langchain_openai", reason="langchain_openai is not installed")
    from langchain_openai import ChatOpenAI

    def search(query: str) -> str:
        """Search the literature."""
        return "13.8 Gyr"

    def plot(x: list[int], title: str) -> str:
        """Plot x."""
        return "plot.png"

    return ChatOpenAI(model="gpt-4o-mini", api_key=API_KEYS["OPENAI"], base_url=server.base_url, max_retries=0,
                      stream_usage=True).bind_tools([search, plot])


def _read(llm: Any, how: str) -> list[Any]:
    """The chunks the application reads of ``llm``'s stream of ``IDEA``: all (``stream`` / ``astream``), or the
    first three then stops (``left``: the stream closed by the application)."""
    if how == "astream":
        async def read() -> list[Any]:
            return [chunk async for chunk in llm.astream(IDEA)]

        return asyncio.run(read())
    chunks = []
    stream = llm.stream(IDEA)
    for chunk in stream:
        chunks.append(chunk)
        if how == "left" and len(chunks) == 3:
            stream.close()
            break
    return chunks


def _output(span: Any) -> dict[str, Any]:
    (said,) = json.loads(span.attributes[sc.GEN_AI_OUTPUT_MESSAGES])
    return said


@pytest.mark.parametrize("how", ["stream", "astream"])
def test_a_streams_tool_calls_are_in_its_captured_content(traced: SpanCapture, how: str) -> None:
    """Audit 21's Left. With capture on, a LangChain stream answering with tool calls (a LangGraph agent's
    ``stream`` / ``astream`` of a model with tools bound) had an output message of its text only: the calls, each
    streamed as pieces of its arguments, were lost. The pieces are now joined as LangChain's own chunk addition
    joins them (``tool_call_chunks`` by index, the arguments parsed as ``AIMessageChunk`` parses them): the output
    message holds the text and both calls (finish reason ``tool_call``), the calls the application's summed
    chunks say, with the stream's usage."""
    with FakeOpenAIServer(raw_responder=_streamed_tool_calls()) as server:
        llm = _model(server)
        with cmbagent_otel.workflow("paper review"):
            chunks = _read(llm, how)
    summed = functools.reduce(operator.add, chunks)
    assert [(c["name"], c["args"]) for c in summed.tool_calls] == [
        ("search", {"query": "CMB age"}), ("plot", {"x": [1, 2], "title": "T"})]
    (chat,) = audit21._chats(traced)
    said = _output(chat)
    assert said["finish_reason"] == "tool_call"
    assert said["parts"] == [{"type": "text", "content": "Looking."}, *JOINED]
    assert (chat.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS], chat.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS]) == (21, 9)
    assert chat.status.status_code is not StatusCode.ERROR and api_keys_absent(chat)


def test_a_stream_closed_half_way_keeps_the_pieces_read(traced: SpanCapture) -> None:
    """The application stops reading after three chunks (the text, the first pieces of both calls) and closes the
    stream: its chunks are LangChain's, the call's span is ended unfailed and holds the calls as far as they came
    (the partial arguments parsed as LangChain parses a partial chunk's)."""
    with FakeOpenAIServer(raw_responder=_streamed_tool_calls()) as server:
        llm = _model(server)
        with cmbagent_otel.workflow("paper review"):
            chunks = _read(llm, "left")
    summed = functools.reduce(operator.add, chunks)
    (chat,) = audit21._chats(traced)
    assert chat.status.status_code is not StatusCode.ERROR
    said = _output(chat)
    assert [(p["name"], p["id"]) for p in said["parts"] if p["type"] == "tool_call"] == [
        (c["name"], c["id"]) for c in [*summed.tool_calls, *summed.invalid_tool_calls]] == [
        ("search", "call_1"), ("plot", "call_2")]


def test_a_stream_failing_mid_way_fails_its_span_and_raises_the_apps_error(traced: SpanCapture) -> None:
    """The server's error event after the calls' pieces: the application gets ``openai``'s error unchanged out of
    its loop, the span is failed with it, no output captured (a failed call's answer is not recorded)."""
    import openai

    with FakeOpenAIServer(raw_responder=_streamed_tool_calls(fails=True)) as server:
        llm = _model(server)
        read: list[Any] = []
        with cmbagent_otel.workflow("paper review"), pytest.raises(openai.APIError) as raised:
            for chunk in llm.stream(IDEA):
                read.append(chunk)
    assert len(read) == 6  # the text and the five pieces came before the error
    (chat,) = audit21._chats(traced)
    assert chat.status.status_code is StatusCode.ERROR
    assert chat.attributes[sc.ERROR_TYPE] == type(raised.value).__name__
    assert sc.GEN_AI_OUTPUT_MESSAGES not in chat.attributes


def test_a_streams_tool_call_pieces_are_joined_within_a_bound(traced: SpanCapture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream whose calls' arguments run past the bound of what is joined (``STREAMED_ARGUMENTS_MAX``
    characters) is joined up to it: the application's chunks are whole, the span still has its calls."""
    from cmbagent_otel.integrations import _langchain

    monkeypatch.setattr(_langchain, "STREAMED_ARGUMENTS_MAX", 12)
    with FakeOpenAIServer(raw_responder=_streamed_tool_calls()) as server:
        llm = _model(server)
        with cmbagent_otel.workflow("paper review"):
            chunks = _read(llm, "stream")
    assert len(functools.reduce(operator.add, chunks).tool_calls) == 2
    (chat,) = audit21._chats(traced)
    calls = [p for p in _output(chat)["parts"] if p["type"] == "tool_call"]
    assert [c["name"] for c in calls] == ["search", "plot"]
    assert calls != JOINED  # (the arguments past the bound were not joined)


# --- LangChain's cache before langchain-core 0.3.73 -------------------------------------------------------------
def _old_core_model(server: FakeOpenAIServer, **fields: Any) -> Any:
    """A ``ChatOpenAI`` whose cache's answers are what langchain-core before 0.3.73 returned: the cached
    generations as they are (``ChatResult(generations=cache_val)``), its cached call's usage with no
    ``total_cost`` mark (0.3.73 added ``_convert_cached_generations``, which zeroes the cost and marks it)."""
    pytest.importorskip("langchain_openai", reason="langchain_openai is not installed")
    from langchain_openai import ChatOpenAI

    class OldCoreChatOpenAI(ChatOpenAI):
        def _convert_cached_generations(self, cache_val: list[Any]) -> list[Any]:
            return cache_val

    return OldCoreChatOpenAI(model="gpt-4o-mini", api_key=API_KEYS["OPENAI"], base_url=server.base_url,
                             max_retries=0, **fields)


# each way of asking twice: the model's calls -> whether the second is answered by the cache
TWICE: dict[str, tuple[Any, bool]] = {
    "invoke": (lambda llm: [llm.invoke(IDEA) for _ in range(2)], True),
    "ainvoke": (lambda llm: asyncio.run(_twice_async(llm)), True),
    "generate": (lambda llm: [llm.generate([[_human(IDEA)]]) for _ in range(2)], True),
    "no_cache": (lambda llm: [llm.invoke(IDEA) for _ in range(2)], False),  # held: cache=False, both asked
}


async def _twice_async(llm: Any) -> list[Any]:
    return [await llm.ainvoke(IDEA) for _ in range(2)]


def _human(text: str) -> Any:
    from langchain_core.messages import HumanMessage

    return HumanMessage(text)


@pytest.mark.parametrize("how", list(TWICE))
def test_an_answer_of_an_older_langchain_cores_cache_is_a_cache_hit(traced: SpanCapture, how: str) -> None:
    """Audit 21's Left. A langchain-core before 0.3.73 (MARS takes any with LangGraph 1.x: 0.3.67 and up) does
    not mark an answer of its cache: its span carried the cached call's tokens and was priced again. Whether the
    model was asked is now read from LangChain itself: ``_generate_with_cache`` calls ``_should_stream`` just
    before asking the model, never for its cache's answer. A call that returns without asking is a cache hit, no
    usage, no cost; a call asked (the first, or a model with ``cache=False``) keeps its usage."""
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import get_llm_cache, set_llm_cache

    from .test_cmbreal19_audit import IDEA_USAGE, _langchain_answers

    call, cached = TWICE[how]
    before = get_llm_cache()
    set_llm_cache(InMemoryCache())
    try:
        with FakeOpenAIServer(raw_responder=_langchain_answers) as server:
            llm = _old_core_model(server, **({"cache": False} if how == "no_cache" else {}))
            with cmbagent_otel.workflow("paper review"):
                call(llm)
            sent = len(server.requests)
    finally:
        set_llm_cache(before)
    assert sent == (1 if cached else 2)
    first, second = audit21._chats(traced)
    for span in (first, second) if not cached else (first,):
        assert (span.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS], span.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS]) == \
            IDEA_USAGE and span.attributes[sc.LLM_COST_USD] > 0 and sc.LLM_CACHE_HIT not in span.attributes
    if cached:
        assert second.attributes[sc.LLM_CACHE_HIT] is True
        assert not {sc.GEN_AI_USAGE_INPUT_TOKENS, sc.LLM_COST_USD} & set(second.attributes)
        assert audit21._said(second) == ["An idea."]
