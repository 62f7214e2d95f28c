"""Another writer's run row naming a session that does not exist (leftover of the 37th attack campaign).

SQLite's foreign keys are off unless a connection turns them on (the default of ``sqlite3`` and of
every program that never says ``PRAGMA foreign_keys=ON``): such a program deleting a session, or
writing a run row that names none, leaves ``workflow_runs.session_id`` naming no session. The rows
the writer derives for a run (steps, child runs, branch rows, cost records, the session state) take
the run's stored session id; ours keep foreign keys on, so every later batch of that run failed the
foreign key (``IntegrityError``, not retryable): each of its spans was dropped by the exporter and
rejected by the ingest, for good. Now the writer, on that failure only, gives such a run back a
session row (cmbagent's shape, ``status`` ``deleted``) and writes the batch again.
"""

from __future__ import annotations

from sqlalchemy import create_engine, text

from cmbagent_otel.dag.query import DagReader
from cmbagent_otel.dag.writer import DagWriter

from .conftest import expected_keys, plan_run_spans, stored_spans

GONE = "a-session-another-program-deleted"


def _name_a_missing_session(url: str) -> None:
    """What another program with foreign keys off does: point our run at a session that does
    not exist (as deleting its session, SQLite's default connection or PostgreSQL's replica
    role allow), our own session left as it is."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL session_replication_role = replica"))  # no foreign key triggers
            else:
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.execute(text("UPDATE workflow_runs SET session_id = :s"), {"s": GONE})
    finally:
        engine.dispose()


def test_later_spans_of_a_run_naming_a_missing_session_are_stored(db_url: str) -> None:
    spans = plan_run_spans("orphaned", steps=4)
    run_span = next(span for span in spans if span.parent is None)
    late = [span for span in spans if span.name in ("step 3", "step 4")]
    first = [span for span in spans if span not in late]
    rest = late
    assert rest and run_span in first
    writer = DagWriter(db_url)
    try:
        writer.write(first)
        _name_a_missing_session(db_url)
        # IntegrityError before (the derived rows take the run's session id), for every later
        # batch of the run: the rest, then the whole run again
        writer.write(rest)
        writer.write(spans)
    finally:
        writer.close()
    stored = stored_spans(db_url)
    assert all(stored[key] for key in expected_keys(spans))
    with DagReader(db_url) as reader:
        dag = reader.dag(reader.run("latest"))
    assert {n["id"]: n["status"] for n in dag["nodes"] if n["type"] == "agent"} == {
        f"step_{n}": "completed" for n in range(1, 5)}
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            # the session given back: cmbagent's shape, marked as deleted (and ours left as it was)
            sessions = dict(conn.execute(text("SELECT id, status FROM sessions")).all())
            # the derived nodes (start, end) take the run's session id
            derived = conn.execute(text("SELECT DISTINCT session_id FROM dag_nodes WHERE node_type IN "
                                        "('planning', 'terminator')")).scalars().all()
    finally:
        engine.dispose()
    assert sessions[GONE] == "deleted" and len(sessions) == 2
    assert derived == [GONE]
