"""The reading commands while a schema change holds the tables (thirty-seventh fault campaign).

A `cmbagent-otel db upgrade` on PostgreSQL runs its revisions in one transaction: each ``ALTER TABLE``
takes the table's ACCESS EXCLUSIVE lock until that transaction ends, and a reader's ``SELECT`` waits
for it. ``runs``, ``dag`` and ``events`` waited without a bound and without a word (main 86547de): for
as long as the upgrade ran, or for ever behind a session left idle inside such a transaction. Forced
with a real ``ALTER TABLE`` left uncommitted in another session; that session is ended by the server
after 30 s (``idle_in_transaction_session_timeout``), so on main the command finally read the
database (exit 0) instead of failing the test by hanging.
"""

from __future__ import annotations

import contextlib

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from cmbagent_otel.cli import main
from cmbagent_otel.dag import query
from cmbagent_otel.dag.writer import DagWriter

from .conftest import plan_run_spans

pytestmark = pytest.mark.postgres

COMMANDS = (("runs",), ("dag", "latest"), ("events", "latest"))


@pytest.mark.parametrize("table", ["workflow_runs", "dag_nodes"])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_reader_behind_a_schema_change_gives_up_with_one_clear_line(
        command: tuple[str, ...], table: str, pg_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    writer = DagWriter(pg_url)
    try:
        writer.write(plan_run_spans("read"))
    finally:
        writer.close()
    assert main(["--db", pg_url, *command]) == 0
    capsys.readouterr()
    monkeypatch.setattr(query, "READ_LOCK_WAIT_MS", 200, raising=False)  # raising: main lacks it
    upgrade = create_engine(pg_url)
    try:
        with upgrade.connect() as conn:
            conn.execute(text("SET idle_in_transaction_session_timeout = 30000"))
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN faults40_upgrade_column INTEGER"))
            # the transaction stays open, as an upgrade's does until its last revision
            code = main(["--db", pg_url, *command])
            err = capsys.readouterr().err
            with contextlib.suppress(SQLAlchemyError):  # on main the server had ended this session
                conn.rollback()
    finally:
        upgrade.dispose()
    assert code == 2, (code, err)  # 0 on main 86547de, after the holder's session was ended 30 s later
    assert err.startswith("cmbagent-otel: error: ") and err.count("\n") == 1, err
    assert "locked by another session for 0.2 s" in err and "db upgrade" in err, err
