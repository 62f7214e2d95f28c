"""What a model call is, from AG2's configuration and response: provider, server, request and usage attributes.

Everything derived from a config entry (provider name, server address and port) is computed
once per config object and kept in a small bounded cache; per call only the request
parameters and the response are read.
"""

from __future__ import annotations

import sys
import threading
from abc import get_cache_token
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .. import semconv
from .._forksafe import reset_in_child
from ..redaction import redact_name
from ._content import register_client_credentials

# AG2 api_type -> gen_ai.provider.name (the GenAI conventions' well-known values where one
# applies, else the stable lower-case name of the provider AG2 talks to). Any other api_type,
# and any custom ModelClient, is CUSTOM_PROVIDER: never a class name, so the attribute keeps a
# small, fixed set of values.
PROVIDERS: Mapping[str, str] = {
    "openai": "openai", "responses": "openai", "azure": "azure.ai.openai", "anthropic": "anthropic",
    "google": "gcp.gemini", "gemini": "gcp.gemini", "vertexai": "gcp.vertex_ai", "bedrock": "aws.bedrock",
    "mistral": "mistral_ai", "groq": "groq", "cohere": "cohere", "deepseek": "deepseek", "ollama": "ollama",
    "together": "together", "cerebras": "cerebras", "xai": "x_ai", "grok": "x_ai", "perplexity": "perplexity",
    "moonshot": "moonshot_ai", "watsonx": "ibm.watsonx.ai",
}
CUSTOM_PROVIDER = "ag2.custom_client"
# the config key naming a custom ModelClient class: ag2's, and cmbagent_autogen's (its schema forbids ag2's)
CUSTOM_CLIENT_KEYS: tuple[str, ...] = ("model_client_cls", "mod_client_cls")
# default endpoints when a config names none (AG2 uses each provider's public API then)
DEFAULT_SERVERS: Mapping[str, tuple[str, int]] = {
    "openai": ("api.openai.com", 443), "anthropic": ("api.anthropic.com", 443),
    "mistral_ai": ("api.mistral.ai", 443), "groq": ("api.groq.com", 443), "deepseek": ("api.deepseek.com", 443),
    "cohere": ("api.cohere.com", 443), "gcp.gemini": ("generativelanguage.googleapis.com", 443),
}

# request parameter -> attribute (numbers; stop sequences handled apart)
REQUEST_PARAMETERS: tuple[tuple[str, str], ...] = (
    ("temperature", semconv.GEN_AI_REQUEST_TEMPERATURE),
    ("max_tokens", semconv.GEN_AI_REQUEST_MAX_TOKENS),
    ("max_completion_tokens", semconv.GEN_AI_REQUEST_MAX_TOKENS),
    ("top_p", semconv.GEN_AI_REQUEST_TOP_P),
    ("top_k", semconv.GEN_AI_REQUEST_TOP_K),
    ("frequency_penalty", semconv.GEN_AI_REQUEST_FREQUENCY_PENALTY),
    ("presence_penalty", semconv.GEN_AI_REQUEST_PRESENCE_PENALTY),
    ("seed", semconv.GEN_AI_REQUEST_SEED),
    ("n", semconv.GEN_AI_REQUEST_CHOICE_COUNT),
)
_INT_ATTRIBUTES = frozenset({semconv.GEN_AI_REQUEST_MAX_TOKENS, semconv.GEN_AI_REQUEST_SEED,
                             semconv.GEN_AI_REQUEST_CHOICE_COUNT})


def is_custom_client(config: Mapping[str, Any]) -> bool:
    """Whether the config entry selects a custom ``ModelClient`` class (on any AG2 line)."""
    return any(config.get(key) for key in CUSTOM_CLIENT_KEYS)


def provider_name(config: Mapping[str, Any]) -> str:
    """``gen_ai.provider.name`` of an AG2 config entry (bounded: see :data:`PROVIDERS`)."""
    if is_custom_client(config):
        return CUSTOM_PROVIDER  # AG2 fills api_type "openai" in even then: it says nothing here
    api_type = config.get("api_type")
    if isinstance(api_type, str) and api_type:
        return PROVIDERS.get(api_type.strip().lower(), CUSTOM_PROVIDER)
    return "openai"  # AG2's default client


