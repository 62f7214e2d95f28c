"""What a LangChain chat model's call says about itself: the GenAI attributes of its ``chat`` span.

MARS's LangGraph phases (``deepresearch_paper``, ``newspulse_report`` and the ``task_framework`` graphs) call their
models through LangChain chat models (``ChatOpenAI``, ``AzureChatOpenAI``, ``ChatGoogleGenerativeAI``,
``ChatAnthropic``: ``state['llm']['llm'].invoke(prompt)`` / ``.stream(prompt)``), not through AG2's
``OpenAIWrapper``. The cmbagent integration wraps ``BaseChatModel.invoke``, ``.ainvoke``, ``.stream``,
``.astream`` and the model call of the ``generate`` family (:data:`CHAT_MODEL_METHODS`; every chat model
inherits them) and records each call inside a run as a ``chat <model>`` span; this module reads the call: the
request model and provider from the model's own LangSmith parameters (``_get_ls_params``, what LangChain's
tracers read), the agent from the LangGraph node running it, the usage and response model from the answer
(``usage_metadata``, ``response_metadata``). Nothing here raises.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import types
from collections.abc import Mapping
from typing import Any

from .. import semconv

logger = logging.getLogger("cmbagent_otel")

#: Where LangChain's chat model base class lives
CHAT_MODELS_MODULE = "langchain_core.language_models.chat_models"
CHAT_MODEL_CLASS = "BaseChatModel"
#: The methods of it that are model calls -> the name of their input argument. ``invoke`` / ``ainvoke`` call
#: ``generate_prompt`` -> ``generate`` -> ``_generate_with_cache`` (async: the ``a`` ones) once; the entry points
#: that bypass ``invoke`` (``generate``, ``generate_prompt``, ``__call__``, ``predict``, ``predict_messages``,
#: ``call_as_llm`` and their async ones) reach the model only through ``_generate_with_cache`` /
#: ``_agenerate_with_cache``, once per prompt (``generate`` of several prompts is several model calls), in
#: langchain-core 0.1 to 1.x. ``batch`` / ``abatch`` call ``invoke`` / ``ainvoke`` per input.
CHAT_MODEL_METHODS: Mapping[str, str] = {
    "invoke": "input", "ainvoke": "input", "stream": "input", "astream": "input",
    "_generate_with_cache": "messages", "_agenerate_with_cache": "messages"}

#: The method of it LangChain's ``_generate_with_cache`` / ``_agenerate_with_cache`` call just before asking the
#: model, once its cache had no answer (langchain-core 0.3.67 to 1.x): a call that returns without calling it was
#: answered by the cache (see :func:`watch_asking`)
ASKING_METHOD = "_should_stream"
#: ... and the methods that call it so, all LangChain's own for that to say anything
ASKING_PATH = (ASKING_METHOD, "_generate_with_cache", "_agenerate_with_cache")

#: LangChain's ``ls_provider`` -> the GenAI ``gen_ai.provider.name`` (the rest are passed as they are)
_PROVIDERS: Mapping[str, str] = {
    "openai": "openai",
    "azure": "azure.ai.openai",
    "anthropic": "anthropic",
    "google_genai": "gcp.gemini",
    "google_vertexai": "gcp.vertex_ai",
    "google_anthropic_vertex": "gcp.vertex_ai",
    "amazon_bedrock": "aws.bedrock",
    "bedrock": "aws.bedrock",
    "mistral": "mistral_ai",
    "mistralai": "mistral_ai",
    "groq": "groq",
    "deepseek": "deepseek",
    "xai": "x_ai",
    "cohere": "cohere",
    "perplexity": "perplexity",
}

# set while a chat model's call runs in this context: ``stream`` of a model without streaming calls ``invoke``,
# which is the same model call (one span, not two)
_IN_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("cmbagent_otel_langchain_call", default=False)


def in_call() -> bool:
    """Whether a chat model's call (already recorded) runs in this context."""
    return _IN_CALL.get()


def enter_call() -> contextvars.Token[bool]:
    """Mark a chat model's call running in this context; hand the token to :func:`leave_call`."""
    return _IN_CALL.set(True)


def leave_call(token: contextvars.Token[bool]) -> None:
    """Undo :func:`enter_call`."""
    try:
        _IN_CALL.reset(token)
    except Exception:  # (a generator resumed from another context: nothing of ours there to undo)
        logger.debug("cmbagent_otel: could not reset a chat model call's mark", exc_info=True)


# while a chat model's call (not a stream) runs in this context: whether LangChain asked the model
_ASKED: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("cmbagent_otel_langchain_asked",
                                                                           default=None)


