"""Message-content capture mode and safe extraction helpers for AG2 objects."""

from __future__ import annotations

import contextlib
import enum
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from .. import environment_variables
from ..redaction import (
    is_registered,
    is_secret_key,
    redact_name,
    register_new_environment,
    register_secret,
    register_secrets_in,
    secret_text,
)

logger = logging.getLogger("cmbagent_otel")

CAPTURE_ENV = environment_variables.CAPTURE_MESSAGE_CONTENT


class ContentMode(enum.Enum):
    """Where message content goes (the values of ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``).

    ``SPAN_ONLY``: content attributes on the spans; ``EVENT_ONLY``: only in the GenAI content
    events (``gen_ai.client.inference.operation.details`` log records, one per model call);
    ``SPAN_AND_EVENT``: both; ``NO_CONTENT``: neither (the default).
    """

    NO_CONTENT = "no_content"
    SPAN_ONLY = "span_only"
    EVENT_ONLY = "event_only"
    SPAN_AND_EVENT = "span_and_event"

    @property
    def on_spans(self) -> bool:
        return self in (ContentMode.SPAN_ONLY, ContentMode.SPAN_AND_EVENT)

    @property
    def on_events(self) -> bool:
        return self in (ContentMode.EVENT_ONLY, ContentMode.SPAN_AND_EVENT)


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"", "false", "0", "no", "off"})
_warned: set[str] = set()


def content_mode(value: Any) -> ContentMode:
    """Parse a capture setting: a :class:`ContentMode`, a bool (true = ``SPAN_ONLY``), or the
    variable's text (mode names in any case, or the boolean forms). Anything else: warn once,
    ``NO_CONTENT``."""
    if isinstance(value, ContentMode):
        return value
    if isinstance(value, bool):
        return ContentMode.SPAN_ONLY if value else ContentMode.NO_CONTENT
    text = str(value).strip().lower() if value is not None else ""
    if text in _TRUE:
        return ContentMode.SPAN_ONLY
    if text in _FALSE:
        return ContentMode.NO_CONTENT
    try:
        return ContentMode(text)
    except ValueError:
        if text not in _warned:
            _warned.add(text)
            logger.warning("cmbagent_otel: %s=%r is not one of NO_CONTENT, SPAN_ONLY, EVENT_ONLY, SPAN_AND_EVENT, "
                           "true, false; message content stays off", CAPTURE_ENV, value)
        return ContentMode.NO_CONTENT


def capture_from_env() -> ContentMode:
    """The capture mode the environment asks for (off unless explicitly on)."""
    return content_mode(environment_variables.get(CAPTURE_ENV))


def agent_name(agent: Any) -> str:
    try:
        name = getattr(agent, "name", None)
        return redact_name(str(name)) if name is not None else type(agent).__name__
    except Exception:
        return "unknown"


def cached_name(agents: Mapping[int, Any], agent: Any) -> str:
    """``agent``'s name from an instrumentor's per-agent cache (id -> facts with a ``name``, a str from
    :func:`agent_name`; an entry goes when its agent does, ``ag2._remember``) when it is there, else read
    from the agent."""
    static = agents.get(id(agent))
    if static is not None:
        return static.name  # type: ignore[no-any-return]
    return agent_name(agent)


# whether a config entry's key names a secret, by key: the few names of a config list, asked on every call
_SECRET_NAMES: dict[Any, bool] = {}
_SECRET_NAMES_MAX = 1024


def _names_secret(name: Any) -> bool:
    lower = str(name).lower()
    found = "key" in lower or "token" in lower
    if len(_SECRET_NAMES) >= _SECRET_NAMES_MAX:
        _SECRET_NAMES.clear()  # key names of one process's configs: a bound, not a cache policy
    _SECRET_NAMES[name] = found
    return found


# id -> (config entry, its key names, its secret-named (name, value) pairs) as last walked: an entry
# whose key names and secret values are the same objects again needs no walk (registered secrets
# are never forgotten). Bounded like _seen_configs (each entry keeps its config alive).
_walked_entries: OrderedDict[int, tuple[Any, frozenset[Any], tuple[tuple[Any, Any], ...]]] = OrderedDict()


