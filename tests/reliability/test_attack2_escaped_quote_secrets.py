"""Nineteenth campaign (attacks: leftovers): a secret value holding an escaped quote.

A quoted value of a secret-named key ended at the first repetition of its quote, escaped or not:
``{"password": "abc\\"def<secret>"}`` showed ``def<secret>`` after the ``[REDACTED]`` (JSON),
as did ``'ab\\'cd<secret>'`` (a Python repr), ``'ab''cd<secret>'`` (SQL, CSV's ``""``), the same
inside a JSON string (``\\"abc\\\\\\"def\\"``) and a bare value holding a quote
(``?password=ab"cd<secret>``). The whole value is redacted now, wherever the text goes: tool
arguments, captured messages, exception messages, log lines.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import redaction, semconv

from .conftest import Capture, group_chat, instrumented_with, needs_custom_client, outcome
from .test_adversarial_text import cpu_alarm


def marker() -> str:
    return f"TAIL{secrets.token_hex(12)}"  # shapeless: only the key name tells it is a secret


# (form, template): "{tail}" is the part of the value after its escaped quote
FORMS = [
    ("json", '{"password": "abc\\"def{tail}"}'),
    ("json, value ending in an escaped backslash", '{"password": "abc\\\\\\"def{tail}", "user": "ana"}'),
    ("json, escaped quote then more quotes", '{"api_key": "a\\"b\\"c{tail}\\"", "n": 1}'),
    ("json inside a json string", json.dumps({"args": json.dumps({"password": 'abc"def{tail}'})})),
    ("json inside json inside json", json.dumps({"a": json.dumps({"b": json.dumps({"secret": 'x"y{tail}'})})})),
    ("python repr", "{'api_key': 'ab\\'cd{tail}', 'user': 'ana'}"),
    ("sql doubled quote", "UPDATE users SET password = 'ab''cd{tail}' WHERE id = 7"),
    ("csv doubled quote", 'user,"token=""x""",pwd="ab""cd{tail}"'),
    ("exception message", "ValueError: login failed for token='ab\\'cd{tail}' (retrying)"),
    ("log line", 'INFO connecting with secret="ab\\"cd{tail}" to host'),
    ("db url query", "postgresql://db.example/app?sslmode=require&password=ab\"cd{tail}&x=1"),
    ("db url query, single quote", "mysql://db.example/app?password=ab'cd{tail}"),
    ("escaped json, bare value", '{"content": "connect with password=ab\\"cd{tail} now"}'),
    # a backslash inside a bare value ended it, and the rest was shown (the nineteenth campaign left it)
    ("bare value with a backslash", "connect with password=ab\\cd{tail} now"),
    ("bare value with backslashes, escaped json", '{"content": "login: DOMAIN\\\\user password=x\\\\y{tail}"}'),
]


@pytest.mark.parametrize("template", [t for _, t in FORMS], ids=[name for name, _ in FORMS])
def test_a_value_holding_an_escaped_quote_is_redacted_whole(template: str, isolated_secrets: None) -> None:
    tail = marker()
    text = template.replace("{tail}", tail)
    assert tail in text
    out = redaction.redact(text)
    assert tail not in out, out
    assert redaction.REDACTED in out


@pytest.mark.parametrize("text, expected", [
    ('{"password": "p1\\"q2", "user": "ana"}', '{"password": "[REDACTED]", "user": "ana"}'),
    ('{"password": "p1\\\\", "user": "ana"}', '{"password": "[REDACTED]", "user": "ana"}'),  # ends in a backslash
    ('{"password": "", "user": "ana"}', '{"password": "", "user": "ana"}'),
    ("{'pwd': '', 'user': 'ana'}", "{'pwd': '', 'user': 'ana'}"),
    ("pwd = 'a''b', user = 'ana'", "pwd = '[REDACTED]', user = 'ana'"),
    ("pwd = '''', user = 'ana'", "pwd = '[REDACTED]', user = 'ana'"),  # one quote, doubled
    ('"password=abc" and more', '"password=[REDACTED]" and more'),
    ("x?password=abc', y", "x?password=[REDACTED]', y"),
    ('pwd: \\"s3cr3t\\" and more', 'pwd: \\"[REDACTED]\\" and more'),
    ('pwd: "open\nsecond: "line"', 'pwd: "open\nsecond: "line"'),  # never across a line break
])
def test_the_value_ends_where_its_quote_really_closes(text: str, expected: str) -> None:
    """Nothing of the text around the value is taken: empty values stay empty, the next pair stays."""
    assert redaction.redact(text) == expected


