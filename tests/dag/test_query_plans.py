"""The writer's per-run queries reach rows through run_id, not through an index over the whole table.

With ``event_type = ? AND run_id IN (...)`` both planners (SQLite without statistics,
PostgreSQL before ANALYZE) preferred the event-type index: every LLM (or code, or foreign)
event of the whole database was read for each batch, so a batch cost more the larger the
database grew. Every statement a write runs is planned here and checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event

from cmbagent_otel.dag.writer import DagWriter

from .scenario import run_scenario

TYPE_INDEXES = ("idx_events_type_subtype", "idx_events_event_type")


def test_no_statement_of_a_write_walks_an_event_type_index(tmp_path: Path, provider: Any) -> None:
    for _ in range(3):  # several runs, so a type index would cover rows of other runs
        run_scenario()
    spans = list(provider.memory.get_finished_spans())
    writer = DagWriter(f"sqlite:///{tmp_path}/plans.db")
    writer.write(spans[: len(spans) // 2])
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if not executemany and "execution_events" in statement and "event_type" in statement:
            statements.append((statement, parameters))

    event.listen(writer.engine, "before_cursor_execute", record)
    writer.write(spans[len(spans) // 2:])  # runs that exist already: their derived rows are read back
    event.remove(writer.engine, "before_cursor_execute", record)
    assert len(statements) >= 3  # foreign events, LLM usage, code events' agents
    raw = writer.engine.raw_connection()
    try:
        for statement, parameters in statements:
            plan = " ".join(str(row) for row in raw.execute(f"EXPLAIN QUERY PLAN {statement}", parameters))
            assert not any(index in plan for index in TYPE_INDEXES), (statement, plan)
            assert "(run_id=?)" in plan, (statement, plan)  # idx_events_run_id or idx_events_run_order
    finally:
        raw.close()
        writer.close()
