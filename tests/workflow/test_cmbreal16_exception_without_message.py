"""Session 41 (real cmbagent audit 16; session 40's Left): the status message of an exception without a message.

A Ctrl-C (``KeyboardInterrupt``), a cancelled task (``asyncio.CancelledError``) or a bare ``raise ValueError``
has no message. Every span it failed read ``KeyboardInterrupt: `` (the SDK's ``f"{type}: {exc}"`` format), and
so did the run's and nodes' ``error`` in the DB rows cmbagent's UI shows. The message is now the type alone; an
exception with a message still reads ``<Type>: <message>``. Spans another instrumentation ended through the
SDK's own ``Span.__exit__`` (its ``f"{type}: {exc}"``) are stored the same way.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent
from opentelemetry.trace import StatusCode

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.testing import offline_agent
from tests.conftest import SpanCapture
from tests.dag.test_mapping import _rows

CASES = [(KeyboardInterrupt(), "KeyboardInterrupt", "cancelled"),
         (asyncio.CancelledError(), "CancelledError", "cancelled"),
         (ValueError(), "ValueError", "failed"),
         (ValueError("no spectrum in the file"), "ValueError: no spectrum in the file", "failed")]


def _interrupted_reply(exc: BaseException) -> Any:
    def reply(*_: Any, **__: Any) -> Any:
        raise exc

    return reply


@pytest.mark.parametrize(("exc", "message", "status"), CASES,
                         ids=["KeyboardInterrupt", "CancelledError", "ValueError", "ValueError-with-message"])
def test_a_failure_without_a_message_reads_as_its_type(instrumented: SpanCapture, tmp_path: Path,
                                                       exc: BaseException, message: str, status: str) -> None:
    """A real AG2 chat in a plan step, the answering agent's reply raising ``exc``: every span it leaves
    fails with ``message``; the run's, the step's and the agent's rows say the same. On 3c387d5 the three
    message-less cases read ``KeyboardInterrupt: `` / ``CancelledError: `` / ``ValueError: ``."""
    alice = offline_agent("alice", ["pong"])
    bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
    bob.register_reply([ConversableAgent, None], _interrupted_reply(exc), position=0)
    with pytest.raises(type(exc)) as raised, workflow("interrupted", mode="planning-control"), phase("control"), \
            step(1, "fit the peak"):
        alice.initiate_chat(bob, message="ping", max_turns=2, silent=True)
    assert raised.value is exc  # the application's exception, unchanged
    failed = [s for s in instrumented.spans if s.status.status_code is StatusCode.ERROR]
    assert {s.name for s in failed} >= {"workflow interrupted", "phase control", "step 1", "invoke_agent bob"}
    assert {s.name: s.status.description for s in failed} == {s.name: message for s in failed}
    url = f"sqlite:///{tmp_path / 'cmbagent.db'}"
    instrumented.write_dag(url)
    (run,) = _rows(url, "workflow_runs")
    assert (run["status"], run["meta"]["error"]) == (status, message)
    nodes = {n["meta"]["id"]: n for n in _rows(url, "dag_nodes")}
    for short in ("control", "step_1", "step_1_bob"):
        assert (nodes[short]["status"], nodes[short]["meta"]["error"]) == ("failed", message), short


@pytest.mark.parametrize(("exc", "message", "status"), CASES[:3], ids=[c[1] for c in CASES[:3]])
def test_a_span_the_sdk_failed_without_a_message_is_stored_as_its_type(
        instrumented: SpanCapture, tmp_path: Path, exc: BaseException, message: str, status: str) -> None:
    """The run's span ended by the SDK's own ``Span.__exit__`` (another instrumentation, another process's
    exporter, an older cmbagent-otel's spill file): its status reads ``KeyboardInterrupt: ``. Stored as
    ``KeyboardInterrupt`` (on 3c387d5 as the SDK wrote it)."""
    with pytest.raises(type(exc)), workflow("interrupted", mode="planning-control"), phase("control"):
        raise exc
    spans = instrumented.spans
    phase_span = next(s for s in spans if s.name == "phase control")
    sdk_text = f"{type(exc).__name__}: "
    # the status as the SDK's Span.__exit__ sets it (f"{exc_type.__name__}: {exc_val}"), on the same spans
    for span in spans:
        span._status = type(span.status)(StatusCode.ERROR, sdk_text)  # another writer's status
    url = f"sqlite:///{tmp_path / 'cmbagent.db'}"
    instrumented.write_dag(url)
    (run,) = _rows(url, "workflow_runs")
    assert (run["status"], run["meta"]["error"]) == (status, message)
    nodes = {n["meta"]["id"]: n for n in _rows(url, "dag_nodes")}
    assert nodes["control"]["meta"]["error"] == message, phase_span.name