def client_base_url(wrapper: Any) -> str | None:
    """The base URL of an ``OpenAIWrapper``'s first client (AG2 keeps ``base_url`` there, not in
    ``_config_list``)."""
    clients = getattr(wrapper, "_clients", None)
    if not clients:
        return None
    inner = getattr(clients[0], "_oai_client", None)
    url = getattr(inner, "base_url", None)
    return str(url) if url is not None else None


def server_of(config: Mapping[str, Any], provider: str, base_url: Any = None) -> tuple[str, int] | None:
    """(``server.address``, ``server.port``) the config's client talks to, if known."""
    base_url = config.get("base_url") or base_url
    if isinstance(base_url, str) and base_url:
        try:
            parts = urlsplit(base_url if "://" in base_url else f"https://{base_url}")
            host = parts.hostname
            if host:
                port = parts.port or (80 if parts.scheme == "http" else 443)
                return host, port
        except ValueError:
            return None
        return None
    if is_custom_client(config):
        return None  # a custom client: no endpoint we could know
    return DEFAULT_SERVERS.get(provider)


class ConfigInfo:
    """The static facts of one config entry (its request parameters included: AG2 merges them
    into every call made with it)."""

    __slots__ = ("attributes", "call_attributes", "config", "model", "provider", "request", "server")

    def __init__(self, config: Mapping[str, Any], base_url: str | None = None) -> None:
        self.config = config  # held so its id is not reused while cached
        self.provider = provider_name(config)
        model = config.get("model")
        self.model = redact_name(str(model)) if model else None
        attrs: dict[str, Any] = {semconv.GEN_AI_PROVIDER_NAME: self.provider}
        self.server = server_of(config, self.provider, base_url)
        if self.server is not None:
            attrs[semconv.SERVER_ADDRESS], attrs[semconv.SERVER_PORT] = self.server
        self.attributes = attrs  # invoke_agent and chat
        # model calls also carry the deprecated gen_ai.system, still read by some backends
        self.call_attributes = {**attrs, semconv.GEN_AI_SYSTEM: self.provider}
        self.request = request_attributes(_EMPTY, config)  # a call passing none of its own


_INFO_MAX = 256
_infos: OrderedDict[int, ConfigInfo] = OrderedDict()
_infos_lock = threading.Lock()
reset_in_child(sys.modules[__name__], "_infos_lock")  # a forked child must not find it held
_EMPTY: Mapping[str, Any] = {}


def config_info(config: Mapping[str, Any] | None, wrapper: Any = None) -> ConfigInfo:
    """:class:`ConfigInfo` of ``config`` (an entry of ``wrapper``'s config list), computed once per
    config object (bounded cache)."""
    if type(config) is not dict and not isinstance(config, Mapping):
        config = _EMPTY
    key = id(config)
    info = _infos.get(key)
    if info is not None and info.config is config:
        return info
    if wrapper is not None:  # a new config entry: its wrapper's clients were built with it
        register_client_credentials(wrapper)
    info = ConfigInfo(config, client_base_url(wrapper) if wrapper is not None and config is not _EMPTY else None)
    with _infos_lock:
        _infos[key] = info
        while len(_infos) > _INFO_MAX:
            _infos.popitem(last=False)
    return info


def first_config(wrapper: Any) -> Mapping[str, Any] | None:
    """The first config entry of an ``OpenAIWrapper`` (the one AG2 tries first)."""
    configs = getattr(wrapper, "_config_list", None)
    if configs:
        first = configs[0]
        if type(first) is dict or isinstance(first, Mapping):  # a dict first: no ABC check on the hot path
            return first  # type: ignore[no-any-return]
    return None


REQUEST_KEYS = frozenset({key for key, _ in REQUEST_PARAMETERS} | {"stop", "stream"})
"""The call arguments that are request parameters (a call passing none has its config's)."""


