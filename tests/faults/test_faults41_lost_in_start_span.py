"""A Ctrl-C inside the SDK's ``start_span``, after the span started (thirty-ninth fault campaign; session 40's
carried-over Left).

``_spans.start`` asks the SDK's ``Tracer.start_span`` for the span; the SDK starts it (every span processor's
``on_start``: the live DAG's started record is queued there) and returns it. A ``KeyboardInterrupt`` raised as
it returned (a signal handler runs when a call returns) lost the span on its way: nobody ever ended it, its
started record left its node ``running`` in the database for good, and the block then started and ended a
second span for the interrupt (a node ``a_2``, failed). ``start`` now takes the lost span back (the one our
processor saw start last in this thread, of the same name and execution order) and ends it as interrupted.
Forced at ``start_span``'s return with ``conftest.interrupt_at``; the spans go to a real DAG exporter on a real
SQLite file through the durable batch processor (live DAG on).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import Tracer

from cmbagent_otel import phase, workflow

from .conftest import Hit, interrupt_at
from .test_campaign import traced


def _start_span_returns(name: str) -> Hit:
    code = Tracer.start_span.__code__
    return lambda frame, event, _: event == "return" and frame.f_code is code and frame.f_locals.get("name") == name


def test_a_span_lost_as_the_sdks_start_span_returns_is_ended_and_its_node_not_left_running(tmp_path: Path) -> None:
    """Fails on 3c387d5: node ``a`` stays ``running`` (its span never ended), beside a node ``a_2``, failed."""
    db = tmp_path / "cmbagent.db"
    exporter = DagSpanExporter(f"sqlite:///{db}", spill_dir=tmp_path / "spill")
    with traced(exporter, schedule_delay_millis=50) as (_provider, record, _processor), workflow("faults41"):
        with interrupt_at(_start_span_returns("phase a")), phase("a"):
            pytest.fail("the block was entered")
        with phase("b"):
            pass
    spans = [s for s in record.get_finished_spans() if s.name.startswith("phase")]
    assert [(s.name, s.attributes.get("error.type"), s.attributes["cmbagent.phase.index"]) for s in spans] == [
        ("phase a", "KeyboardInterrupt", 1), ("phase b", None, 2)]
    with sqlite3.connect(db) as conn:
        nodes = conn.execute("SELECT json_extract(meta, '$.id'), status FROM dag_nodes "
                             "WHERE json_extract(meta, '$.id') IN ('a', 'a_2', 'b') ORDER BY 1").fetchall()
        runs = conn.execute("SELECT status FROM workflow_runs").fetchall()
    assert nodes == [("a", "failed"), ("b", "completed")]
    assert runs == [("completed",)]