def register_llm_config_secrets(config_list: Any) -> None:
    """Remember API keys of an OpenAIWrapper's config list so they are redacted everywhere. Checked
    on every call (an entry already walked costs a comparison of its key names and secret values):
    a key replaced or added inside an entry is registered before the call that uses it. No ``return``: written
    into the model call's generated builder (``ag2._llm``)."""
    try:
        if config_list:
            walked = _walked_entries
            for config in config_list:
                if type(config) is not dict and not isinstance(config, dict):
                    continue
                seen = walked.get(id(config))
                if seen is not None and seen[0] is config and seen[1] == config.keys():
                    for name, value in seen[2]:  # a loop, not all(<generator>): one object less per call
                        if config.get(name) is not value:
                            break
                    else:
                        continue
                _register_entry(config)
    except Exception:
        pass


def _register_entry(config: dict[Any, Any]) -> None:
    names = _SECRET_NAMES
    secrets = []
    for name, value in config.items():
        secret = names.get(name)
        if secret is None:
            secret = _names_secret(name)
        if secret:
            secrets.append((name, value))
            if isinstance(value, str) and not is_registered(value):
                register_secret(value)
    _walked_entries[id(config)] = (config, frozenset(config), tuple(secrets))
    if len(_walked_entries) > _SEEN_CONFIGS_MAX:
        _walked_entries.popitem(last=False)


# Several cmbagent runs' worth of agents (~48 per run); a config evicted early is only walked
# again. Each entry keeps its config alive, so the bound is also a memory bound (at 4096 the
# 100k-span memory bench grew 6 MiB before levelling off; at 256 it stays flat).
_SEEN_CONFIGS_MAX = 256
# id -> config object: holding the object keeps its id from being reused by another config
_seen_configs: OrderedDict[int, Any] = OrderedDict()


def register_agent_secrets(agent: Any) -> None:
    """Register the secrets of ``agent.llm_config`` once per config object (AG2 0.14 keeps
    API keys there, not in ``OpenAIWrapper._config_list``)."""
    try:
        config = getattr(agent, "llm_config", None)
        if not config:
            return
        key = id(config)
        if _seen_configs.get(key) is config:
            return
        register_secrets_in(config)
        _register_connection_credentials(config)
        _seen_configs[key] = config
        if len(_seen_configs) > _SEEN_CONFIGS_MAX:
            _seen_configs.popitem(last=False)
    except Exception:
        pass


# fields of a config entry whose values are sent with every request, under names that need not say
# they hold a credential (a proxy's team header, a gateway URL's user info or ?code=)
_ENTRIES_MAX = 64


def _register_connection_credentials(config: Any) -> None:
    """Register the credentials of ``llm_config`` entries that no secret-named key holds, by the rule
    of the exporters' configuration (:func:`environment_variables.configured_credentials`): header
    values under ``default_headers``/``extra_headers`` or an ``http_client``'s headers (token-looking,
    vendor or secret-named, the token after ``Bearer``; not ``User-Agent`` and the like),
    ``base_url``'s password or token user info and credential query values, and those of
    ``default_query`` and the ``http_client``'s query. A model client's error quoting its request
    (its URL, its headers, its config) showed them; their ``key=value`` text forms were caught by
    shape, a bare value was not. Runs once per new config object (every new agent's)."""
    if type(config) is dict:
        entries, listed = [config], config.get("config_list")
    else:  # LLMConfig: its entries hold these
        entries, listed = [], getattr(config, "config_list", None)
    if type(listed) is list or isinstance(listed, (list, tuple)):
        entries += listed[:_ENTRIES_MAX]
    for entry in entries:
        fields = entry if type(entry) is dict else _values_of(entry)
        if fields is None:
            continue
        client, headers, extra = fields.get("http_client"), fields.get("default_headers"), fields.get("extra_headers")
        url, query = fields.get("base_url"), fields.get("default_query")
        if client is None and url is None and not headers and not extra and not query:
            continue  # most entries: a model, its key and its API type
        with contextlib.suppress(Exception):  # a hostile entry stops its own walk only
            for value in _entry_credentials(client, headers, extra, url, query):
                if value and not is_registered(value):
                    register_secret(value)


