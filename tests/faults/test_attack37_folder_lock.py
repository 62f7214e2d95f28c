"""Another process holding the ``flock`` of the SQLite database's folder (37th attack campaign).

Creating the SQLite file and removing a deleted file's ``-wal``/``-shm`` take turns on an exclusive
``flock`` of the file's folder (``database.creation_lock``, 34th fault campaign). Reading a folder is
all ``flock`` needs, so any process that can list it (another user's, for a database in a shared or
world-readable folder) could hold it; the wait had no bound. The export thread waited for as long as
it was held, with the writer's own lock, so the application's exit (the exporter's shutdown closes
the writer) never came, and an ingest server's request was never answered. The wait is bounded now as
a database lock's is: the batch is spilled (the ingest answers 503) and written once the lock is let go.

Held here through a second open file description of the folder (``flock`` locks those, so this
process's own descriptor conflicts exactly as another process's does).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import cmbagent_otel
from cmbagent_otel.dag.writer import DagWriter, DatabaseUnavailable
from cmbagent_otel.replay import replay

from .conftest import expected_keys, folder_locked, plan_run_spans, stored_spans

SRC = Path(cmbagent_otel.__file__).resolve().parents[1]


def _write_in_thread(writer: DagWriter, spans: list[object]) -> BaseException | None:
    """``writer.write(spans)`` in a thread; its error (None once written). A hang guard, not a timing."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            writer.write(spans, timeout=1.0)  # type: ignore[arg-type]
            outcome.append(None)
        except BaseException as exc:  # handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(600)
    assert not thread.is_alive(), "the write is still waiting for the folder's lock"
    return outcome[0]


def test_a_write_to_a_new_file_in_a_locked_folder_is_retryable_not_endless(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cmbagent.db'}"
    spans = plan_run_spans("locked")
    writer = DagWriter(url)
    try:
        with folder_locked(tmp_path):
            error = _write_in_thread(writer, spans)  # waited for as long as the lock was held before
        assert isinstance(error, DatabaseUnavailable), error
        assert "holds the lock of the SQLite database's folder" in str(error)
        assert _write_in_thread(writer, spans) is None  # the lock let go: written
    finally:
        writer.close()
    assert all(stored_spans(url)[key] for key in expected_keys(spans))


def test_a_deleted_files_clean_up_in_a_locked_folder_waits_for_the_next_write(tmp_path: Path) -> None:
    db = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db}"
    before, after = plan_run_spans("before"), plan_run_spans("after")
    writer = DagWriter(url)
    try:
        assert _write_in_thread(writer, before) is None
        db.unlink()  # its -wal and -shm stay
        assert Path(f"{db}-wal").exists()
        with folder_locked(tmp_path):
            error = _write_in_thread(writer, after)
        assert isinstance(error, DatabaseUnavailable), error
        assert Path(f"{db}-wal").exists() and not db.exists()  # nothing removed or created unlocked
        assert _write_in_thread(writer, after) is None
    finally:
        writer.close()
    assert all(stored_spans(url)[key] for key in expected_keys(after))


APP = """
import cmbagent_otel
from cmbagent_otel import phase, step, workflow

cmbagent_otel.instrument()
with workflow("fit the spectrum", mode="one-shot"), phase("control"), step(1, "fit"):
    pass
print("APP DONE", flush=True)
"""


def test_an_application_exits_while_its_database_folder_is_locked(tmp_path: Path) -> None:
    folder, spill = tmp_path / "shared", tmp_path / "spill"
    folder.mkdir()
    url = f"sqlite:///{folder / 'cmbagent.db'}"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "CMBAGENT_OTEL_DATABASE_URL": url, "CMBAGENT_OTEL_SPILL_DIR": str(spill),
           "CMBAGENT_OTEL_SQLITE_BUSY_TIMEOUT_MS": "1000", "OTEL_TRACES_EXPORTER": "cmbagent_dag"}
    with folder_locked(folder):
        try:  # a hang guard: before, the process waited in its exit for as long as the lock was held
            done = subprocess.run([sys.executable, "-c", APP], env=env, cwd=tmp_path, capture_output=True,
                                  text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail("the application did not exit while its database folder was locked")
    assert done.returncode == 0 and "APP DONE" in done.stdout, done.stderr
    assert "holds the lock of the SQLite database's folder" in done.stderr  # said, and spilled
    assert replay(spill, url, say=lambda _line: None) == []  # every spill file written
    assert stored_spans(url), "the run was not kept"
