"""A database whose schema this version cannot migrate keeps the spans, never drops them.

Two real cases: the version table names a revision newer than our scripts (the database was
written by a later cmbagent-otel), and cmbagent's table names hold tables shaped otherwise
(another application's database). The migration fails for no driver reason, which used to
be taken for a span the database refuses: every span was dropped, one log line and
traceback each. Now the batch is spilled with one line saying why, and replayed once the
database is fixed; ``cmbagent-otel db upgrade`` says what is wrong in one line, exit code 2.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.dag.database import head_revisions, upgrade
from cmbagent_otel.spill import SpillStore

from .conftest import cli, expected_keys, stored_spans


def run_spans(capture) -> list:
    with workflow("w", mode="planning-control"), phase("control"), step(1, "fit"):
        for call in range(3):
            with TracedSpan(f"chat m{call}", "llm", {"gen_ai.usage.input_tokens": call, "gen_ai.request.model": "m"}):
                pass
    return capture.spans


def newer_revision(db: Path) -> None:
    upgrade(f"sqlite:///{db}")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE cmbagent_otel_alembic_version SET version_num = '0099_from_a_later_version'")


def back_to_head(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE cmbagent_otel_alembic_version SET version_num = ?", head_revisions())


def foreign_tables(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE dag_nodes (id INTEGER PRIMARY KEY, shape)")


def foreign_runs(db: Path) -> None:
    """Another application's ``workflow_runs`` (only an id): no migration step fails on it."""
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE workflow_runs (id TEXT PRIMARY KEY)")


def move_away(db: Path) -> None:
    """The operator moves the other application's database away: ours is created anew."""
    for path in db.parent.glob(db.name + "*"):
        path.rename(db.parent / f"other-{path.name}")


@pytest.mark.parametrize(("damage", "repair", "says"), [
    (newer_revision, back_to_head, "Can't locate revision identified by '0099_from_a_later_version'"),
    (foreign_tables, move_away, "cannot migrate the schema"),
    (foreign_runs, move_away, "table workflow_runs lacks agent, branch_depth"),
], ids=["newer-revision", "foreign-tables", "foreign-runs"])
def test_spans_are_spilled_then_replayed_once_the_schema_is_fixed(tmp_path, capture, caplog, damage, repair, says):
    spans = run_spans(capture)
    db = tmp_path / "cmbagent.db"
    damage(db)
    url = f"sqlite:///{db}"
    exporter = DagSpanExporter(url, timeout=0.3, spill_dir=tmp_path / "spill")
    try:
        exporter.export(spans)  # SUCCESS or not: kept in the spill store either way
        stats = exporter.stats()
        assert stats["dropped"] == 0 and stats["spilled"] == len(spans), stats
        assert says in caplog.text and "dropping span" not in caplog.text
        assert len(SpillStore(tmp_path / "spill").pending()) == 1
        repair(db)
        assert exporter.replay() == (len(spans), 0)
    finally:
        exporter.shutdown()
    assert stored_spans(url) == expected_keys(spans)


def test_db_upgrade_of_a_newer_schema_is_one_line_and_exit_2(tmp_path):
    db = tmp_path / "cmbagent.db"
    newer_revision(db)
    done = cli("--db", f"sqlite:///{db}", "db", "upgrade")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "cmbagent-otel: error: Can't locate revision identified by '0099_from_a_later_version' "
        f"(this cmbagent-otel knows up to {', '.join(head_revisions())})"]


def test_db_upgrade_of_a_foreign_runs_table_is_one_line_and_exit_2(tmp_path):
    """It stamped head and exited 0, and every export then failed (``no column named session_id``)."""
    db = tmp_path / "cmbagent.db"
    foreign_runs(db)
    done = cli("--db", f"sqlite:///{db}", "db", "upgrade")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "table workflow_runs lacks agent, branch_depth" in lines[0], lines