def _entry_credentials(client: Any, headers: Any, extra: Any, url: Any, query: Any) -> list[str]:
    found: list[str] = []
    for mapping in (headers, extra, getattr(client, "headers", None)):
        if isinstance(mapping, Mapping):
            found += environment_variables.headers_credentials(mapping, is_secret_key, _ENTRIES_MAX)
    auth = getattr(client, "auth", None)  # an httpx client's auth= (BasicAuth, DigestAuth, a custom Auth)
    if auth is not None:
        found += _auth_credentials(auth)
    if url is not None and not isinstance(url, (bool, int, float)):
        found += environment_variables.url_credentials(str(url), is_secret_key)
    for mapping in (query, getattr(client, "params", None)):
        if isinstance(mapping, Mapping):
            for param, value in list(mapping.items())[:_ENTRIES_MAX]:
                if isinstance(value, str) and environment_variables.is_query_credential(str(param), is_secret_key):
                    found.append(value)
    return found


def _auth_credentials(auth: Any) -> list[str]:
    """The credentials an httpx ``Auth`` object holds: BasicAuth's header (its token, and the password it
    encodes), DigestAuth's password (bytes), a custom Auth's secret-named attributes."""
    found: list[str] = []
    header = getattr(auth, "_auth_header", None)  # httpx.BasicAuth
    if isinstance(header, str):
        found += environment_variables.header_credentials("authorization", header, is_secret_key)
    password = getattr(auth, "_password", None)  # httpx.DigestAuth
    if isinstance(password, bytes):
        found.append(secret_text(password))
    register_secrets_in(auth)  # its secret-named attributes (token=, api_key=, password=...)
    return found


# the openai client's attributes holding a credential (OpenAI, AzureOpenAI)
_OPENAI_CLIENT_SECRETS = ("api_key", "_azure_ad_token", "admin_api_key", "webhook_secret")


def register_client_credentials(wrapper: Any) -> None:
    """Register the credentials an ``OpenAIWrapper``'s clients hold (never raises): the API key AG2 strips
    from ``_config_list`` (a wrapper built without an agent, a key the client read from the environment),
    secret-named attributes of AG2's client classes (Anthropic's and Bedrock's ``_aws_secret_key``...),
    the ``openai`` client's default headers and query and its HTTP client's headers, query and ``auth``.
    Called once per new config entry (:func:`._models.config_info`): AG2 built the clients with the
    wrapper, reading the provider's environment variables then, so those are looked at again too."""
    with contextlib.suppress(Exception):
        register_new_environment()
        clients = getattr(wrapper, "_clients", None)
        if not isinstance(clients, list):
            return
        for client in clients[:_ENTRIES_MAX]:
            inner = getattr(client, "_oai_client", None)
            if inner is None:  # AG2's other clients (Anthropic's, Bedrock's...): their secret-named attributes
                if type(client).__module__.startswith("autogen."):  # a custom ModelClient got its config
                    register_secrets_in(client)
                continue
            for name in _OPENAI_CLIENT_SECRETS:  # read by name: a walk of its ~20 attributes cost more
                value = getattr(inner, name, None)
                if isinstance(value, str) and value and not is_registered(value):
                    register_secret(value)
            base_url = getattr(inner, "base_url", None)
            for value in _entry_credentials(getattr(inner, "_client", None), getattr(inner, "_custom_headers", None),
                                            None, str(base_url) if base_url is not None else None,
                                            getattr(inner, "_custom_query", None)):
                if value and not is_registered(value):
                    register_secret(value)


def _values_of(entry: Any) -> Mapping[Any, Any] | None:
    """A config entry's values by name: a mapping as it is; a pydantic entry's fields and extras
    read from its instance dicts (``getattr`` of a name it lacks costs pydantic two formatted
    exceptions)."""
    if isinstance(entry, Mapping):
        return entry
    values = getattr(entry, "__dict__", None)
    if type(values) is not dict:
        return None
    extra = getattr(entry, "__pydantic_extra__", None)
    return {**values, **extra} if type(extra) is dict and extra else values
