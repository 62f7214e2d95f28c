"""Compact JSON text with one reusable C encoder (``json.dumps`` builds a new one per call), and a
parse that refuses a document nested too deep as invalid (:func:`loads`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any


def loads(text: str | bytes) -> Any:
    """``json.loads``, refusing a document nested deeper than the parser goes as it refuses any
    other invalid one: with ``ValueError``.

    The C parser raises ``RecursionError`` for nesting past the interpreter's recursion limit
    (``"[" * 100_000``: 200 KB), which no ``except ValueError`` caught: one such attribute of an
    ingest client's span failed its whole request, one such row of another writer made the CLI
    end in a traceback and the writer refuse every batch of that run.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def compact_encoder(default: Callable[[Any], Any], *, ensure_ascii: bool) -> Callable[[Any], str]:
    """A function giving ``json.dumps(value, default=default, ensure_ascii=ensure_ascii)``.

    Without the circular-reference check: only for values known to be acyclic (scrubbed
    copies, database rows), where that check is pure cost.
    """
    quote = json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator: the stdlib encoder, built once
        return json.JSONEncoder(default=default, ensure_ascii=ensure_ascii, check_circular=False).encode
    iterencode = make(None, default, quote, None, ": ", ", ", False, False, True)

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return quote(value)  # type: ignore[no-any-return]
        return "".join(iterencode(value, 0))

    return encode


def standard_encoder(default: Callable[[Any], Any], *, ensure_ascii: bool,
                     compact: bool = False) -> Callable[[Any], str]:
    """:func:`compact_encoder` whose text is always standard JSON (``compact``: without the spaces
    after ``,`` and ``:``).

    Python writes non-finite floats as bare ``NaN``/``Infinity``, which PostgreSQL's ``json``
    type (and every JSON parser but Python's) refuses: one such attribute value made its whole
    batch fail there. They become the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``
    (as the protobuf JSON mapping writes them). Values without one cost one encoding, as before.
    """
    quote = json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    iterencode = strict_iterencode(default, ensure_ascii=ensure_ascii, compact=compact)
    if iterencode is None:
        strict: Callable[[Any], str] = json.JSONEncoder(
            default=default, ensure_ascii=ensure_ascii, check_circular=False, allow_nan=False,
            separators=(",", ":") if compact else (", ", ": ")).encode
    else:

        def strict(value: Any) -> str:
            return "".join(iterencode(value, 0))

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return quote(value)  # type: ignore[no-any-return]
        try:
            return strict(value)
        except ValueError:  # "Out of range float values are not JSON compliant"
            return strict(finite(value))

    return encode


def strict_iterencode(default: Callable[[Any], Any], *, ensure_ascii: bool,
                      compact: bool = False) -> Callable[[Any, int], Any] | None:
    """The C encoder :func:`standard_encoder` joins: ``"".join(it(value, 0))`` is the JSON text of
    ``value`` (a top-level string included; ``compact``: no spaces after ``,`` and ``:``, as
    :func:`row_json_encoders` writes), raising ValueError on a non-finite float; None without
    the C accelerator."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    quote = json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    colon, comma = (":", ",") if compact else (": ", ", ")
    return make(None, default, quote, None, colon, comma, False, False, False)  # type: ignore[no-any-return]


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (values and keys, at any depth) as its JSON string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else _NON_FINITE[str(value)]
    if isinstance(value, dict):
        return {finite(k) if isinstance(k, float) else k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


# --- the DAG rows' JSON text ---------------------------------------------------------------

try:  # a C library ~3.5x faster than json's C encoder for these values; optional
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency; without it json's encoder
    _orjson = None  # type: ignore[assignment]

# Dates, times and dataclasses go through the default (str) as json.dumps(default=str) has it,
# not orjson's own forms (RFC 3339 with "T", a dataclass as an object)
ORJSON_OPTION = 0 if _orjson is None else _orjson.OPT_PASSTHROUGH_DATETIME | _orjson.OPT_PASSTHROUGH_DATACLASS
orjson_dumps: Callable[..., bytes] | None = None if _orjson is None else _orjson.dumps


def orjson_default(value: Any) -> Any:
    """What ``json.dumps(value, default=str)`` makes of a value orjson does not encode itself: a
    float subclass (numpy's float64) is its number, a named tuple a list, anything else its str."""
    if isinstance(value, float):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def row_json_encoders() -> tuple[Callable[[Any], str], Callable[[Any], str]]:
    """``(encode, standard)``: ``encode`` gives the compact, ASCII-only, standard JSON text of a
    row's JSON value: the values ``json.dumps(value, default=str)`` writes (non-finite floats as
    :func:`standard_encoder` has them), without its spaces after ``,`` and ``:``.

    orjson writes it when installed and the value is one it writes exactly so; the standard
    library's (:func:`standard_encoder`) otherwise: for text that is not ASCII (json escapes
    it), a value holding a NaN or an infinity (orjson writes them as ``null``; looked for, by
    :func:`has_non_finite`, only when the text holds ``null``) and values orjson refuses (keys
    other than str, ints past 64 bits, lone surrogates, nesting past 254).
    Both write the same values; only a float's exponent may be spelt differently (``1e-05``
    and ``0.00001``). ``standard`` is that fallback alone (the same text without orjson).
    """
    standard = standard_encoder(str, ensure_ascii=True, compact=True)
    if orjson_dumps is None:
        return standard, standard
    dumps, option = orjson_dumps, ORJSON_OPTION

    def encode(value: Any) -> str:
        try:
            out = dumps(value, orjson_default, option)
        except TypeError:  # orjson.JSONEncodeError
            return standard(value)
        # find() is ~1.6x faster than the in operator on such text
        if out.isascii() and (out.find(b"null") < 0 or not has_non_finite(value)):
            return out.decode()
        return standard(value)

    return encode, standard


_SCALARS = frozenset({str, int, bool, type(None)})


def has_non_finite(value: Any) -> bool:
    """Whether ``value`` holds a NaN or an infinity (a float, or a float subclass, in any list,
    tuple or dict value at any depth): the values orjson writes as ``null``."""
    kind = type(value)
    if kind is dict:
        items: Any = value.values()
    elif kind is list or kind is tuple:
        items = value
    else:
        return kind not in _SCALARS and isinstance(value, float) and not math.isfinite(value)
    # the item types are checked in C: a container of text, ints and None is done in one call
    if _SCALARS.issuperset(map(type, items)):
        return False
    for item in items:  # noqa: SIM110 - a loop, not any() over a generator: no generator frame per container
        if type(item) not in _SCALARS and has_non_finite(item):
            return True
    return False
