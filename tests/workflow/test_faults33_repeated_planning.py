"""A run with a second planning phase (thirty-third fault campaign).

Every planning phase's node took order_index 0, cmbagent's order for its one planning node: a run holding two
(two joined ``planning_and_control`` calls in an application's ``with workflow(...)``, one after the other or
from two threads, found with the real cmbagent package) had two top-level nodes at order 0, which cmbagent's
contract forbids (siblings' order_index unique: its UI orders them by it). The first keeps 0, another gets a
non-step order of its own, as a repeated ``execute`` does.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine

from cmbagent_otel import phase, semconv, workflow
from tests.conftest import SpanCapture
from tests.dag.test_cmbagent_contract import check_contract


def test_a_second_planning_phase_has_an_order_of_its_own(capture: SpanCapture, tmp_path: Path) -> None:
    """planning, control, planning again, then a planning phase of another name (a MARS workflow's):
    orders 0, 1002, 1003, 1004 (on e0732e2 0, 1002, 0, 0), and the run's rows keep cmbagent's contract (on
    e0732e2: ``siblings share an order_index: {None: [0]}``)."""
    with workflow("notebook cell", mode="planning-control"):
        for name in ("planning", "control", "planning", "hitl_planning"):
            with phase(name):
                pass
    phases = capture.named("phase")
    assert [(s.attributes[semconv.DAG_NODE], s.attributes[semconv.DAG_ORDER_INDEX]) for s in phases] == [
        ("planning", 0), ("control", 1002), ("planning_2", 1003), ("hitl_planning", 1004)]
    url = f"sqlite:///{tmp_path / 'dag.db'}"
    capture.write_dag(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            (run_id,) = conn.exec_driver_sql("SELECT id FROM workflow_runs").scalars()
            nodes = check_contract(conn, run_id)
    finally:
        engine.dispose()
    assert {"planning", "control", "planning_2", "hitl_planning"} <= set(nodes)
