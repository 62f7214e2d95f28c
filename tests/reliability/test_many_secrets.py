"""A process that registers many secrets (a service running each request with the user's own API
key) stays as cheap per new secret as one with a few, and still redacts every one of them.

Before: every new secret compiled one pattern of all known secrets (and ``re`` kept the last
512 of those patterns): 1000 keys took 31 s of CPU, the last 500 23 s of it, and 200 MiB.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import pytest

from cmbagent_otel import redaction


def key() -> str:
    return "tenant-" + secrets.token_hex(12)


def test_each_new_secret_compiles_a_bounded_pattern(isolated_secrets: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(4 * redaction._CHUNK):
        redaction.register_secret(key())
    compiled: list[int] = []
    real = re.compile

    def counting(pattern: Any, flags: int = 0) -> Any:
        compiled.append(len(pattern))
        return real(pattern, flags)

    monkeypatch.setattr(re, "compile", counting)
    for _ in range(20):
        redaction.register_secret(key())
    # a chunk of secrets at most (each ~31 characters in the pattern), never all of them
    assert 0 < max(compiled) < (redaction._CHUNK + 1) * len(key())
    assert sum(compiled) < 20 * (redaction._CHUNK + 1) * len(key())


def test_every_one_of_many_secrets_is_redacted(isolated_secrets: None) -> None:
    keys = [key() for _ in range(3 * redaction._CHUNK + 5)]
    for value in keys:
        redaction.register_secret(value)
    # a secret and a longer one starting with it, registered in different chunks, and a learned one
    short = keys[0][:20]
    redaction.register_secret(short)
    learned = "learned-" + secrets.token_hex(10)
    assert redaction.redact(f'{{"password": "{learned}"}}') == '{"password": "[REDACTED]"}'
    text = " | ".join([*keys[::7], keys[0], short, learned, keys[-1] + keys[-2]])
    out = redaction.redact(text)
    assert out is not None
    for value in (*keys, short, learned):
        assert value not in out
        assert value[6:] not in out  # no part of a secret shows either (overlapping matches joined)
    assert out.count(redaction.REDACTED) == len(keys[::7]) + 5  # the last two keys side by side: two
