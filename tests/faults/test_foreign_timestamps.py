"""One run with a timestamp another writer stored as text no longer hides every run.

SQLite keeps any value in any column. Since the tenth fault campaign a ``DATETIME`` value
the driver cannot convert (``not a date`` in one run's ``started_at``) ended ``runs``,
``dag`` and ``events`` in one line and exit 2, for every run of the database, since the
conversion raises while the rows are fetched. The reader now reads such a column as stored
when the conversion fails and converts value by value: the other runs are listed as before,
the odd value is shown as stored (no duration), and one warning line on stderr names the
database, the row and the value (twelfth fault campaign).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.cli import main
from cmbagent_otel.dag.query import DagReader

RUNS = 3


@pytest.fixture
def db(tmp_path: Path, provider: Any) -> Path:
    path = tmp_path / "cmbagent.db"
    for i in range(RUNS):
        with workflow(f"task {i}", mode="one-shot"), phase("control"), step(1, "fit", agent="engineer"):
            pass
    provider.store(f"sqlite:///{path}")
    return path


def _ids(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM workflow_runs ORDER BY started_at DESC")]
    finally:
        conn.close()


def _spoil(db: Path, table: str, column: str, value: Any, run: str) -> None:
    conn = sqlite3.connect(db)
    key = "id" if table == "workflow_runs" else "run_id"
    with conn:
        assert conn.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (value, run)).rowcount > 0
    conn.close()


SPOILED = [("workflow_runs", "started_at", "not a date"), ("workflow_runs", "completed_at", "yesterday"),
           ("workflow_runs", "last_heartbeat_at", "2026-13-45"), ("workflow_runs", "started_at", b"\x00\xff"),
           ("workflow_runs", "completed_at", 1e308)]


@pytest.mark.parametrize(("table", "column", "value"), SPOILED, ids=lambda v: repr(v)[:20])
def test_the_other_runs_are_listed_and_the_odd_value_named(db: Path, table: str, column: str, value: Any,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = _ids(db)[0], _ids(db)[1]
    _spoil(db, table, column, value, bad)
    url = f"sqlite:///{db}"
    assert main(["--db", url, "runs", "--format", "json"]) == 0
    out, err = capsys.readouterr()
    listed = {r["id"]: r for r in json.loads(out)}
    assert set(listed) == set(_ids(db))  # every run, the spoiled one too
    assert listed[good]["started"] and listed[good]["duration_ms"] is not None
    if column == "completed_at":
        assert listed[bad]["duration_ms"] is None
    if column != "last_heartbeat_at":  # `runs` does not read the heartbeat
        assert err.count("\n") == 1 and err.startswith("warning: ") and str(db) in err
        assert f"{table}.{column} of {bad}" in err and "Traceback" not in err
    # the table view and the other commands read it too; a healthy run prints no warning
    assert main(["--db", url, "runs"]) == 0
    assert bad in capsys.readouterr().out
    assert main(["--db", url, "dag", bad, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["run"]["id"] == bad and f"{column} of {bad}" in err
    assert main(["--db", url, "events", bad]) == 0
    capsys.readouterr()
    assert main(["--db", url, "dag", good, "--format", "json"]) == 0
    assert capsys.readouterr().err == ""


def test_an_event_timestamp_that_is_no_date_is_shown(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _ids(db)[0]
    conn = sqlite3.connect(db)
    with conn:
        session = conn.execute("SELECT session_id FROM workflow_runs WHERE id = ?", (run,)).fetchone()[0]
        conn.execute("INSERT INTO execution_events (id, run_id, session_id, event_type, execution_order, depth, "
                     "status, started_at, timestamp) VALUES ('foreign', ?, ?, 'agent_call', 1, 0, 'completed', "
                     "'soon', 'never')", (run, session))
    conn.close()
    assert main(["--db", f"sqlite:///{db}", "events", run, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert "foreign" in [e["id"] for e in json.loads(out)]
    assert err.count("\n") == 1 and "execution_events.started_at of foreign" in err


def test_rows_our_writer_stored_read_as_before(db: Path) -> None:
    """No value is converted differently: the fallback runs only when the driver's conversion failed."""
    with DagReader(f"sqlite:///{db}") as reader:
        runs, _ = reader.runs()
        dag = reader.dag(reader.run("latest"))
        assert reader.odd_values == []
    assert all(r["started"] and r["duration_ms"] is not None for r in runs)
    assert dag["run"]["started_at"] and dag["run"]["completed_at"]