def watch_asking() -> tuple[contextvars.Token[list[bool] | None], list[bool]]:
    """Watch whether LangChain asks the model in the call about to run in this context: (the token for
    :func:`leave_asking`, the cell :func:`model_asked` sets)."""
    asked = [False]
    return _ASKED.set(asked), asked


def leave_asking(token: contextvars.Token[list[bool] | None]) -> None:
    """Undo :func:`watch_asking`."""
    try:
        _ASKED.reset(token)
    except Exception:
        logger.debug("cmbagent_otel: could not reset a chat model call's watch", exc_info=True)


def model_asked() -> None:
    """LangChain is about to ask the model (its cache had no answer): noted for the call watched here."""
    asked = _ASKED.get()
    if asked is not None:
        asked[0] = True


def request_attributes(model: Any) -> tuple[str, dict[str, Any]]:
    """The request model's name and the ``chat`` span's attributes of a call of chat model ``model`` (operation,
    request model, provider, agent)."""
    params: Mapping[str, Any] = {}
    try:
        found = model._get_ls_params()
        if isinstance(found, Mapping):
            params = found
    except Exception:
        logger.debug("cmbagent_otel: could not read a chat model's parameters", exc_info=True)
    name = _text(params.get("ls_model_name")) or _text(getattr(model, "model_name", None)) or \
        _text(getattr(model, "model", None)) or "unknown"
    attrs: dict[str, Any] = {semconv.GEN_AI_OPERATION_NAME: semconv.OP_CHAT, semconv.GEN_AI_REQUEST_MODEL: name,
                             semconv.GEN_AI_AGENT_NAME: _node_name() or type(model).__name__}
    provider = _text(params.get("ls_provider"))
    if provider:
        attrs[semconv.GEN_AI_PROVIDER_NAME] = _PROVIDERS.get(provider, provider)
    return name, attrs


def _node_name() -> str | None:
    """The LangGraph node running now (the metadata LangGraph gives the config of each node's run), if any."""
    config_module = sys.modules.get("langchain_core.runnables.config")
    try:
        config = config_module.var_child_runnable_config.get() if config_module is not None else None
        metadata = config.get("metadata") if isinstance(config, Mapping) else None
        return _text(metadata.get("langgraph_node")) if isinstance(metadata, Mapping) else None
    except Exception:
        logger.debug("cmbagent_otel: could not read the LangGraph node", exc_info=True)
        return None


#: LangChain's message types -> the roles of the GenAI messages
_ROLES: Mapping[str, str] = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


def prompt_messages(model: Any, value: Any) -> list[dict[str, Any]] | None:
    """The messages chat model ``model`` sends for the input ``value`` of a call (a text, messages, a prompt
    value: LangChain's own conversion), as role / content messages; ``None`` when it cannot say."""
    try:
        messages = model._convert_input(value).to_messages()
        out: list[dict[str, Any]] = []
        for m in messages:
            said: dict[str, Any] = {"role": _ROLES.get(str(m.type), str(m.type)), "content": m.content}
            calls = _tool_calls(m)
            if calls:  # (LangChain's "" where OpenAI's message of only tool calls has no content)
                said.update(content=m.content or None, tool_calls=calls)
            call_id = getattr(m, "tool_call_id", None)  # a tool's answer: the call it answers
            if isinstance(call_id, str):
                said["tool_call_id"] = call_id
            out.append(said)
        return out
    except Exception:
        logger.debug("cmbagent_otel: could not read a chat model call's prompt", exc_info=True)
        return None


def _tool_calls(message: Any) -> list[dict[str, Any]]:
    """The tool calls of a LangChain message (``AIMessage.tool_calls``: name, args, id) as the messages of AG2's
    calls carry them (name, arguments, id); none for a stream's chunk (``tool_call_chunks``: each has a piece of a
    call's arguments only)."""
    calls = getattr(message, "tool_calls", None)
    if not isinstance(calls, list) or hasattr(message, "tool_call_chunks"):
        return []
    return [{"id": c.get("id"), "name": c.get("name"), "arguments": c.get("args")} for c in calls
            if isinstance(c, Mapping)]


