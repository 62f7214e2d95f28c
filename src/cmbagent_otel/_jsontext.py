"""Compact JSON text with one reusable C encoder (``json.dumps`` builds a new one per call)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any


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


def standard_encoder(default: Callable[[Any], Any], *, ensure_ascii: bool) -> Callable[[Any], str]:
    """:func:`compact_encoder` whose text is always standard JSON.

    Python writes non-finite floats as bare ``NaN``/``Infinity``, which PostgreSQL's ``json``
    type (and every JSON parser but Python's) refuses: one such attribute value made its whole
    batch fail there. They become the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``
    (as the protobuf JSON mapping writes them). Values without one cost one encoding, as before.
    """
    quote = json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    iterencode = strict_iterencode(default, ensure_ascii=ensure_ascii)
    if iterencode is None:
        strict: Callable[[Any], str] = json.JSONEncoder(default=default, ensure_ascii=ensure_ascii,
                                                         check_circular=False, allow_nan=False).encode
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


def strict_iterencode(default: Callable[[Any], Any], *, ensure_ascii: bool) -> Callable[[Any, int], Any] | None:
    """The C encoder :func:`standard_encoder` joins: ``"".join(it(value, 0))`` is the compact JSON
    text of ``value`` (a top-level string included), raising ValueError on a non-finite float;
    None without the C accelerator."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    quote = json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    return make(None, default, quote, None, ": ", ", ", False, False, False)  # type: ignore[no-any-return]


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
