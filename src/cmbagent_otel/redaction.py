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
import os
import re
import threading
from typing import Any

from ._jsontext import compact_encoder

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
_secret_with_comma = False


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
    global _known_pattern, _secret_with_comma
    with _lock:
        if value in _known:
            return
        _known.add(value)
        _secret_with_comma = _secret_with_comma or "," in value
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
    return _redact_with(_known_pattern, text)


def _redact_with(known: re.Pattern[str] | None, text: str) -> str:
    if known is not None:
        text = known.sub(REDACTED, text)
    return _SECRET_SHAPES.sub(REDACTED, text)


class _Memo:
    __slots__ = ("chars", "entries", "known")

    def __init__(self, known: re.Pattern[str] | None) -> None:
        self.known = known
        self.entries: dict[str, str] = {}
        self.chars = 0


class RedactionCache:
    """Memo of :func:`redact` for strings that come back again and again (a chat's message
    history is sent on every LLM call; attribute values repeat across spans).

    Each memo belongs to the set of known secrets it was computed with: registering a new
    secret makes the next lookup start an empty memo, so a cached result never lets a
    secret through. Strings longer than ``max_len`` are not memoised; the memo is emptied
    when its keys and values exceed ``max_chars`` characters in total (a memory bound).
    """

    __slots__ = ("_memo", "max_chars", "max_len")

    def __init__(self, max_len: int, max_chars: int) -> None:
        self.max_len = max_len
        self.max_chars = max_chars
        self._memo = _Memo(_known_pattern)

    def entries(self) -> dict[str, str]:
        """The memo for the currently known secrets: text -> redacted text (read-only use)."""
        return self._current().entries

    def _current(self) -> _Memo:
        memo = self._memo  # one read: another thread may replace it at any time
        known = _known_pattern
        if memo.known is not known:
            memo = self._memo = _Memo(known)
        return memo

    def redact(self, text: str) -> str:
        """``redact(text)``, memoised."""
        if not text:
            return text
        if len(text) > self.max_len:
            return _redact_with(_known_pattern, text)
        memo = self._current()
        out = memo.entries.get(text)
        if out is None:
            out = _redact_with(memo.known, text)  # the secrets this memo stands for, not newer ones
            memo.chars += len(text) + len(out)
            if memo.chars > self.max_chars:
                memo = self._memo = _Memo(memo.known)
                memo.chars = len(text) + len(out)
            memo.entries[text] = out
        return out


# message histories: every string of every message, on every LLM call with content capture on
_scrub_cache = RedactionCache(max_len=8192, max_chars=4_000_000)
_secret_key_names: dict[str, bool] = {}


def is_secret_key(name: str) -> bool:
    """Whether a dict key or attribute name holds a secret (``api_key``, ``*token``, ...)."""
    known = _secret_key_names.get(name)
    if known is None:
        known = bool(_SECRET_KEY_NAME.match(name))
        if len(_secret_key_names) >= 4096:
            _secret_key_names.clear()
        _secret_key_names[name] = known
    return known


def scrub(value: Any, _depth: int = 0) -> Any:
    """Deep copy of ``value`` with secret-named keys dropped and strings redacted."""
    if _depth > 20:
        return "[too deep]"
    if isinstance(value, str):
        return _scrub_cache.redact(value)
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


_dumps = compact_encoder(repr, ensure_ascii=False)  # scrub() output is acyclic


def safe_text(value: Any, limit: int | None = None) -> str | None:
    """``value`` as bounded, redacted text; ``None`` if it cannot be rendered at all."""
    try:
        if value is None:
            return None
        if isinstance(value, str):
            text = value
        elif isinstance(value, (list, tuple)):
            return truncate(_redacted_json_list(value, limit or _max_len), limit)
        else:
            text = _dumps(scrub(value))
        return truncate(redact(text), limit)
    except Exception:
        return None


def _redacted_json_list(items: list[Any] | tuple[Any, ...], bound: int) -> str:
    """``redact(json.dumps(scrub(items)))``, or a prefix of it longer than ``bound`` (the
    caller truncates there anyway), so a long message history is not scrubbed and
    serialised in full on every LLM call.

    Exact: the items left out are still walked for the secrets ``scrub`` would learn from
    them (values under secret-named keys), so a secret stated in a later message is redacted
    in the prefix as well; and no redaction match can run across the ", " between two items
    (secret shapes exclude both characters; a registered secret containing a comma turns
    the shortcut off), so redacting a prefix that ends between items gives a prefix of
    redacting the whole.
    """
    parts: list[str] = []
    size = 1
    check_at = bound + 16
    for index, item in enumerate(items):
        parts.append(_dumps(scrub(item, 1)))
        size += len(parts[-1]) + 2
        if size > check_at and not _secret_with_comma:
            for rest in items[index + 1:]:
                _register_secret_keys(rest, 1)
            prefix = redact("[" + ", ".join(parts)) or ""
            if len(prefix) > bound:
                return prefix
            check_at = size * 2  # redaction shrank it below the bound: look again further on
    return redact("[" + ", ".join(parts) + "]") or ""


def _register_secret_keys(value: Any, depth: int) -> None:
    """Register the secrets :func:`scrub` would register in ``value``, without copying it."""
    if depth > 20:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if is_secret_key(str(key)):
                register_secret(item)
            else:
                _register_secret_keys(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _register_secret_keys(item, depth + 1)


reload_settings()
