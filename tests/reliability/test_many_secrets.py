"""A process that registers many secrets (a service running each request with the user's own API
key) stays as cheap per new secret as one with a few, and still redacts every one of them.

Before: every new secret compiled one pattern of all known secrets (and ``re`` kept the last
512 of those patterns): 1000 keys took 31 s of CPU, the last 500 23 s of it, and 200 MiB.
Then (until session 30) past the first 128 secrets: their last chunk of up to 128, 2-15 ms of CPU
per key at 1,000 keys (``bench/bench_secrets.py``); now the few recent ones, and a settled group
every 16 keys.
"""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
import statistics
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest

from cmbagent_otel import redaction
from tests.conftest import client_key

from .conftest import needs_custom_client
from .test_secrets import Sink, assert_clean, echo_agent, instrument, sink  # noqa: F401 (sink: fixture)


def key() -> str:
    return "tenant-" + secrets.token_hex(12)


def test_each_new_secret_compiles_a_bounded_pattern(isolated_secrets: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(redaction._SEALED_MAX + 4 * redaction._CHUNK):
        redaction.register_secret(key())
    compiled: list[int] = []
    real = re.compile

    def counting(pattern: Any, flags: int = 0) -> Any:
        compiled.append(len(pattern))
        return real(pattern, flags)

    monkeypatch.setattr(re, "compile", counting)
    for _ in range(20):
        redaction.register_secret(key())
    # merged chunks of secrets at most (each ~31 characters in the pattern), never all of them
    assert 0 < max(compiled) < (redaction._SEALED_MAX + 1) * len(key())
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


@contextlib.contextmanager
def counting_compiles() -> Iterator[list[int]]:
    """The length of every pattern ``re.compile`` is asked for inside the block."""
    compiled: list[int] = []
    real = re.compile

    def counting(pattern: Any, flags: int = 0) -> Any:
        compiled.append(len(pattern))
        return real(pattern, flags)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(re, "compile", counting)
        yield compiled


def test_one_more_key_compiles_a_few_keys_not_the_last_chunk(isolated_secrets: None) -> None:
    for _ in range(1000):
        redaction.register_secret(key())
    per_key: list[int] = []
    for _ in range(2 * redaction._CHUNK):
        with counting_compiles() as compiled:
            redaction.register_secret(key())
        assert compiled, "a new secret must be compiled into some pattern"
        per_key.append(sum(compiled))
    # the recent ones (fewer than _RECENT) with each new one, the settled ones every _RECENT keys,
    # a merged chunk once (here: 1,024 secrets at the 1,025th): ~15 keys' worth on average, ~8 the
    # median (before: the last chunk, ~53 keys' worth on average and as the median)
    assert statistics.mean(per_key) < 24 * len(key())
    assert statistics.median(per_key) < redaction._RECENT * len(key())


def test_an_applications_keys_and_learned_values_stay_one_pattern(isolated_secrets: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pattern is one more search of every text redacted: up to a chunk of secrets (the first
    keys with their encoded forms among them) they are one pattern, as cheap to search as before,
    whatever registering one more costs."""
    for name, empty in (("_known", {}), ("_learned", OrderedDict()), ("_forms", set()), ("_encoded_count", 0)):
        monkeypatch.setattr(redaction, name, empty)  # an application's own: not the session's tests' keys
    keys = [key() for _ in range(30)]
    for value in keys:
        redaction.register_secret(value)
    learned = ["learned-" + secrets.token_hex(8) for _ in range(3)]
    for value in learned:
        redaction.learn_secret(value)
    assert isinstance(redaction._known_pattern, re.Pattern)
    out = redaction.redact(" ".join([*keys, *learned, base64.b64encode(keys[7].encode()).decode()]))
    assert out is not None and out.count(redaction.REDACTED) == len(keys) + len(learned) + 1


@needs_custom_client
def test_a_key_registered_after_2000_others_is_redacted_everywhere(
        isolated_secrets: None, sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans, DB rows and our logs at DEBUG: the agent's key (registered from its llm_config after 2,000 others,
    in the groups after the last full chunk), the first key and its encoded forms (in the first
    chunk), and a key from the middle."""
    monkeypatch.setattr(redaction, "_encoded_count", 0)
    first = "FIRSTKEY" + secrets.token_hex(12)
    redaction.register_secret(first)
    others = [key() for _ in range(2000)]
    for value in others:
        redaction.register_secret(value)
    middle = others[1234]
    late = "LATEKEY" + secrets.token_hex(12)
    config = {"model": "scripted", client_key(): "ScriptedModelClient", "api_key": late}
    instrument(sink)
    raw = first.encode()
    encoded = (raw.hex(), base64.b64encode(raw).decode())
    assistant = echo_agent("assistant", f"my key is {late}; the first was {first} ({encoded[0]}, {encoded[1]})", config)
    user = echo_agent("user", "thanks", config)
    user.initiate_chat(assistant, message=f"keys: {late}, {middle} and {first} as {encoded[1]}", max_turns=1,
                       silent=True)
    assert redaction.is_registered(late)
    assert_clean(sink, caplog, late, middle, first, encoded[0], encoded[1][:-4])
