"""Bounding and scrubbing of values before they become span attributes.

Every string cmbagent-otel puts on a span passes through :func:`truncate` (length bound)
and, when it can carry user or provider text, :func:`redact` (secret scrubbing). Secrets
are recognised three ways: values registered with :func:`register_secret` (API keys
found in ``llm_config`` are registered automatically by the instrumentor), values of
environment variables whose name looks secret (``*_API_KEY``, ``*TOKEN*``,
``*SECRET*``, ``*PASSWORD*``), and well-known key shapes (``sk-...``, ``Bearer ...``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from typing import Any

REDACTED = "[REDACTED]"
DEFAULT_MAX_LENGTH = 4096
MAX_LENGTH_ENV = "CMBAGENT_OTEL_MAX_ATTRIBUTE_LENGTH"

_SECRET_ENV_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.IGNORECASE)
_SECRET_KEY_NAME = re.compile(
    r"^(api[_-]?key|.*_api_key|apikey|.*token|.*secret.*|password|passwd|authorization|"
    r"x-api-key|.*credential.*|private[_-]?key)$",
    re.IGNORECASE,
)
_SECRET_SHAPES = re.compile(
    r"(sk-[A-Za-z0-9_\-]{12,}|sk_[A-Za-z0-9]{16,}|AIza[0-9A-Za-z_\-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
    r"xox[abp]-[A-Za-z0-9\-]{10,}|(?i:bearer)\s+[A-Za-z0-9._~+/\-]{8,}=*)"
)
_MIN_SECRET_LEN = 6

_lock = threading.Lock()
_known: set[str] = set()
_known_pattern: re.Pattern[str] | None = None


def max_length() -> int:
    """The attribute length bound: ``CMBAGENT_OTEL_MAX_ATTRIBUTE_LENGTH`` or 4096."""
    raw = os.environ.get(MAX_LENGTH_ENV)
    if raw:
        try:
            value = int(raw)
            if value > 0:
                return value
        except ValueError:
            pass
    return DEFAULT_MAX_LENGTH


_max_len = max_length()


def reload_settings() -> None:
    """Re-read the length bound and secret-looking environment variables."""
    global _max_len
    _max_len = max_length()
    for name, value in os.environ.items():
        if _SECRET_ENV_NAME.search(name):
            register_secret(value)


def truncate(value: str | None, limit: int | None = None) -> str | None:
    """Cut ``value`` to the attribute bound, marking the cut with ``...[truncated]``."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    bound = limit or _max_len
    if len(value) <= bound:
        return value
    return value[: max(bound - 14, 0)] + "...[truncated]"


def register_secret(value: Any) -> None:
    """Never let ``value`` appear in telemetry (spans, logs, DB rows)."""
    if not isinstance(value, str) or len(value) < _MIN_SECRET_LEN:
        return
    global _known_pattern
    with _lock:
        if value in _known:
            return
        _known.add(value)
        ordered = sorted(_known, key=len, reverse=True)
        _known_pattern = re.compile("|".join(re.escape(v) for v in ordered))


def register_secrets_in(value: Any) -> None:
    """Register every secret found in a configuration object (never raises).

    Walks dicts, lists and pydantic models (AG2's ``LLMConfig`` and its config entries):
    values under secret-named keys at any depth (``api_key``, ``azure_ad_token``,
    ``default_headers["Authorization"]``, ``X-Api-Key``...), ``Bearer`` header values, and
    every pydantic ``SecretStr``. AG2 0.14 strips ``api_key`` from
    ``OpenAIWrapper._config_list``, so the agent's ``llm_config`` is where keys are found.
    """
    with contextlib.suppress(Exception):  # telemetry must never break the app
        _register_walk(value, 0, False)


def _register_walk(value: Any, depth: int, secret: bool) -> None:
    if value is None or depth > 8 or isinstance(value, (bool, int, float)):
        return
    reveal = getattr(value, "get_secret_value", None)
    if callable(reveal):  # pydantic SecretStr / SecretBytes
        revealed = reveal()
        if isinstance(revealed, bytes):
            revealed = revealed.decode("utf-8", "replace")
        _register_value(revealed)
        return
    if isinstance(value, str):
        if secret:
            _register_value(value)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _register_walk(item, depth + 1, secret or is_secret_key(str(key)))
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _register_walk(item, depth + 1, secret)
        return
    config_list = getattr(value, "config_list", None)  # LLMConfig
    if isinstance(config_list, (list, tuple)):
        _register_walk(config_list, depth + 1, secret)
    fields = getattr(type(value), "model_fields", None)  # pydantic v2 model
    if isinstance(fields, dict):
        for name in fields:
            _register_walk(getattr(value, name, None), depth + 1, secret or is_secret_key(name))
        extra = getattr(value, "__pydantic_extra__", None)
        if isinstance(extra, dict):
            _register_walk(extra, depth + 1, secret)


def _register_value(value: Any) -> None:
    if not isinstance(value, str):
        return
    register_secret(value)
    scheme, _, token = value.strip().partition(" ")
    if token and scheme.lower() in ("bearer", "basic", "token"):
        register_secret(token.strip())


def redact(text: str | None) -> str | None:
    """Replace every known secret and secret-shaped token in ``text`` by ``[REDACTED]``."""
    if not text or not isinstance(text, str):
        return text
    pattern = _known_pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    return _SECRET_SHAPES.sub(REDACTED, text)


def is_secret_key(name: str) -> bool:
    return bool(_SECRET_KEY_NAME.match(name))


def scrub(value: Any, _depth: int = 0) -> Any:
    """Deep copy of ``value`` with secret-named keys dropped and strings redacted."""
    if _depth > 20:
        return "[too deep]"
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            skey = str(key)
            if is_secret_key(skey):
                register_secret(item)
                out[skey] = REDACTED
            else:
                out[skey] = scrub(item, _depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [scrub(item, _depth + 1) for item in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(repr(value))


def safe_text(value: Any, limit: int | None = None) -> str | None:
    """``value`` as bounded, redacted text; ``None`` if it cannot be rendered at all."""
    try:
        if value is None:
            return None
        if isinstance(value, str):
            text = value
        else:
            text = json.dumps(scrub(value), default=repr, ensure_ascii=False)
        return truncate(redact(text), limit)
    except Exception:
        return None


reload_settings()
