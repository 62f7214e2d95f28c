"""A Ctrl-C inside the SDK's ``start_span``, after the span started (thirty-ninth fault campaign; session 40's
carried-over Left).

``_spans.start`` asks the SDK's ``Tracer.start_span`` for the span; the SDK starts it (every span processor's
``on_start``: the live DAG's started record is queued there) and returns it. A ``KeyboardInterrupt`` raised as
it returned (a signal handler runs when a call returns) lost the span on its way: nobody ever ended it, its
started record left its node ``running`` in the database for good, and the block then started and ended a
second span for the interrupt (a node ``a_2``, failed). ``start`` now takes the lost span back (the one our
processor saw start last in this thread, of the same name and execution order) and ends it as interrupted.
Forced with a ``sys.setprofile`` hook at ``start_span``'s return; the spans go to a real DAG exporter on a real
SQLite file through the durable batch processor (live DAG on).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import Tracer

from cmbagent_otel import phase, workflow

from .test_campaign import traced


def _interrupt_as_start_span_returns(name: str, raised: list[BaseException]) -> None:
    code = Tracer.start_span.__code__

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if not raised and event == "return" and frame.f_code is code and frame.f_locals.get("name") == name:
            raised.append(KeyboardInterrupt())
            raise raised[-1]  # the hook is removed by the interpreter when it raises
    sys.setprofile(profile)


def test_a_span_lost_as_the_sdks_start_span_returns_is_ended_and_its_node_not_left_running(tmp_path: Path) -> None:
    """Fails on 3c387d5: node ``a`` stays ``running`` (its span never ended), beside a node ``a_2``, failed."""
    db = tmp_path / "cmbagent.db"
    exporter = DagSpanExporter(f"sqlite:///{db}", spill_dir=tmp_path / "spill")
    raised: list[BaseException] = []
    with traced(exporter, schedule_delay_millis=50) as (_provider, record, _processor), workflow("faults41"):
        _interrupt_as_start_span_returns("phase a", raised)
        try:
            with phase("a"):
                pytest.fail("the block was entered")
        except KeyboardInterrupt as caught:
            assert raised and caught is raised[0]  # the very exception, unchanged
        finally:
            sys.setprofile(None)
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
