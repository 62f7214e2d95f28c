"""Message content in the GenAI conventions' JSON schemas, redacted and bounded.

AG2 passes OpenAI-style messages (``{"role", "content", "name", "tool_calls",
"tool_call_id"}``); the conventions want ``{"role", "parts": [...], "name"}`` with parts of
type ``text``, ``tool_call`` (arguments as an object) and ``tool_call_response``, output
messages with a ``finish_reason``, and system messages apart, as ``gen_ai.system_instructions``
(a list of parts). :func:`render` turns such a list into the attribute's JSON text:

* every string is redacted (:func:`cmbagent_otel.redaction.scrub`: secret-named keys, known
  and learned secrets, secret-shaped tokens) and the whole text is redacted again, exactly as
  before; the items left out are still read for secrets they would teach;
* the text is at most the attribute bound and is ALWAYS valid JSON: messages are taken newest
  first while they fit, the newest one (and an older one that only partly fits) has its strings
  cut (``...[truncated]``) until it fits; older messages are left out (the number left out is
  returned, for ``cmbagent.content.dropped_messages``).
"""

from __future__ import annotations

import logging
import sys
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import accumulate, repeat
from operator import add, is_
from typing import Any

from .. import redaction
from .._forksafe import reset_in_child
from .._jsontext import compact_encoder, loads
from ..redaction import (
    attribute_bound,
    learn_encoded_in,
    learn_secrets_ahead,
    learn_split_secrets,
    learn_split_texts,
    redact,
    redact_list,
    redact_list_from,
    redact_list_tail,
    scrub,
    scrub_message,
    truncate,
)

logger = logging.getLogger("cmbagent_otel")

_dumps = compact_encoder(repr, ensure_ascii=False)  # scrub() output is acyclic and JSON-typed
SYSTEM_ROLES = frozenset({"system", "developer"})
# OpenAI finish reasons -> the output schema's FinishReason values (others pass through)
FINISH_REASONS: Mapping[str, str] = {"tool_calls": "tool_call", "function_call": "tool_call"}
MIN_PARTIAL = 256  # an older message cut to fit is worth keeping only with this much room left
_MIN_STRING = 16


# --- conversion ---------------------------------------------------------------------------------
def _arguments(raw: Any) -> Any:
    """Tool-call arguments as an object: AG2 passes the model's JSON text."""
    if isinstance(raw, str):
        try:
            return loads(raw)
        except ValueError:
            return raw
    return raw


def _field(obj: Any, key: str) -> Any:
    """A field of a dict or of an object (OpenAI's pydantic models, SimpleNamespace)."""
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def _tool_call_part(call: Any) -> dict[str, Any] | None:
    if call is None:
        return None
    function = _field(call, "function")
    if function is None:
        function = call  # a legacy function_call carries name and arguments itself
    name = _field(function, "name")
    part: dict[str, Any] = {"type": "tool_call", "name": str(name) if name is not None else "unknown"}
    call_id = _field(call, "id")
    if call_id is not None:
        part["id"] = str(call_id)
    arguments = _field(function, "arguments")
    if arguments is not None:
        part["arguments"] = _arguments(arguments)
    return part