def request_attributes(kwargs: Mapping[str, Any], config: Mapping[str, Any],
                       info: ConfigInfo | None = None) -> dict[str, Any]:
    """Request parameters of a model call: the call's own, else its config entry's. With ``info``
    (the entry's :class:`ConfigInfo`) and a call passing none of its own, the entry's, computed
    once (the returned dict is shared: read it, never change it)."""
    if info is not None and info.config is config and kwargs.keys().isdisjoint(REQUEST_KEYS):
        return info.request
    attrs: dict[str, Any] = {}
    for key, attr in REQUEST_PARAMETERS:
        value = kwargs.get(key)
        if value is None:
            value = config.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or attr in attrs:
            continue
        if attr in _INT_ATTRIBUTES:
            if isinstance(value, int):
                attrs[attr] = value
        else:
            attrs[attr] = float(value)
    if attrs.get(semconv.GEN_AI_REQUEST_CHOICE_COUNT) == 1:
        del attrs[semconv.GEN_AI_REQUEST_CHOICE_COUNT]  # conditionally required only when != 1
    stop = kwargs.get("stop", config.get("stop"))
    if isinstance(stop, str):
        attrs[semconv.GEN_AI_REQUEST_STOP_SEQUENCES] = [stop]
    elif isinstance(stop, (list, tuple)) and stop and all(isinstance(s, str) for s in stop):
        attrs[semconv.GEN_AI_REQUEST_STOP_SEQUENCES] = list(stop)
    if kwargs.get("stream") is True:
        attrs[semconv.GEN_AI_REQUEST_STREAM] = True
    return attrs


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if type(obj) is dict:
        return obj.get(key)
    value = getattr(obj, key, None)  # OpenAI's response objects: an attribute (no ABC check first)
    if value is None and isinstance(obj, Mapping):
        return obj.get(key)
    return value


# a token count the server reports: an int of OTLP's int64 and not negative (10**30 made the OTLP encoder
# refuse the metric export holding it, every metric of that export lost; -5 is no count)
MAX_COUNT = 2**63 - 1


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT else None


# isinstance(x, Mapping) runs ABCMeta.__instancecheck__: ~1,900 instructions (a weak reference made per
# check) for an object that is not one, such as OpenAI's usage objects. Mapping has no subclass hook, so
# the answer is its class's: a class found not to be one is remembered with abc's cache token of then
# (any ABC's register() changes it), for objects whose __class__ is their type (a proxy is checked each time)
_NOT_MAPPINGS: dict[type, object] = {}


def _is_mapping(value: Any, cls: type) -> bool:
    """``isinstance(value, Mapping)``, a class found not to be one remembered (see ``_NOT_MAPPINGS``)."""
    token = get_cache_token()
    if isinstance(value, Mapping):
        return True
    if value.__class__ is cls:
        if len(_NOT_MAPPINGS) >= 64:
            _NOT_MAPPINGS.clear()  # classes of one process: a bound, not a cache policy
        _NOT_MAPPINGS[cls] = token
    return False


def usage_attributes(usage: Any) -> dict[str, Any]:
    """Token counts of a response's ``usage`` (OpenAI shape, object or dict), where present. One ``return``,
    at its end: written into the model call's generated recorder (``ag2._record_llm``)."""
    attrs: dict[str, Any] = {}
    if usage is not None:
        cls = type(usage)
        if cls is dict or (not (_NOT_MAPPINGS.get(cls) == get_cache_token() and usage.__class__ is cls)
                           and _is_mapping(usage, cls)):
            get = usage.get
            prompt, completion = get("prompt_tokens"), get("completion_tokens")
            prompt_details, completion_details = get("prompt_tokens_details"), get("completion_tokens_details")
        else:  # OpenAI's CompletionUsage and the like: plain attributes
            prompt = getattr(usage, "prompt_tokens", None)
            completion = getattr(usage, "completion_tokens", None)
            prompt_details = getattr(usage, "prompt_tokens_details", None)
            completion_details = getattr(usage, "completion_tokens_details", None)
        # both ints of 0 to 2**63 - 1 (the usual case): one test of their bits
        if type(prompt) is int and type(completion) is int and not (prompt | completion) >> 63:
            attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] = prompt
            attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] = completion
        else:
            if _count(prompt) is not None:
                attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] = prompt
            if _count(completion) is not None:
                attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] = completion
        if prompt_details is not None:
            cached = _count(_get(prompt_details, "cached_tokens"))
            if cached is not None:
                attrs[semconv.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = cached
        if completion_details is not None:
            reasoning = _count(_get(completion_details, "reasoning_tokens"))
            if reasoning is not None:
                attrs[semconv.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = reasoning
    return attrs
