"""Step numbers at and past the 32-bit bound of ``dag_nodes.order_index``.

``step(n)`` accepts any positive int; a step's node row clamps its order to the INTEGER column,
but the run's derived ``terminator`` node took the largest step order plus one: 2^31 for a step
numbered 2^31 - 1 or more. PostgreSQL refused the row (``integer out of range``), so the run's
derived rows failed the whole batch (its spans dropped by the exporter after halving); SQLite
stored an order no cmbagent database column can hold. The terminator's order is now clamped too.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, text

from cmbagent_otel import phase, redo, step, workflow

INT32 = 2**31 - 1


@pytest.mark.parametrize("number", [INT32, 2**31, 2**62, 10**30])
def test_a_huge_step_number_is_stored(provider: Any, db_url: str, number: int) -> None:
    with workflow("huge", mode="planning-control", max_redos=2), phase("control"):
        with step(1, "first"):
            pass
        with step(number, "last"), redo(number, 1, "again"):
            pass
    provider.store(db_url)  # raised on PostgreSQL: integer out of range
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            nodes = [tuple(r) for r in conn.execute(text("SELECT node_type, status, order_index FROM dag_nodes"))]
            runs = [tuple(r) for r in conn.execute(text("SELECT status FROM workflow_runs"))]
    finally:
        engine.dispose()
    assert runs == [("completed",), ("completed",)]  # the run and its redo's branch run
    assert {t for t, _, _ in nodes} >= {"terminator", "agent", "redo", "control"}
    assert all(-INT32 <= order <= INT32 for _, _, order in nodes), nodes
    assert {s for _, s, _ in nodes} == {"completed"}