def content_parts(content: Any) -> list[dict[str, Any]]:
    """Parts of an OpenAI ``content`` (text, or a list of typed parts)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    if isinstance(content, (list, tuple)):
        parts: list[dict[str, Any]] = []
        for item in content:
            if isinstance(item, str):
                parts.append({"type": "text", "content": item})
            elif isinstance(item, Mapping):
                kind = item.get("type")
                if kind == "text" and isinstance(item.get("text"), str):
                    parts.append({"type": "text", "content": item["text"]})
                elif kind == "image_url":
                    image = item.get("image_url")
                    url = image.get("url") if isinstance(image, Mapping) else image
                    if isinstance(url, str) and not url.startswith("data:"):
                        parts.append({"type": "uri", "modality": "image", "uri": url})
                    else:  # inline bytes are not telemetry: keep only that an image was there
                        parts.append({"type": "image"})
                else:
                    parts.append({"type": str(kind or "unknown")})
        return parts
    return [{"type": "text", "content": content if isinstance(content, str) else str(content)}]


def message(raw: Any, default_role: str = "user") -> dict[str, Any]:
    """One AG2 / OpenAI message as a ChatMessage (role, parts, name)."""
    if not isinstance(raw, Mapping):
        return {"role": default_role, "parts": content_parts(raw)}
    role = raw.get("role")
    role = str(role) if role else default_role
    parts: list[dict[str, Any]]
    if role in ("tool", "function"):
        responses = raw.get("tool_responses")
        if raw.get("tool_call_id") is None and type(responses) is list and responses \
                and all(isinstance(item, Mapping) for item in responses):
            # AG2's own reply to tool calls (an agent turn's output, a history message) keeps each call's id
            # and result in tool_responses; its content only joins the results, which lost the ids
            parts = [_tool_response_part(item) for item in responses]
        else:
            parts = [_tool_response_part(raw)]
    else:
        parts = content_parts(raw.get("content"))
    for call in raw.get("tool_calls") or ():
        tool_part = _tool_call_part(call)
        if tool_part is not None:
            parts.append(tool_part)
    function_call = raw.get("function_call")
    if function_call is not None:
        parts.append(_tool_call_part(function_call) or {"type": "tool_call", "name": "unknown"})
    out: dict[str, Any] = {"role": role, "parts": parts}
    name = raw.get("name")
    if name:
        out["name"] = str(name)
    return out


def _tool_response_part(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A ``tool_call_response`` part of an OpenAI tool message (or of one item of AG2's ``tool_responses``)."""
    part: dict[str, Any] = {"type": "tool_call_response", "response": _arguments_or_text(raw.get("content"))}
    call_id = raw.get("tool_call_id")
    if call_id is not None:
        part["id"] = str(call_id)
    return part


def _arguments_or_text(value: Any) -> Any:
    """A tool response: kept as given (text stays text; AG2 tool responses are strings)."""
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    return str(value)


def tool_arguments(raw: Any) -> Any:
    """A tool call's arguments as the object the model sent (AG2 passes JSON text)."""
    return _arguments(raw)


def tool_result(content: Any) -> Any:
    """A tool's result: a JSON object or array given as text is deserialised, other text stays text."""
    if isinstance(content, str):
        stripped = content.lstrip()
        if stripped[:1] in ("{", "["):
            try:
                return loads(content)  # nested too deep: kept as the text it is
            except ValueError:
                return content
        return content
    return _arguments_or_text(content)


_DICTS_ONLY = {dict}


