"""Nineteenth campaign (attacks: leftovers): ordinary words redacted by a key's start left open.

A text ending in the incomplete start of a key shape (``my key: sk-proj-Ab12``) leaves that start
open: the first text of each of the next 256 model calls was taken as the key's rest whenever it
completed the shape, a word of prose too. ``tell me`` completed ``sk-proj-Ab12`` with ``tell``:
``tell m`` was learned (a short piece with the characters after it) and every later ``tell me``
showed as ``[REDACTED]e``, in every run of the process. Found as a test-order failure:
``tests/reliability/test_split_secrets_apart.py`` then
``tests/semconv/test_messages.py::test_dag_messages_rows_keep_sender_recipient_and_content``.
A continuation now counts only when it looks random (a digit, or a lower-case letter before an
upper-case one), as it already did for the later texts of a call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from sqlalchemy import create_engine, text

import cmbagent_otel
from cmbagent_otel import redaction
from cmbagent_otel.testing import offline_agent

OPEN = "here is my key: sk-proj-Ab12"  # a key's start, cut at the end of a model call's last text
WORDS = ["tell me", "please continue", "Carry out the current step.", "Done", "hello bob", "thanks, that works"]


@pytest.mark.parametrize("first", WORDS)
def test_words_after_an_open_key_start_are_not_taken_for_its_rest(first: str, isolated_secrets: None) -> None:
    redaction.learn_split_secrets([OPEN])
    redaction.learn_split_secrets([first])  # a later model call: its first text
    assert redaction.redact(first) == first
    assert redaction.redact(f"and then: {first} again") == f"and then: {first} again"


def test_a_random_rest_of_the_key_in_the_next_call_is_still_learned(isolated_secrets: None) -> None:
    rest = "Cd34Ef56Gh78Ij90Kl12Mn34"
    redaction.learn_split_secrets([OPEN])
    redaction.learn_split_secrets([rest + " is the rest"])
    assert redaction.redact(f"key rest {rest} here") == f"key rest {redaction.REDACTED} here"


def test_message_rows_keep_their_words_after_a_key_start_was_left_open(isolated_secrets: None,
                                                                      tmp_path: Path) -> None:
    """The failing order's chat: a real two-agent chat with content capture, DAG rows in SQLite."""
    redaction.learn_split_secrets([OPEN])
    url = f"sqlite:///{tmp_path}/dag.db"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(DagSpanExporter(url)))
    cmbagent_otel.instrument(tracer_provider=provider, capture_content="SPAN_ONLY", instrument_cmbagent=False)
    try:
        alice = offline_agent("alice", ["hello bob"], system_message="You are alice.")
        bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
        bob.initiate_chat(alice, message="tell me", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
        provider.shutdown()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows: list[Any] = conn.execute(text("SELECT sender, recipient, content FROM messages")).all()
    finally:
        engine.dispose()
    assert sorted(tuple(r) for r in rows) == [("alice", "user", "hello bob"), ("bob", "alice", "tell me")]
    assert redaction.redact(json.dumps({"content": "tell me"})) == json.dumps({"content": "tell me"})
