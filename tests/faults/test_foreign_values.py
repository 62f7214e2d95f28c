"""The CLI reads values of the wrong type in another writer's rows without a traceback.

SQLite keeps any value in any column, and ``runs``, ``dag`` and ``events`` read the
cmbagent-compatible tables whoever wrote them (tenth fault campaign). Text in a ``DATETIME``
column made the driver's conversion raise while rows were fetched, invalid JSON in the run's
``meta`` made the driver's ``json.loads`` raise, text in ``duration_ms`` or ``depth`` (or a
depth of 2**62) broke the events table, bytes in a text column broke ``runs --format json``:
each printed a traceback and exited 1. A value the reader can show is now shown (``-`` for a
duration that is no number, no indent for a depth that is no whole number); a timestamp it
cannot convert is shown as stored with one warning line naming the database (since the twelfth
campaign; it was one line and exit 2).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel.cli import main
from tests.cli.test_rows_from_other_writers import COMMANDS, db  # noqa: F401 (db: fixture)

# (table, column, value): values another writer may leave that the reader can show
SHOWN = [
    ("workflow_runs", "meta", "{not json"),
    ("workflow_runs", "mode", b"\x00\xff"),
    ("workflow_runs", "status", b"\x00\xff"),
    ("execution_events", "duration_ms", "abc"),
    ("execution_events", "depth", "x"),
    ("execution_events", "depth", 1e308),
    ("execution_events", "depth", 2**62),
]


def _store(db: Path, table: str, column: str, value: Any) -> None:  # noqa: F811
    conn = sqlite3.connect(db)
    with conn:
        assert conn.execute(f"UPDATE {table} SET {column} = ?", (value,)).rowcount > 0
    conn.close()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize(("table", "column", "value"), SHOWN, ids=lambda v: repr(v)[:16])
def test_wrong_typed_values_of_other_writers_are_shown(db: Path, table: str, column: str, value: Any,  # noqa: F811
                                                       command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    _store(db, table, column, value)
    assert main(["--db", f"sqlite:///{db}", *command]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("column", ["started_at", "completed_at"])
def test_a_timestamp_that_is_no_date_is_shown_with_one_warning(db: Path, column: str, command: list[str],  # noqa: F811
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # until the twelfth campaign: one line and exit 2 for every run (tests/faults/test_foreign_timestamps.py)
    _store(db, "workflow_runs", column, "not a date")
    assert main(["--db", f"sqlite:///{db}", *command]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("warning: ") and "'not a date'" in err and str(db) in err
