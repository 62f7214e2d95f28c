"""Redaction of text the application controls: never a hang of its thread, never a leak.

Every exception message and traceback, every tool call's arguments (content capture off
too) and every captured message goes through the ``key: value`` scan of
:mod:`cmbagent_otel.redaction` on the application's thread. Text dense with key-name hints
(``token_token_...``, ``monkey=monkey=...``) made that scan quadratic: a 1 MB tool argument
held the application for hours. Characters whose lower case is longer (``İ``) shifted the
scan's offsets so the secrets after them went through.

The hang tests run under a CPU-time alarm (``ITIMER_VIRTUAL``): a liveness bound far above
what a linear scan needs (well under a second), not a speed target.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import redaction

from .conftest import Capture, group_chat, instrumented_with, needs_custom_client, outcome

CPU_BOUND_S = 60  # the quadratic scan needed hours of CPU for these texts; a linear one, < 1 s


class StillScanning(BaseException):
    """The CPU-time alarm fired: the scan does not finish (a BaseException: telemetry's own
    guards, which catch Exception, must not swallow it)."""


@contextlib.contextmanager
def cpu_alarm(seconds: int) -> Iterator[None]:
    """Raise :class:`StillScanning` in this (main) thread after ``seconds`` of the process's CPU time."""
    assert threading.current_thread() is threading.main_thread()

    def fire(signum: int, frame: Any) -> None:
        raise StillScanning(f"still running after {seconds} s of CPU time")

    previous = signal.signal(signal.SIGVTALRM, fire)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def marker() -> str:
    return f"MARKER{secrets.token_hex(12)}"  # shapeless: only the key name tells it is a secret


# about 1.2 MB each: runs of key-name hints, keys that are no secret followed by long values
HINT_DENSE = [
    "token_" * 200_000,
    "monkey=" * 170_000,
    "a_key" * 240_000,
    "passé=" * 200_000,
]


@pytest.mark.parametrize("text", HINT_DENSE, ids=lambda t: repr(t[:7]))
def test_hint_dense_text_is_scanned_once(text: str) -> None:
    secret = marker()
    with cpu_alarm(CPU_BOUND_S):
        out = redaction.redact(f"{text} password={secret}")
    assert secret not in out and out.endswith(f"password={redaction.REDACTED}")


@needs_custom_client
def test_a_hint_dense_tool_argument_does_not_hold_the_application(tmp_path: Path) -> None:
    """Content capture off: the tool's arguments are still scanned for secrets before it runs."""
    note = "token_" * 200_000
    script = [{"tool_calls": [{"id": "call_adv_1", "name": "peak_position",
                               "arguments": {"multipole": 2, "note": note}}]},
              "```python\nprint('peaks')\n```"]

    def tool(multipole: int, note: str = "") -> str:
        return f"peak near l={220 * multipole} ({len(note)} chars of notes)"

    def run(work_dir: Path) -> Any:
        return group_chat(work_dir, engineer_script=script, tool=tool)

    plain = outcome(lambda: run(tmp_path / "plain"))
    cap = Capture()
    with cpu_alarm(CPU_BOUND_S), instrumented_with(cap):
        traced = outcome(lambda: run(tmp_path / "traced"))
    assert traced == plain and plain[0] == "ok"
    assert cap.named("execute_tool peak_position")


@pytest.mark.parametrize("template", [
    'İİİİ {{"api_key": "{secret}"}}',
    "İzmir office; password={secret}",
    "İ" * 40 + " Authorization: Bearer {secret}",
    "token_İ_token={secret}",
])
def test_letters_with_a_longer_lower_case_do_not_hide_a_secret(template: str) -> None:
    secret = marker()
    text = template.format(secret=secret)
    assert secret not in redaction.redact(text)
    assert secret not in (redaction.safe_text({"content": text}) or "")