def _content_text(content: Any) -> str | None:
    """The text of a message's ``content``: a text, or a list of content blocks (Anthropic's ``text`` /
    ``thinking`` / ``tool_use`` blocks, Gemini's texts and ``thinking`` / code blocks) whose texts are joined, as
    LangChain's ``BaseMessage.text`` joins them (reasoning and tool calls are not the answer's text); ``None``
    when it has none."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = [block if isinstance(block, str) else block.get("text") for block in content
             if isinstance(block, str) or (isinstance(block, Mapping) and block.get("type") == "text")]
    return "".join(t for t in texts if isinstance(t, str)) if texts else None


#: A stream's tool calls are joined from at most this many calls' pieces and this many characters of their
#: arguments (a bound of memory: the captured message is bounded again when rendered)
STREAMED_CALLS_MAX = 128
STREAMED_ARGUMENTS_MAX = 1 << 20
#: LangChain's addition of message chunks' lists (``AIMessageChunk.__add__`` joins ``tool_call_chunks`` with it)
_MERGE_MODULE = "langchain_core.utils._merge"


class Answer:
    """What the answer of one call says: its usage (summed over a stream's chunks) and the model that answered."""

    __slots__ = ("_chunk_type", "_pieces", "_pieces_chars", "_texts", "cached", "input_tokens", "output_tokens",
                 "response_model", "tool_calls")

    def __init__(self) -> None:
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.response_model: str | None = None
        self._texts: list[str] = []  # its text content (a stream's pieces), the span's output with capture on
        self.tool_calls: list[dict[str, Any]] = []  # the tools it calls (an answer's, not a stream's)
        self._pieces: list[Any] = []  # a stream's ``tool_call_chunks`` joined by index, as LangChain joins them
        self._pieces_chars = 0
        self._chunk_type: Any = None  # the class of the stream's chunks (it parses the joined pieces' arguments)
        self.cached = False  # LangChain's cache answered (``set_llm_cache``): no model call, no tokens used

    @property
    def text(self) -> str | None:
        """Its text content (a stream's joined), ``None`` when it had none."""
        return "".join(self._texts) if self._texts else None

    def read(self, message: Any) -> None:
        """Add what ``message`` (an ``AIMessage``, one chunk of a stream, or the ``ChatResult`` of
        ``_generate_with_cache``: its first generation's message) says."""
        try:
            generations = getattr(message, "generations", None)
            if isinstance(generations, list) and generations:
                message = getattr(generations[0], "message", None)
            text = _content_text(getattr(message, "content", None))
            if text is not None:
                self._texts.append(text)
            self.tool_calls.extend(_tool_calls(message))
            self._join_pieces(message)
            usage = getattr(message, "usage_metadata", None)
            if isinstance(usage, Mapping):
                # LangChain's mark on an answer of its cache (``_convert_cached_generations``): the usage is the
                # cached call's; no model usage carries a ``total_cost``
                if usage.get("total_cost") == 0:
                    self.cached = True
                prompt, output = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
                if prompt is not None and output is not None:
                    self.input_tokens = (self.input_tokens or 0) + prompt
                    self.output_tokens = (self.output_tokens or 0) + output
            metadata = getattr(message, "response_metadata", None)
            if isinstance(metadata, Mapping):
                model = _text(metadata.get("model_name")) or _text(metadata.get("model"))
                if model:
                    self.response_model = model
        except Exception:
            logger.debug("cmbagent_otel: could not read a chat model's answer", exc_info=True)

    def _join_pieces(self, chunk: Any) -> None:
        """Join a stream's chunk's pieces of tool calls (``tool_call_chunks``: a piece of one call's arguments,
        its name and id in the first) to the earlier chunks' with LangChain's own list addition, bounded."""
        pieces = getattr(chunk, "tool_call_chunks", None)
        merge = getattr(sys.modules.get(_MERGE_MODULE), "merge_lists", None)
        if not isinstance(pieces, list) or not pieces or merge is None or \
                len(self._pieces) >= STREAMED_CALLS_MAX or self._pieces_chars >= STREAMED_ARGUMENTS_MAX:
            return
        self._pieces_chars += sum(len(p.get("args") or "") for p in pieces if isinstance(p, Mapping))
        self._pieces = merge(self._pieces, [dict(p) for p in pieces if isinstance(p, Mapping)]) or []
        self._chunk_type = type(chunk)

    def _streamed_calls(self) -> list[dict[str, Any]]:
        """The tool calls a stream's joined pieces make, their arguments parsed as LangChain parses a joined
        chunk's (``AIMessageChunk``'s ``tool_calls``; arguments that do not parse are kept as their text)."""
        if not self._pieces or self._chunk_type is None:
            return []
        try:
            joined = self._chunk_type(content="", tool_call_chunks=self._pieces)
            calls = [{"id": c.get("id"), "name": c.get("name"), "arguments": c.get("args")}
                     for c in [*joined.tool_calls, *joined.invalid_tool_calls] if isinstance(c, Mapping)]
            return sorted(calls, key=lambda c: self._order(c.get("id")))
        except Exception:
            logger.debug("cmbagent_otel: could not join a stream's tool calls", exc_info=True)
            return []

    def _order(self, call_id: Any) -> int:
        return next((i for i, p in enumerate(self._pieces) if p.get("id") == call_id), len(self._pieces))

    def output(self) -> str | dict[str, Any] | None:
        """What the model answered, as the span's output message is made from: its text, or with the tools it
        calls an assistant message of both."""
        calls = self.tool_calls + self._streamed_calls()
        if not calls:
            return self.text
        return {"role": "assistant", "content": self.text or None, "tool_calls": calls}

    def attributes(self) -> dict[str, Any]:
        """The span's usage and response model attributes (an answer of LangChain's cache: no usage, the cache
        hit marked)."""
        attrs: dict[str, Any] = {}
        if self.cached:
            attrs[semconv.LLM_CACHE_HIT] = True
        elif self.input_tokens is not None and self.output_tokens is not None:
            attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] = self.input_tokens
            attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] = self.output_tokens
        if self.response_model:
            attrs[semconv.GEN_AI_RESPONSE_MODEL] = self.response_model
        return attrs


