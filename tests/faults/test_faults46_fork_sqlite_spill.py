"""A child forked while its parent is inside a SQLite transaction spills; the living parent writes it (session 46).

SQLite keeps a file's lock state in the process (its ``unixInodeInfo``), and a forked child inherits it: forked
while the parent held a transaction on the DAG database, the child finds the file locked by a connection that
is not there, waits out its export timeout and keeps its batch in the spill store. Those files waited for the
next process writing that database: the parent, which lives on, replayed only the files it had spilled itself.
Now a process that has forked looks at the spill folder again after its exports, and writes them.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult
from sqlalchemy import create_engine, text

from cmbagent_otel import phase, step, workflow

from .test_fork_locks import wait_child

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")


def _run(capture, name: str) -> list:  # type: ignore[no-untyped-def]
    capture.exporter.clear()
    with workflow(name, mode="one_shot"), phase("control"), step(1, f"{name} goal"):
        pass
    return list(capture.spans)


def _runs(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM workflow_runs")).scalar_one())
    finally:
        engine.dispose()


def test_a_child_forked_inside_the_parents_sqlite_transaction_has_its_spill_written(capture, tmp_path: Path,
                                                                                      sqlite_url: str) -> None:
    before, child, after = (_run(capture, name) for name in ("parent before", "child", "parent after"))
    exporter = DagSpanExporter(sqlite_url, timeout=0.5, spill_dir=tmp_path / "spill")
    try:
        assert exporter.export(before) is SpanExportResult.SUCCESS
        held = sqlite3.connect(tmp_path / "cmbagent.db", isolation_level=None)
        held.execute("BEGIN IMMEDIATE")  # the parent inside a write transaction at the fork
        pid = os.fork()
        if pid == 0:
            code = 1
            try:  # the database is locked for good in the child: its batch goes to the spill store
                exported = exporter.export(child)
                code = 0 if exported is SpanExportResult.SUCCESS and exporter.stats()["spilled"] else 2
            finally:
                os._exit(code)
        held.rollback()
        held.close()
        assert wait_child(pid) == 0
        assert exporter.export(after) is SpanExportResult.SUCCESS
        # before: the child's run waited in the spill store for the next process writing this database
        assert _runs(sqlite_url) == 3, exporter.stats()
    finally:
        exporter.shutdown()
