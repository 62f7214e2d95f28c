"""A SQLite upgrade held mid-way, then killed (thirty-sixth fault campaign; held up, pinned here).

Since ac41748 a SQLite upgrade is one transaction begun with ``BEGIN IMMEDIATE`` before the version is
read. While a long one holds that lock (a large table copied by a batch migration), an application's
export waits no longer than its deadline and is told the database is unavailable (so it spills), and
``cmbagent-otel runs`` reads the database as it was; a process killed in the middle leaves the old
revision whole, and the next upgrade completes. Held at its first ``CREATE TABLE`` (revision 0003,
cmbagent's own tables) by a hook in the upgrading process.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cmbagent_otel.cli import main
from cmbagent_otel.dag.database import head_revisions, upgrade
from cmbagent_otel.dag.query import DagReader
from cmbagent_otel.dag.writer import DagWriter, DatabaseUnavailable

from .conftest import plan_run_spans

UPGRADE_HELD = r"""
import sys, threading
from sqlalchemy import event
from sqlalchemy.engine import Engine
from cmbagent_otel.dag.database import upgrade

@event.listens_for(Engine, "before_cursor_execute")
def hold(conn, cursor, statement, *args):
    if statement.lstrip().startswith("CREATE TABLE"):
        print(statement.split()[2].strip('"'), flush=True)
        threading.Event().wait()  # until killed

upgrade(sys.argv[1])
"""


def test_an_upgrade_killed_mid_way_leaves_the_old_revision_whole(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db}"
    upgrade(url, "0001_tracking_schema")
    upgrading = subprocess.Popen([sys.executable, "-c", UPGRADE_HELD, url], stdout=subprocess.PIPE, text=True)
    try:
        assert upgrading.stdout is not None
        creating = upgrading.stdout.readline().strip()  # the table revision 0003 is creating
        assert creating
        writer = DagWriter(url)
        try:
            with pytest.raises(DatabaseUnavailable, match="database is locked"):
                writer.write(plan_run_spans("meanwhile"), timeout=1)
        finally:
            writer.close()
        assert main(["--db", url, "runs"]) == 2  # read as it is: no runs yet, said in one line
        assert capsys.readouterr().err.startswith("cmbagent-otel: error: no runs in")
    finally:
        upgrading.kill()
        upgrading.wait()
    assert DagReader.revision(url) == "0001_tracking_schema"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert creating not in tables and "dag_nodes" in tables
    conn.close()
    writer = DagWriter(url)
    try:
        writer.write(plan_run_spans("after"))  # migrates to head first
    finally:
        writer.close()
    assert DagReader.revision(url) == head_revisions()[0]
    assert main(["--db", url, "runs"]) == 0