#: GenAI provider -> the module of the application's AG2 and its price table (model -> USD per 1K tokens in / out)
#: AG2's own client of that provider prices its calls with
_PRICE_TABLES: Mapping[str, tuple[str, str]] = {
    "openai": ("autogen.oai.client", "OAI_PRICE1K"),
    "azure.ai.openai": ("autogen.oai.client", "OAI_PRICE1K"),
    "anthropic": ("autogen.oai.anthropic", "ANTHROPIC_PRICING_1k"),
}
#: Gemini's providers: AG2's Gemini client prices its calls with ``calculate_gemini_cost(use_vertexai, ...)``
_GEMINI_PRICED: Mapping[str, bool] = {"gcp.gemini": False, "gcp.vertex_ai": True}
_GEMINI_PRICES = ("autogen.oai.gemini", "calculate_gemini_cost")


def cost_of(attrs: Mapping[str, Any]) -> float | None:
    """What a call with the span attributes ``attrs`` cost in USD, priced as AG2 prices the same answer of the
    same provider (read from the ``autogen`` the application imported: the cost rows of the run's AG2 calls come
    from it): OpenAI's and Azure's models by ``OAI_PRICE1K``, Anthropic's by ``ANTHROPIC_PRICING_1k``, Gemini's
    (Google AI or Vertex AI) by ``calculate_gemini_cost``. ``None`` when AG2 has no price for it (another
    provider, a model not in the table, a price of 0) or it reported no usage."""
    try:
        provider = attrs.get(semconv.GEN_AI_PROVIDER_NAME)
        prompt, output = attrs.get(semconv.GEN_AI_USAGE_INPUT_TOKENS), attrs.get(semconv.GEN_AI_USAGE_OUTPUT_TOKENS)
        if not isinstance(provider, str) or prompt is None or output is None:
            return None
        models = [m for m in (attrs.get(semconv.GEN_AI_RESPONSE_MODEL), attrs.get(semconv.GEN_AI_REQUEST_MODEL))
                  if isinstance(m, str)]
        if provider in _GEMINI_PRICED:
            return _gemini_cost(_GEMINI_PRICED[provider], prompt, output, models)
        module, name = _PRICE_TABLES.get(provider, ("", ""))
        table = getattr(sys.modules.get(module), name, None) if module else None
        if not isinstance(table, Mapping):
            return None
        for model in models:
            price = table.get(model)
            if isinstance(price, (tuple, list)) and len(price) == 2:
                return float((price[0] * prompt + price[1] * output) / 1000) or None
            if isinstance(price, (int, float)) and not isinstance(price, bool):
                return float(price * (prompt + output) / 1000) or None
    except Exception:
        logger.debug("cmbagent_otel: could not price a chat model's call", exc_info=True)
    return None


class _Unsaid:
    """Stands for the ``warnings`` module in AG2's Gemini pricing: AG2 warns about a model it has no price
    for, and that warning is not ours to give the application. ``warnings.catch_warnings()`` would silence
    every thread's warnings meanwhile, and change the process's filters under them (not thread-safe)."""

    @staticmethod
    def warn(*args: object, **kwargs: object) -> None:
        return None


_quiet_prices: dict[Any, Any] = {}  # AG2's pricing function -> its copy that warns nothing


def _quiet(price: Any) -> Any:
    quiet = _quiet_prices.get(price)
    if quiet is None:
        quiet = _quiet_prices[price] = types.FunctionType(
            price.__code__, {**price.__globals__, "warnings": _Unsaid}, price.__name__, price.__defaults__,
            price.__closure__)
    return quiet


def _gemini_cost(vertex: bool, prompt: int, output: int, models: list[str]) -> float | None:
    module, name = _GEMINI_PRICES
    price = getattr(sys.modules.get(module), name, None)
    if not isinstance(price, types.FunctionType):
        return None
    price = _quiet(price)
    for model in models:
        cost = price(vertex, prompt, output, model)
        if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost > 0:
            return float(cost)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
