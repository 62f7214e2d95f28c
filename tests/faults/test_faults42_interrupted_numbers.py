"""Ctrl-C inside a block's span start after the start named the block's DAG node (fortieth fault campaign: the
numbers a phase takes, siblings of ``RunState.take_phase_index``).

``_spans.start`` names a DAG node span's node first (a unique id takes the run's next number for its base:
``a``, then ``a_2``) and then builds its attributes and starts it. A ``KeyboardInterrupt`` raised in between (a
signal handler runs when a function is entered or a call returns) left no span; the workflow API records such
a block, failed, by starting its span again (``test_carry40_interrupted_block_entry.py``), and that second
start took the next number: phase ``a`` was recorded as node ``a_2`` (no node ``a`` at all), step 1 as
``step_1_2``. The retry now keeps the id the interrupted start took. Forced with ``conftest.interrupt_at``.
"""

from __future__ import annotations

import builtins
import sqlite3
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import Tracer

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._context import Scope
from tests.conftest import SpanCapture

from .conftest import Hit, interrupt_at
from .test_campaign import traced


def _in_start(frame: FrameType | None) -> bool:
    """``frame`` runs ``_spans.start`` or a span type's start generated from it (``start_<kind>``), past the
    naming of the node (its ``node_id`` is set)."""
    return frame is not None and frame.f_code.co_name.startswith("start") and "node_id" in frame.f_locals


_POINTS: dict[str, Hit] = {
    # the execution order's number taken (``next`` returns to start)
    "order-taken": lambda frame, event, arg: event == "c_return" and arg is builtins.next and _in_start(frame),
    # the children's scope made
    "child-scope": lambda frame, event, _: event == "call" and frame.f_code is Scope.child_node.__code__
    and _in_start(frame.f_back),
    # the SDK's start_span entered (the span not started yet)
    "start-span": lambda frame, event, _: event == "call" and frame.f_code is Tracer.start_span.__code__
    and _in_start(frame.f_back),
}


def _nodes(spans: Any) -> list[tuple[str, Any, Any]]:
    return [(s.name, s.attributes.get("cmbagent.dag.node"), s.attributes.get("error.type"))
            for s in spans if "cmbagent.dag.node_type" in s.attributes]


@pytest.mark.parametrize("point", list(_POINTS))
def test_ctrl_c_in_a_phases_start_keeps_its_node_id(capture: SpanCapture, point: str) -> None:
    """Fails on 4a0d79e: phase ``a``'s node is ``a_2``."""
    with workflow("faults42"):
        with interrupt_at(_POINTS[point]), phase("a"):
            pytest.fail("the block was entered")
        with phase("b"):
            pass
        with phase("a"):  # a second phase of the same name: the next number
            pass
    assert _nodes(capture.spans) == [("phase a", "a", "KeyboardInterrupt"), ("phase b", "b", None),
                                     ("phase a", "a_2", None)]


@pytest.mark.parametrize("point", list(_POINTS))
def test_ctrl_c_in_a_steps_start_keeps_its_node_id_in_the_database(tmp_path: Path, point: str) -> None:
    """Fails on 4a0d79e: step 1's node is ``step_1_2`` (the live DAG's rows, real SQLite)."""
    db = tmp_path / "cmbagent.db"
    exporter = DagSpanExporter(f"sqlite:///{db}", spill_dir=tmp_path / "spill")
    with traced(exporter, schedule_delay_millis=50) as (_provider, record, _processor), workflow("faults42"), \
            phase("control"):
        with interrupt_at(_POINTS[point]), step(1, "first", agent="engineer"):
            pytest.fail("the block was entered")
        with step(2, "second", agent="engineer"):
            pass
    assert _nodes(record.get_finished_spans())[:2] == [("step 1", "step_1", "KeyboardInterrupt"),
                                                       ("step 2", "step_2", None)]
    with sqlite3.connect(db) as conn:
        nodes = conn.execute("SELECT json_extract(meta, '$.id'), status FROM dag_nodes "
                             "WHERE json_extract(meta, '$.id') LIKE 'step%' ORDER BY 1").fetchall()
    assert nodes == [("step_1", "failed"), ("step_2", "completed")]