def split_system(messages: Iterable[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(system instruction parts, the other messages) of a model call's input."""
    system: list[dict[str, Any]] = []
    if type(messages) is list and messages and set(map(type, messages)) == _DICTS_ONLY:
        # AG2's usual input, plain dicts with at most the first one a system message: the roles read
        # in C (the loop below cost ~20 bytecodes a message, on the whole history at every call)
        roles = list(map(dict.get, messages, repeat("role")))
        if SYSTEM_ROLES.isdisjoint(roles[1:]):
            if roles[0] in SYSTEM_ROLES:
                system.extend(content_parts(messages[0].get("content")))
                return system, messages[1:]
            return system, messages[:]
    rest: list[Any] = []
    for raw in messages:
        if isinstance(raw, Mapping) and raw.get("role") in SYSTEM_ROLES:
            system.extend(content_parts(raw.get("content")))
        else:
            rest.append(raw)
    return system, rest


def finish_reason(reason: Any) -> str:
    if not reason:
        return "stop"
    text = str(reason)
    return FINISH_REASONS.get(text, text)


def output_message(raw: Any, reason: Any = None, name: str | None = None) -> dict[str, Any]:
    """An OutputMessage (role assistant unless given, parts, finish_reason)."""
    out = message(raw, default_role="assistant")
    if isinstance(raw, Mapping) and raw.get("role") is None:
        out["role"] = "assistant"
    if reason is None:
        reason = "tool_call" if any(p.get("type") == "tool_call" for p in out["parts"]) else "stop"
    out["finish_reason"] = finish_reason(reason)
    if name and "name" not in out:
        out["name"] = name
    return out


def response_messages(response: Any) -> list[dict[str, Any]]:
    """Output messages of an OpenAI-shaped response: one per choice."""
    out: list[dict[str, Any]] = []
    for choice in getattr(response, "choices", None) or ():
        msg = getattr(choice, "message", None)
        if msg is None:
            continue
        raw: dict[str, Any] = {"role": getattr(msg, "role", None) or "assistant",
                               "content": getattr(msg, "content", None)}
        calls = getattr(msg, "tool_calls", None)
        if calls:
            raw["tool_calls"] = calls
        function_call = getattr(msg, "function_call", None)
        if function_call is not None:
            raw["function_call"] = function_call
        out.append(output_message(raw, getattr(choice, "finish_reason", None)))
    return out


# --- bounded, redacted JSON text -------------------------------------------------------------------
def _shrink(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return truncate(value, limit) if len(value) > limit else value
    if isinstance(value, dict):
        return {k: (v if k in ("type", "role") else _shrink(v, limit)) for k, v in value.items()}
    if isinstance(value, list):
        return [_shrink(v, limit) for v in value]
    return value


def _fit(item: Any, budget: int) -> str | None:
    """JSON text of ``item`` (already scrubbed) in at most ``budget`` characters, strings cut as needed."""
    text = _dumps(item)
    if len(text) <= budget:
        return text
    limit = max(budget // 2, _MIN_STRING)
    while limit >= _MIN_STRING:
        text = _dumps(_shrink(item, limit))
        if len(text) <= budget:
            return text
        limit //= 2
    if isinstance(item, dict) and isinstance(item.get("parts"), list):
        # too many parts for the room: keep the message, its parts as one cut text part
        head = {k: v for k, v in item.items() if k != "parts"}
        text = _dumps({**head, "parts": [{"type": "text", "content": ""}]})
        room = budget - len(text)
        if room >= _MIN_STRING:
            return _dumps({**head, "parts": [{"type": "text", "content": truncate(_dumps(item["parts"]), room // 2)}]})
    return None


# JSON pieces of AG2 messages already rendered, by the message dict's identity: AG2 keeps the
# same dicts in an agent's history, so each call renders only what is new. Both caches hold
# pieces made with the current redaction.secrets_version only (a string equal to a learned
# piece of a split secret is redacted whole by scrub, which the second redaction cannot do).
_PIECES_MAX = 512  # with pieces of at most _PIECE_CHARS: a few MiB at most
_PIECE_CHARS = 8192
_pieces: OrderedDict[int, tuple[Any, Any, Any, Any, str, int]] = OrderedDict()
# (convert, the dict's items, other values than text by identity) -> (scrubbed item, JSON text,
# version, those values)
_flat_pieces: OrderedDict[tuple[Any, ...], tuple[Any, str, int, tuple[Any, ...]]] = OrderedDict()
_pieces_lock = threading.Lock()
reset_in_child(sys.modules[__name__], "_pieces_lock")  # a forked child must not find it held


def _parts_key(value: Any) -> tuple[Any, ...] | None:
    """A list of flat dicts of short text (an output message's text parts) as a key; ``None``
    for any other value."""
    if type(value) is not list:
        return None
    parts = []
    for part in value:
        if type(part) is not dict:
            return None
        for text in part.values():
            if type(text) is not str or len(text) > _PIECE_CHARS:
                return None
        parts.append(tuple(part.items()))
    return tuple(parts)


_TEXT_OR_NONE = frozenset({str, type(None)})  # the value types a flat dict's key takes as they are


def _piece(raw: Any, convert: Callable[[Any], Any] | None) -> tuple[Any, str]:
    """(the scrubbed item, its JSON text) of one item, from the cache when ``raw`` is unchanged
    or is a flat dict equal to one rendered before."""
    if type(raw) is not dict:
        clean = scrub_message(raw if convert is None else convert(raw))
        return clean, _dumps(clean)
    key = id(raw)
    content, calls = raw.get("content"), raw.get("tool_calls")
    version = redaction.secrets_version
    if convert is not None:
        hit = _pieces.get(key)
        if hit is not None and hit[0] is raw and hit[1] is content and hit[2] is calls and hit[5] == version:
            return hit[3], hit[4]
    # the same message again in another agent's history (AG2 copies each message into every
    # recipient's, its tool calls the same list), a system message or a text part: equal flat
    # dicts give equal pieces, and so do dicts whose other values are the same objects (by
    # identity: the entry keeps them, so no other object takes their id meanwhile)
    flat: tuple[Any, ...] | None = (convert, *raw.items())
    shared: tuple[Any, ...] = ()
    if not _TEXT_OR_NONE.issuperset(map(type, raw.values())):  # a value neither None nor a str (tested in C)
        if convert is None:  # an output message, built afresh for each span: its text parts by value
            pairs = [(k, v if v is None or type(v) is str else _parts_key(v)) for k, v in raw.items()]
            flat = (convert, *pairs) if all(v is not None for _, v in pairs) else None
        else:
            shared = tuple(v for v in raw.values() if v is not None and type(v) is not str)
            flat = (convert, *[(k, v if v is None or type(v) is str else id(v)) for k, v in raw.items()])
    if flat is not None:
        try:
            same = _flat_pieces.get(flat)
        except TypeError:  # an unhashable key
            same, flat = None, None
        if same is not None and same[2] == version:
            if convert is not None:
                with _pieces_lock:
                    _remember(_pieces, key, (raw, content, calls, same[0], same[1], version))
            return same[0], same[1]
    clean = scrub_message(raw if convert is None else convert(raw))
    piece = _dumps(clean)
    if len(piece) > _PIECE_CHARS or redaction.secrets_version != version:
        return clean, piece  # (scrub learned a secret: made with a newer version than the one read)
    with _pieces_lock:
        if convert is not None:
            _remember(_pieces, key, (raw, content, calls, clean, piece, version))
        if flat is not None:
            _remember(_flat_pieces, flat, (clean, piece, version, shared))
    return clean, piece


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    if len(cache) > _PIECES_MAX:
        cache.popitem(last=False)


def _render(items: Sequence[Any], budget: int, convert: Callable[[Any], Any] | None) -> tuple[list[str], int]:
    kept: list[str] = []
    size = 2  # the brackets
    index = len(items) - 1
    while index >= 0:
        clean, piece = _piece(items[index], convert)
        extra = len(piece) + (2 if kept else 0)
        if size + extra > budget:
            room = budget - size - (2 if kept else 0)
            if not kept or room >= MIN_PARTIAL:
                fitted = _fit(clean, room)
                if fitted is not None:
                    kept.append(fitted)
                    index -= 1
            break
        kept.append(piece)
        size += extra
        index -= 1
    dropped = index + 1
    if dropped:
        learn_secrets_ahead(items[:dropped])
    kept.reverse()
    return kept, dropped


def _message_texts(items: Sequence[Any]) -> Iterator[Any]:
    """The text of each message and each text part, in order (for :func:`learn_split_secrets`)."""
    for raw in items:
        content = raw.get("content") if isinstance(raw, Mapping) else raw
        if isinstance(content, (list, tuple)):
            for part in content:
                yield part.get("text") if isinstance(part, Mapping) else part
        else:
            yield content


# Histories rendered before, by their first message's identity: AG2 sends an agent's history
# again on every turn (its invoke_agent span, then its model call), grown by a few messages, so a
# rendering resumes from the longest one its messages begin with (the same dicts, their content
# and tool calls the same objects or equal) and converts, searches and redacts only the messages
# after it. A record holds only what was made with the secrets_version it names: its pieces, the
# number of leading messages walked by learn_secrets_ahead, their redactions when all were kept.
_HISTORIES_MAX = 64
_HISTORIES_PER_FIRST = 4
_HISTORY_CHARS = 131072  # pieces kept per record at most (the attribute bound is 4096 by default)
_HISTORY_FRESH = 64  # a history this long or longer with no record is rendered the general way


class _History:
    __slots__ = ("calls", "contents", "items", "pieces", "redacted", "size", "texts", "version", "walked")

    def __init__(self, items: tuple[Any, ...], contents: tuple[Any, ...], calls: tuple[Any, ...],
                 texts: list[str], version: int, pieces: list[str], size: int, redacted: Any,
                 walked: int) -> None:
        self.items, self.contents, self.calls, self.texts = items, contents, calls, texts
        self.version, self.pieces, self.size, self.redacted = version, pieces, size, redacted
        self.walked = walked


_histories: OrderedDict[int, list[_History]] = OrderedDict()


def _split_texts(items: Iterable[Any]) -> list[str]:
    return [text for text in _message_texts(items) if isinstance(text, str) and text]


def learn_reply_split(history: Any, replies: Sequence[dict[str, Any]]) -> None:
    """Search the boundary between the last message of a model call's ``history`` and its ``replies`` (output
    messages, as :func:`output_message` makes them) for a secret cut there (``Use this api_key=`` | ``<key> for the
    next run``): the reply is recorded before any later history holds both."""
    if isinstance(history, (list, tuple)) and history and replies:
        texts = [part.get("content") for reply in replies for part in reply.get("parts", ())
                 if part.get("type") == "text"]
        learn_split_texts(_split_texts(history[-1:])[-1:] + [text for text in texts if isinstance(text, str) and text])


def _render_history(items: Sequence[Any], bound: int) -> tuple[str, int] | bool:
    """:func:`render` of AG2 messages (every item a dict) with ``convert=message``, the same text,
    resumed from an earlier rendering of the same history. False: not such a list (or a long one
    seen first), nothing done; True: the split-secret search is done, render the general way."""
    count = len(items)
    if not count or set(map(type, items)) != {dict}:
        return False
    first = items[0]
    contents = tuple(map(dict.get, items, repeat("content", count)))
    calls = tuple(map(dict.get, items, repeat("tool_calls", count)))
    best: _History | None = None
    for record in _histories.get(id(first), ()):
        done = len(record.items)
        if done <= count and (best is None or done > len(best.items)) and record.items[0] is first \
                and record.contents == contents[:done] and record.calls == calls[:done] \
                and all(map(is_, record.items, items)):
            best = record
    if best is None and count >= _HISTORY_FRESH:
        return False
    done = len(best.items) if best is not None else 0
    texts = best.texts + _split_texts(items[done:]) if best is not None else _split_texts(items)
    learn_split_texts(texts)  # first: it may learn a secret, and the pieces must be made with it
    version = redaction.secrets_version
    if best is not None and best.version != version:
        best, done = None, 0
    pieces = best.pieces + [_piece(raw, message)[1] for raw in items[done:]] if best is not None \
        else [_piece(raw, message)[1] for raw in items]
    size = best.size if best is not None else 0
    for piece in pieces[done:]:
        size += len(piece) + 2
    walked = best.walked if best is not None else 0
    redacted = None
    if size <= bound:  # every message fits: 2 + their lengths + 2 per ", " = size
        kept, dropped = pieces, 0
        text = "[" + ", ".join(pieces) + "]"
        if redaction.secrets_version != version:
            return True  # a secret was learned meanwhile
        final, redacted = redact_list_from(pieces, best.redacted if best is not None else None)
    else:  # _render's choice, newest first: j messages whole, then maybe one cut to fit
        sizes = list(accumulate(map(add, map(len, reversed(pieces)), repeat(2))))
        whole = bisect_right(sizes, bound)
        used = sizes[whole - 1] if whole else 2
        room = bound - used - (2 if whole else 0)
        kept = pieces[count - whole:]
        dropped = count - whole
        fitted = None
        if not whole or room >= MIN_PARTIAL:
            fitted = _fit(_piece(items[dropped - 1], message)[0], room)
            if fitted is not None:
                kept = [fitted, *kept]
                dropped -= 1
        if dropped > walked:  # the messages left out are still read for secrets they would teach
            learn_secrets_ahead(items[walked:dropped])
            walked = dropped
        text = "[" + ", ".join(kept) + "]"
        if redaction.secrets_version != version:
            return True
        # every piece's redaction (resumed: the new ones only), then the kept ones joined
        redacted = redact_list_from(pieces, best.redacted if best is not None else None)[1]
        final = redact_list_tail(redacted, count - whole, fitted)
        if final is None:
            final = redact_list(kept)
    if final != text or len(final) > bound or redaction.secrets_version != version:
        return True  # a secret was replaced: the general way checks the JSON and the bound
    # a record keeps its messages alive: none whose piece is long (nor, so, its content)
    if size <= _HISTORY_CHARS and (len(pieces) == done or max(map(len, pieces[done:])) <= _PIECE_CHARS):
        record = _History(tuple(items), contents, calls, texts, version, pieces, size, redacted, walked)
        with _pieces_lock:
            kept_records = [r for r in _histories.get(id(first), ()) if r.version == version and r is not best]
            del kept_records[:-(_HISTORIES_PER_FIRST - 1)]
            kept_records.append(record)
            _histories[id(first)] = kept_records
            _histories.move_to_end(id(first))
            if len(_histories) > _HISTORIES_MAX:
                _histories.popitem(last=False)
    return final, dropped


def render(items: Sequence[Any], bound: int | None = None,
           convert: Callable[[Any], Any] | None = None) -> tuple[str, int]:
    """(JSON text of ``items``, number of items left out), redacted, at most ``bound`` characters
    (default: the attribute bound) and always valid JSON; newest (last) items kept first.

    ``convert`` (e.g. :func:`message`) turns each raw item into its schema form, only for the
    items that are kept.

    A secret learned while rendering (a password in a later message's tool call) is redacted in
    every item: when rendering learned one, the items are rendered again, so the text never depends
    on whether an earlier call had learned it already.
    """
    version = redaction.secrets_version
    out = _render_once(items, bound, convert)
    if redaction.secrets_version != version:
        out = _render_once(items, bound, convert)
    return out


def _render_once(items: Sequence[Any], bound: int | None, convert: Callable[[Any], Any] | None) -> tuple[str, int]:
    bound = bound or attribute_bound()
    budget = bound
    if convert is message:
        fast = _render_history(items, bound)
        if fast is False:
            learn_split_secrets(_message_texts(items))  # and the encoded forms of learned secrets
        elif fast is not True:
            return fast  # type: ignore[return-value]
    else:
        learn_encoded_in(items)  # a model's reply quoting a learned password base64-encoded
    for _ in range(3):
        kept, dropped = _render(items, budget, convert)
        text = "[" + ", ".join(kept) + "]"
        final = redact_list(kept)
        if final != text:
            # a secret replaced by the marker can change the length; the marker never breaks
            # JSON, but verify rather than assume
            try:
                loads(final)
            except ValueError:
                logger.debug("cmbagent_otel: redaction broke message JSON; content left out")
                return "[]", len(items)
        if len(final) <= bound:
            return final, dropped
        budget -= len(final) - bound + 16
    return "[]", len(items)


def render_value(value: Any, bound: int | None = None) -> str:
    """Any JSON value (tool arguments, tool result) as redacted JSON text of at most ``bound`` characters."""
    bound = bound or attribute_bound()
    clean = scrub(value)
    text = _fit(clean, bound)
    if text is None:
        text = _dumps(truncate(_dumps(clean), max(bound // 2, _MIN_STRING)))
    final = redact(text) or "null"
    if final != text:
        try:
            loads(final)
        except ValueError:
            return _dumps("[REDACTED]")
    if len(final) > bound:
        return _dumps(truncate(final, max(bound // 2 - 2, _MIN_STRING)))
    return final
