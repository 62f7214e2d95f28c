"""A SQLite file that cannot be looked at is not a deleted one (thirty-seventh fault campaign).

A writer that finds its database file deleted removes the ``-wal``/``-shm`` the deleted file left before
it connects again (under the folder's ``creation_lock``, so never those of a file another writer of ours
created meanwhile). "Deleted" was any failing ``stat``: an I/O error (a failing disk, a network file
system's stale handle), which says nothing of the file, made the writer remove the live WAL of a database
still there, open in other connections: the commits in that WAL were gone for every new connection (and
the old ones wrote on in a WAL no one else would read). Forced by an ``os.stat`` of the writer's module
failing with ``EIO`` for the database file while another connection keeps the WAL from being
checkpointed away.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cmbagent_otel.dag import writer as writer_module
from cmbagent_otel.dag.writer import DagWriter

from .conftest import plan_run_spans


def _failing_stat(path: Path) -> SimpleNamespace:
    """The ``os`` the writer's module sees: ``stat`` of ``path`` fails with EIO, the rest is ``os``."""
    def stat(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if os.fspath(target) == os.fspath(path):
            raise OSError(errno.EIO, "Input/output error", os.fspath(target))
        return os.stat(target, *args, **kwargs)

    class FailingOs(SimpleNamespace):
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

    return FailingOs(stat=stat)


def test_an_unreadable_stat_keeps_the_live_wal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cmbagent.db"
    writer = DagWriter(f"sqlite:///{path}")
    other = None
    try:
        writer.write(plan_run_spans("before"))
        other = sqlite3.connect(path)  # another program's connection: the WAL stays when the writer's close
        other.execute("PRAGMA wal_autocheckpoint=0")
        assert other.execute("SELECT count(*) FROM workflow_runs").fetchone() == (1,)
        assert Path(f"{path}-wal").stat().st_size > 0
        monkeypatch.setattr(writer_module, "os", _failing_stat(path))
        writer.write(plan_run_spans("during"))  # its identity unknown: taken as replaced, reconnected
        monkeypatch.undo()
        writer.write(plan_run_spans("after"))
    finally:
        writer.close()
        if other is not None:
            other.close()
    fresh = sqlite3.connect(path)
    try:
        runs = fresh.execute("SELECT count(*) FROM workflow_runs").fetchone()[0]
        check = fresh.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        fresh.close()
    # on main 86547de the live -wal and -shm were removed: the write after failed with "disk I/O error"
    assert (runs, check) == (3, "ok")  # before, during (its identity unknown, written all the same), after
