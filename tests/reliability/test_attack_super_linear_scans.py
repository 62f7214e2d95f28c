"""Eighteenth campaign (attacks): text whose redaction cost grows faster than its length.

The ``key: value`` scan of :mod:`cmbagent_otel.redaction` runs on the application's thread for
every exception message, tool argument (content capture off too) and captured message. Two
forms made it quadratic in the length of one run of key-name characters:

* a run holding a hint after each non-ASCII letter (``"keyé" * n``): each hint's name (the run's
  suffix after that letter) was judged by the secret-name pattern again (40,000 characters took
  38 s of CPU; a 64 KiB attribute over 100 s);
* a message whose ``key``-hints fill a run followed by an open quote (``"key" * n + ':"'``):
  :func:`redaction._kv_open`, which every captured message goes through, matched the key pattern
  from every hint and walked the run back each time (20,000 characters: 32 s).

Both scans now judge a run once (a later name inside it is a suffix of the one judged, which can
only be secret as one of the whole short names ``auth``, ``pass``, ``pwd``, ``sig``).

The tests run under a CPU-time alarm (``ITIMER_VIRTUAL``) of 20 s: a liveness bound, not a speed
target. The linear scans need under 0.05 s for these texts (a 400x margin); the quadratic ones
needed minutes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import redaction

from .conftest import Capture, group_chat, instrumented_with, needs_custom_client, outcome
from .test_adversarial_text import cpu_alarm, marker

CPU_BOUND_S = 20


# ~120,000 characters each: one run of name characters with a hint after every non-ASCII letter
NON_ASCII_RUNS = [
    "keyé" * 30_000,
    "tokenü_" * 17_000,
    "passЖ" * 24_000,
]


@pytest.mark.parametrize("run", NON_ASCII_RUNS, ids=lambda t: repr(t[:7]))
def test_a_run_with_non_ascii_letters_is_judged_once(run: str) -> None:
    secret = marker()
    with cpu_alarm(CPU_BOUND_S):
        out = redaction.redact(f"{run}: x password={secret}")
    assert secret not in out and out.endswith(f"password={redaction.REDACTED}")


@pytest.mark.parametrize("text, secret_named", [
    ("keyépass", True),        # the whole short name after the letter: still a secret name
    ("keyé_pass", False),      # "_pass" is no secret name
    ("keyéxpass", False),
    ("éauth", True),
    ("monkeyüpwd", True),
    ("monkeyütoken", True),    # a secret name as a whole too
    ("monkeyüsigma", False),
])
def test_names_after_a_non_ascii_letter_are_judged_as_before(text: str, secret_named: bool) -> None:
    """The short-cut keeps the verdicts: a suffix after a non-ASCII letter is secret only where
    the whole name is, or as one of the whole short names."""
    value = marker()
    out = redaction.redact(f"{text}={value}")
    assert (out == f"{text}={redaction.REDACTED}") is secret_named, out
    # a single quote: a double one is escaped in JSON (\\"), closed by the end of its JSON string
    item = json.dumps({"content": f"{text}: 'open"}, ensure_ascii=False)
    assert (redaction._item_flag(item) == "open") is secret_named


def test_a_message_full_of_key_hints_before_an_open_quote_is_flagged_once() -> None:
    item = json.dumps({"content": "key" * 40_000 + ': "x'})
    with cpu_alarm(CPU_BOUND_S):
        flag = redaction._item_flag(item)
        joined = redaction.redact_list([item, json.dumps({"content": "ok"})])
    assert flag == "joins"  # "key...key" is no secret name
    assert joined.startswith('[{"content": "keykey')


def _unclosed_quotes(kinds: int, key: str = "pwd:") -> str:
    """Keys whose quoted values never close on their line: each quote has fewer backslashes than
    the one before (a quote closes only at the same quote, backslashes included)."""
    return "".join(f"{key}{chr(92) * k}\"x " for k in range(kinds, 0, -1))


@pytest.mark.parametrize("key", ["pwd:", " secret_key=", "'token': "])
def test_unclosed_quoted_values_are_searched_once_per_line(key: str) -> None:
    """Each value's closing quote was searched by a regex comparing the quote's backslashes at every
    character up to the line's end: ~260 KB took 58 s of CPU (64 KiB 3.8 s)."""
    secret = marker()
    text = _unclosed_quotes(720, key) + f"\npassword={secret}"
    with cpu_alarm(CPU_BOUND_S):
        out = redaction.redact(text)
        flag = redaction._item_flag(json.dumps({"content": text + " pwd: 'open"}, ensure_ascii=False))
    assert secret not in out and out.endswith(f"password={redaction.REDACTED}")
    assert out.startswith(_unclosed_quotes(720, key)[:200])  # the text before the first value stays
    assert flag == "open"


@pytest.mark.parametrize("text, expected", [
    ('password: "a b" and password: "c"', 'password: "[REDACTED]" and password: "[REDACTED]"'),
    ('{"password": "p1\\"q"}', '{"password": "[REDACTED]"}'),  # nineteenth campaign: a backslash-quote is the value's
    ('pwd: \\"s3cr3t\\" and more', 'pwd: \\"[REDACTED]\\" and more'),
    ('pwd: "open\nsecond: "line"', 'pwd: "open\nsecond: "line"'),  # never across a line break
    ("pwd: 'x' pwd: 'y", "pwd: '[REDACTED]' pwd: 'y"),
    ("token: Bearer abc.def, x", "token: [REDACTED], x"),
])
def test_quoted_and_bare_values_are_found_as_before(text: str, expected: str) -> None:
    assert redaction.redact(text) == expected


@needs_custom_client
def test_hostile_runs_in_a_captured_chat_do_not_hold_the_application(tmp_path: Path) -> None:
    """Content capture on: the model's tool arguments and its message (every later model call sends
    it again) go through both scans; the application's results are those of the plain run."""
    note = "keyé" * 30_000 + ": x"
    script = [{"tool_calls": [{"id": "call_adv_1", "name": "peak_position",
                               "arguments": {"multipole": 2, "note": note}}]},
              "key" * 40_000 + ': "open quote\n```python\nprint(\'peaks\')\n```']

    def tool(multipole: int, note: str = "") -> str:
        return f"peak near l={220 * multipole} ({len(note)} chars of notes)"

    def run(work_dir: Path) -> Any:
        return group_chat(work_dir, engineer_script=script, tool=tool)

    plain = outcome(lambda: run(tmp_path / "plain"))
    cap = Capture()
    with cpu_alarm(CPU_BOUND_S), instrumented_with(cap, capture_content=True):
        traced = outcome(lambda: run(tmp_path / "traced"))
    assert traced == plain and plain[0] == "ok"
    assert cap.named("execute_tool peak_position")