def test_escaped_quote_values_are_redacted_alike_in_a_list_and_alone() -> None:
    """A captured history's items are redacted one by one when that equals redacting them joined."""
    tail = marker()
    items = [json.dumps({"role": "user", "content": f'use {{"password": "ab\\"cd{tail}"}} please'}),
             json.dumps({"role": "assistant", "content": "ok"})]
    joined = redaction.redact_list(items)
    assert tail not in joined
    assert joined == redaction.redact("[" + ", ".join(items) + "]")


@needs_custom_client
@pytest.mark.parametrize("capture", [False, True], ids=["capture-off", "capture-on"])
def test_escaped_quote_passwords_never_reach_spans_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             capture: bool) -> None:
    """A real group chat: the model calls a tool with a JSON password holding \\" and the tool fails
    with a message quoting the password in a Python repr and in SQL."""
    caplog.set_level(logging.DEBUG)
    tail_arg, tail_repr, tail_sql = marker(), marker(), marker()
    script = [{"tool_calls": [{"id": "call_q_1", "name": "peak_position",
                               "arguments": {"multipole": 2, "password": f'ab"cd{tail_arg}'}}]},
              f'The login used {{"password": "ab\\"cd{tail_arg}"}}; done.']

    def tool(multipole: int, password: str = "") -> str:
        raise PermissionError(f"login refused: {{'password': 'ab\\'cd{tail_repr}'}} "
                              f"in UPDATE u SET password = 'ab''cd{tail_sql}'")

    def run(work_dir: Path) -> Any:
        return group_chat(work_dir, engineer_script=script, tool=tool)

    plain = outcome(lambda: run(tmp_path / "plain"))
    cap = Capture()
    with instrumented_with(cap, capture_content=capture):
        traced = outcome(lambda: run(tmp_path / "traced"))
    assert traced == plain
    tools = cap.named("execute_tool peak_position")
    assert tools and tools[0].status.description  # the tool failed, with its error text
    texts: list[tuple[str, str]] = []
    for span in cap.spans:
        texts += [(f"span {span.name} status", str(span.status.description))]
        texts += [(f"span {span.name} attribute {k}", f"{k}={v!r}") for k, v in (span.attributes or {}).items()]
        for event in span.events:
            texts += [(f"span {span.name} event {event.name} {k}", f"{k}={v!r}")
                      for k, v in (event.attributes or {}).items()]
    # our own log lines (the app's libraries log what the app gives them: openai's client logs its requests)
    texts += [(f"log {r.name}", r.getMessage()) for r in caplog.records
              if r.name.split(".")[0] in ("cmbagent_otel", "opentelemetry")]
    if capture:
        arguments = tools[0].attributes[semconv.GEN_AI_TOOL_CALL_ARGUMENTS]
        assert '"multipole": 2' in arguments and redaction.REDACTED in arguments
    assert "login refused" in str(tools[0].status.description)
    leaks = sorted({where for where, text in texts for tail in (tail_arg, tail_repr, tail_sql) if tail in text})
    assert not leaks, f"secret tail leaked into: {leaks}"


# ~250,000 characters each: quotes a value's search must look past (escaped, doubled, or keys whose
# values stay open: each later key's quote has more backslashes, none closes an earlier value)
QUOTE_FLOODS = {
    "escaped quotes": 'pwd="' + '\\"' * 125_000,
    "keys, escaped quotes": 'pwd="\\"x ' * 28_000,
    "keys, doubled quotes": "pwd='''x " * 28_000,
    "keys, odd backslashes": 'pwd:\\"\\\\\\"x ' * 21_000,
    "bare value, quotes": "pwd=a" + '"a' * 125_000,
    "keys left open, rising backslashes": "".join(f'pwd:{chr(92) * ((1 << a) - 1)}"x ' for a in range(1, 18)),
}


@pytest.mark.parametrize("flood", list(QUOTE_FLOODS.values()), ids=list(QUOTE_FLOODS))
def test_quote_floods_stay_linear(flood: str, isolated_secrets: None) -> None:
    """Guards (linear on 936b538 too): a value's closing quote is searched past escaped and doubled
    quotes, each quote's backslashes counted once per scan (counted again for every key whose value
    stayed open, the rising form took 0.28 s at 256 KB, 1.25 s at 1 MB; now 36 and 145 ms)."""
    tail = marker()
    with cpu_alarm(20):
        out = redaction.redact(f"{flood}\npassword={tail}")
        redaction._item_flag(json.dumps({"content": flood}))
    assert tail not in out and out.endswith(f"password={redaction.REDACTED}")
