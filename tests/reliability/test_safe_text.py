"""safe_text() of a message list stops serialising once the bound is passed; the text it
returns must be exactly what redacting and truncating the whole serialisation gives."""

from __future__ import annotations

import json
import random
import secrets
from typing import Any

import pytest

from cmbagent_otel import redaction


def reference(value: Any, limit: int | None) -> str | None:
    """safe_text as it was: scrub, serialise everything, redact, truncate."""
    text = json.dumps(redaction.scrub(value), default=repr, ensure_ascii=False)
    return redaction.truncate(redaction.redact(text), limit)


class Opaque:
    def __repr__(self) -> str:
        return "Opaque(sk-" + "q" * 24 + ")"


def random_text(rng: random.Random, secret: str) -> str:
    words = ["peak", "l=440", "ü", "\"quoted\"", "back\\slash", "line\nbreak", secret,
             "sk-" + "a" * rng.randint(12, 400),  # shaped secrets: redaction shrinks the text
             "Bearer " + "t" * rng.randint(8, 60), "x" * rng.randint(0, 900)]
    return " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))


def random_message(rng: random.Random, secret: str) -> Any:
    kind = rng.randrange(7)
    if kind == 6:  # a secret deep under a secret-named key, learned only by walking this message
        return {"config": [{"headers": {"Authorization": secret}}], "content": random_text(rng, secret)}
    if kind == 0:
        return {"role": "user", "name": "engineer", "content": random_text(rng, secret)}
    if kind == 1:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{rng.randrange(99)}", "function": {"name": "fit", "arguments": random_text(rng, secret)}}]}
    if kind == 2:
        return {"api_key": secret, "content": random_text(rng, secret)}  # secret-named key
    if kind == 3:
        return (random_text(rng, secret), rng.random(), None, True)
    if kind == 4:
        return Opaque()
    return random_text(rng, secret)


@pytest.mark.parametrize("seed", range(60))
def test_bounded_list_serialisation_equals_full(seed: int) -> None:
    rng = random.Random(seed)
    secret = f"MARKER{secrets.token_hex(8)}"
    if seed % 2:
        redaction.register_secret(secret)
    messages = [random_message(rng, secret) for _ in range(rng.randint(0, 60))]
    for limit in (None, 64, 300, rng.randint(1, 5000)):
        for value in (messages, tuple(messages)):
            assert redaction.safe_text(value, limit) == reference(value, limit)


def test_a_secret_with_a_comma_turns_the_shortcut_off(isolated_secrets: None) -> None:
    head, tail = secrets.token_hex(1500), secrets.token_hex(6)
    redaction.register_secret(f'{head}", "{tail}')  # json puts '", "' between two items
    messages = ["x" * 2000 + head, tail]  # the first item alone passes the bound
    text = redaction.safe_text(messages)
    assert text == reference(messages, None)
    assert text is not None and head[:64] not in text and redaction.REDACTED in text
