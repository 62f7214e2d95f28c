"""Message-content capture switch and safe extraction helpers for AG2 objects."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from ..redaction import register_secret, register_secrets_in, safe_text

CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_ON_VALUES = frozenset({"true", "1", "yes", "on", "span_only", "span_and_event"})


def capture_from_env() -> bool:
    """Whether the environment asks for message content (off unless explicitly on)."""
    return os.environ.get(CAPTURE_ENV, "").strip().lower() in _ON_VALUES


def agent_name(agent: Any) -> str:
    try:
        name = getattr(agent, "name", None)
        return str(name) if name is not None else type(agent).__name__
    except Exception:
        return "unknown"


def content_of(message: Any) -> str | None:
    """Text of an AG2 message (str or dict), redacted and bounded; ``None`` if absent."""
    if message is None:
        return None
    if isinstance(message, dict):
        if message.get("content") is None and (message.get("tool_calls") or message.get("function_call")):
            return safe_text({k: message.get(k) for k in ("tool_calls", "function_call") if message.get(k)})
        return safe_text(message.get("content"))
    return safe_text(message)


def register_llm_config_secrets(config_list: Any) -> None:
    """Remember API keys of an OpenAIWrapper's config list so they are redacted everywhere."""
    try:
        for config in config_list or ():
            if isinstance(config, dict):
                for key, value in config.items():
                    if isinstance(value, str) and ("key" in key.lower() or "token" in key.lower()):
                        register_secret(value)
    except Exception:
        pass


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
        _seen_configs[key] = config
        if len(_seen_configs) > _SEEN_CONFIGS_MAX:
            _seen_configs.popitem(last=False)
    except Exception:
        pass
