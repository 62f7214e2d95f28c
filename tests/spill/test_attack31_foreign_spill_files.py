"""Thirty-first campaign (attacks): spill files another user planted in a spill folder they can write.

Replay read every file of the spill folder named like a spill file and recording our database, and
wrote its spans into that database: in a folder others can write (a shared ``CMBAGENT_OTEL_SPILL_DIR``
such as ``/tmp/spill``, or one another user created before the store did: ``mkdir(exist_ok=True)``
takes it as it is) anyone could put runs of their making into the user's database. The files a store
writes are always its user's own (created new, 0600), so a file another user owns is now left in
place, never replayed nor set aside as ``.bad``, with one warning per store; the check is made when
the folder is listed and again on the open file (a file swapped after the listing).

Planting a file owned by another user needs ``chown``, so these tests run as root only.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.dag.database import target_of
from cmbagent_otel.spill import SpillStore, SpillUnreadable, read_spill

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="planting another user's file needs root (chown)")

OTHER = 65534  # nobody


def _run(capture, name: str) -> list:
    before = len(capture.spans)
    with workflow(name, mode="one-shot"), phase("control"), step(1, "goal"):
        pass
    return capture.spans[before:]


def test_another_users_spill_file_is_never_replayed(capture, tmp_path: Path, caplog) -> None:
    url = f"sqlite:///{tmp_path}/runs.db"
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o1777)  # a folder every user can write, like /tmp
    planted = SpillStore(folder, target_of(url)).append(_run(capture, "forged"))  # in the spill format
    for path in planted:
        os.chown(path, OTHER, OTHER)
    own = _run(capture, "ours")
    SpillStore(folder, target_of(url)).append(own)
    exporter = DagSpanExporter(url, spill_dir=folder)
    try:
        with caplog.at_level(logging.WARNING, logger="cmbagent_otel"):
            assert exporter.replay() == (len(own), 0)
            assert exporter.force_flush(1000)  # nothing of ours is left
    finally:
        exporter.shutdown()
    with sqlite3.connect(tmp_path / "runs.db") as conn:
        runs = conn.execute("SELECT count(*) FROM workflow_runs").fetchone()[0]
    assert runs == 1  # ours, not the planted one
    assert all(p.exists() for p in planted) and not list(folder.glob("*.bad"))  # left alone
    assert sum("owned by another user" in r.getMessage() for r in caplog.records) == 1


def test_a_file_swapped_after_the_listing_is_not_read(capture, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/runs.db"
    [path] = SpillStore(tmp_path / "spill", target_of(url)).append(_run(capture, "forged"))
    assert read_spill(path).spans
    os.chown(path, OTHER, OTHER)
    with pytest.raises(SpillUnreadable, match="owned by another user"):
        read_spill(path)
