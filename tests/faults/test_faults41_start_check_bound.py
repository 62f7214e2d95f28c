"""The ingest's start-time schema report is bounded when the check's thread is another caller's (thirty-ninth
fault campaign; the thirty-sixth campaign's Left (2), carried since).

``IngestServer.start()`` checks the schema in a background thread bounded to ``STARTUP_PREPARE_S`` (10 s) and
``cmbagent-otel ingest`` reports a database it cannot write from ``IngestCore.startup_error()``, which waited
for that thread to end. ``prepare_in_background`` runs one schema step per URL per process and hands a later
caller the one already running: in a process where an instrumented application's DAG exporter warms up the
same database (bounded to ``BACKGROUND_PREPARE_S``, 120 s), the start waited for that thread, past its own
bound, and then reported nothing of it. ``startup_error`` now waits no longer than ``STARTUP_PREPARE_S`` and a
margin (``STARTUP_REPORT_MARGIN_S``).

The other caller's step waits for a real ``flock`` this test holds on the SQLite file's folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter

import cmbagent_otel._ingest_core as ingest_core
from cmbagent_otel.dag import database
from cmbagent_otel.dag.database import BUSY_TIMEOUT_ENV
from cmbagent_otel.ingest import IngestServer

from .conftest import folder_locked
from .test_faults34_interleavings import audit_actions, flock_tried_by  # noqa: F401 (a fixture)

HANG_S = 120  # a hang guard: every wait below ends long before unless the code hangs


@pytest.mark.usefixtures("audit_actions")
def test_the_start_report_does_not_wait_for_another_callers_schema_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails on 3c387d5: startup_error() returns only once the other caller's thread has given up."""
    monkeypatch.setenv(BUSY_TIMEOUT_ENV, "600000")  # the other step waits for the lock to its own bound
    monkeypatch.setattr(database, "BACKGROUND_PREPARE_S", 20.0)  # that bound (120 s), shorter for main's run
    monkeypatch.setattr(ingest_core, "STARTUP_PREPARE_S", 0.2)
    monkeypatch.setattr(ingest_core, "STARTUP_REPORT_MARGIN_S", 0.2, raising=False)  # (none on main)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    exporter = DagSpanExporter(url, spill_dir=tmp_path / "spill")
    server = IngestServer(url, host="127.0.0.1", port=0, grpc_port="off")
    try:
        with folder_locked(tmp_path):
            other = exporter.warm_up()  # the application's schema step for the same database
            assert other is not None
            assert flock_tried_by(other).wait(HANG_S), "the other step never tried the folder's lock"
            server.start()
            assert server.core._startup is other  # handed over: one schema step per URL per process
            assert server.core.startup_error() is None  # nothing known of it yet
            assert other.is_alive(), "the start's report waited for the other caller's step to give up"
        other.join(HANG_S)
    finally:
        server.stop()
        exporter.shutdown()
