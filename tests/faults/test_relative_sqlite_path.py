"""A relative SQLite URL names the file of the directory the exporter was made in.

SQLite opens a relative path in the working directory of the moment. An application that
changes directory during a run (into cmbagent's work dirs, a job's scratch folder) with
``CMBAGENT_OTEL_DATABASE_URL=sqlite:///runs.db`` had its DAG exporter write wherever it
stood at each export: the writer, made at the first export, opened the new directory's file;
a writer made before took the move for a deleted database ("was deleted or replaced;
reconnecting and migrating again") and wrote the rest of the run into a new database
there, while the spill store kept the first directory's file as its target. The run's rows
ended up apart from where the user looked, or split between two files (twelfth fault
campaign). The exporter and the writer now make such a path absolute when they are made.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import workflow_tracers


def _runs(path: Path) -> list[str]:
    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT task_description FROM workflow_runs ORDER BY task_description")]
    finally:
        conn.close()


@pytest.mark.parametrize("source", ["argument", "environment"])
@pytest.mark.parametrize("first_export", ["before the move", "after the move"])
def test_every_run_goes_to_the_file_named_where_the_exporter_was_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        source: str, first_export: str) -> None:
    start, work = tmp_path / "start", tmp_path / "work"
    start.mkdir()
    work.mkdir()
    monkeypatch.chdir(start)
    if source == "environment":
        monkeypatch.setenv("CMBAGENT_OTEL_DATABASE_URL", "sqlite:///runs.db")
    exporter = DagSpanExporter("sqlite:///runs.db" if source == "argument" else None,
                               spill_dir=tmp_path / "spill")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    caplog.set_level(logging.WARNING, logger="cmbagent_otel")
    try:
        with workflow_tracers.routed_to(provider):
            if first_export == "after the move":
                monkeypatch.chdir(work)  # nothing exported yet: the writer is made here
            for task in ("first", "second"):
                with workflow(task, mode="one-shot", task=task), phase("control"), step(1, "fit"):
                    pass
                monkeypatch.chdir(work)
        provider.force_flush()
        stats = exporter.stats()
    finally:
        provider.shutdown()
    assert _runs(start / "runs.db") == ["first", "second"]
    assert not (work / "runs.db").exists()
    assert stats["spilled"] == stats["dropped"] == 0
    assert not [r for r in caplog.records if "deleted or replaced" in r.getMessage()]



def test_a_relative_file_in_a_deleted_working_directory_is_named_as_the_problem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # os.getcwd() fails there: the exporter (and so instrument()) is still made, and says why it drops
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    caplog.set_level(logging.ERROR, logger="cmbagent_otel")
    exporter = DagSpanExporter("sqlite:///runs.db", spill_dir=tmp_path / "spill")
    exporter.shutdown()
    assert exporter.target is None
    assert any("'runs.db' is relative to a working directory that no longer exists" in r.getMessage()
               for r in caplog.records)
