"""A huge message costs telemetry what a bounded one does.

Every string that goes on a span is cut to the attribute bound, so reading more of it than a
bounded prefix is pure cost. A 5 MB chat message with content capture on was redacted whole,
and serialised whole, on every span it appears in (each agent's input, each model call's
history): ~20x the app's own CPU for 5 MB, 21 s for 50 MB. Measured here as memory (the peak of
what the instrumented run allocates beyond the plain run, ``tracemalloc``), which is exact and
does not depend on the machine's load.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import semconv
from cmbagent_otel.redaction import safe_text, scrub

from .conftest import Capture, group_chat, instrumented_with, needs_custom_client, outcome

SIZE = 8 * 1024 * 1024


def peak(run: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = run()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@needs_custom_client
def test_a_huge_message_is_read_only_as_far_as_telemetry_keeps_it(tmp_path: Path) -> None:
    huge = "A" * (SIZE - 11) + " the end."

    def chat(where: str) -> Any:
        return outcome(lambda: group_chat(tmp_path / where, message={"content": huge, "role": "user"}))

    plain, plain_peak = peak(lambda: chat("plain"))
    cap = Capture()
    with instrumented_with(cap, capture_content=True):
        traced, traced_peak = peak(lambda: chat("traced"))
    assert traced == plain
    inputs = [s.attributes.get(semconv.GEN_AI_INPUT_MESSAGES) for s in cap.spans]
    assert any(text and "AAAA" in text and "[truncated]" in text for text in inputs)  # still captured, cut
    # each span's share is bounded (a few copies of 64 KiB); before, each held a whole copy
    assert traced_peak - plain_peak < SIZE // 4, (traced_peak, plain_peak)


@pytest.mark.parametrize("make", [lambda s: s, lambda s: {"k": [s]}], ids=["str", "nested"])
def test_scrub_and_safe_text_copy_a_bounded_prefix(make: Any) -> None:
    huge = "B" * SIZE + " password: tail"
    clean, used = peak(lambda: scrub(make(huge)))
    assert used < SIZE // 8
    text = clean if isinstance(clean, str) else clean["k"][0]
    assert text.startswith("BBBB") and text.endswith("...[truncated]") and len(text) < SIZE // 64
    shown, used = peak(lambda: safe_text(huge))
    assert used < SIZE // 8 and shown is not None and shown.endswith("...[truncated]")


def test_a_huge_exception_message_is_read_only_as_far_as_telemetry_keeps_it(provider: Any) -> None:
    """An exception through a workflow, phase and step: each span records its message and stack
    trace. Formatting the stack trace (the standard library's work, the message included) takes
    about 2 x the message at its peak; redacting the whole message and trace on top took a
    third copy (7.7 s of CPU for a 50 MB message through three spans; 0.6 s now)."""
    from cmbagent_otel import phase, step, workflow

    error = RuntimeError("z" * SIZE)

    def fail() -> None:
        with pytest.raises(RuntimeError), workflow("w", mode="m"), phase("control"), step(1, "g"):
            raise error

    _, used = peak(fail)
    assert used < 2.5 * SIZE, used / SIZE
    events = [e for s in provider.memory.get_finished_spans() for e in s.events if e.name == "exception"]
    assert len(events) == 3 and all(len(e.attributes["exception.message"]) <= 4096 for e in events)


def test_another_instrumentations_huge_attributes_are_bounded_in_the_database(provider: Any, tmp_path: Path) -> None:
    """The SDK sets no length limit: another instrumentation's span may carry megabytes. Our
    spans' attributes are bounded when set; the DAG rows of foreign spans were stored whole
    (a 40 MB ``meta``), now cut like ours."""
    import sqlite3

    from cmbagent_otel import phase, step, workflow

    with workflow("w", mode="m"), phase("control"), step(1, "g"), \
            provider.get_tracer("other").start_as_current_span("http") as span:
        span.set_attribute("http.body", "q" * SIZE)
        span.set_attribute("parts", ["r" * (SIZE // 4)] * 4)
    db = tmp_path / "dag.db"
    provider.store(f"sqlite:///{db}")
    with sqlite3.connect(db) as conn:
        longest, = conn.execute("SELECT max(length(meta)) FROM execution_events").fetchone()
        body, = conn.execute("SELECT json_extract(meta, '$.attributes.\"http.body\"') FROM execution_events "
                             "WHERE json_extract(meta, '$.span_name') = 'http'").fetchone()
    assert longest < 64 * 1024, longest
    assert body.startswith("qqqq") and body.endswith("...[truncated]")
