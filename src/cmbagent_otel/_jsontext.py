"""Compact JSON text with one reusable C encoder (``json.dumps`` builds a new one per call)."""

from __future__ import annotations

import json
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
