"""The spill store never fills the disk the application writes to.

With the database down for long, every batch used to go to the spill store until its
filesystem was full, and then the application's own writes (cmbagent's results share the work
dir) failed. The store now leaves ``CMBAGENT_OTEL_SPILL_RESERVE_MB`` (256) free, or 5 % of
the filesystem if that is less: past it a batch is dropped and counted with a log line, and
spilling resumes once there is room again. Checked on a real 8 MiB tmpfs (root only).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter

from cmbagent_otel.spill import SpillStore

from .test_schema_mismatch import run_spans


def tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, check=False
    ).returncode == 0


def test_spilling_stops_short_of_a_full_disk_and_resumes(tmp_path: Path, capture, caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "disk"
    if not tmpfs(disk, "8m"):
        pytest.skip("needs root to mount a tmpfs")
    try:
        monkeypatch.delenv("CMBAGENT_OTEL_SPILL_RESERVE_MB", raising=False)
        (tmp_path / "not-a-dir").write_text("")
        url = f"sqlite:///{tmp_path}/not-a-dir/cmbagent.db"  # never writable: every batch is spilled
        spans = run_spans(capture)
        filler = disk / "application-results.bin"
        st = os.statvfs(disk)
        # the application has used all but ~150 KiB of its disk (the reserve here: 5 % = 410 KiB)
        with open(filler, "wb") as out:
            out.write(b"\0" * (st.f_bavail * st.f_frsize - (150 << 10)))
        exporter = DagSpanExporter(url, timeout=0.2, spill_dir=disk / "spill")
        try:
            exporter.export(spans)
            stats = exporter.stats()
            assert stats["spilled"] == 0 and stats["dropped"] == len(spans), stats
            assert "leaving 0.4 MiB free for the application" in caplog.text
            assert os.statvfs(disk).f_bavail * st.f_frsize >= 140 << 10  # the application's room is left
            filler.unlink()  # room again: the next batch is kept
            exporter.export(spans)
            assert exporter.stats()["spilled"] == len(spans)
        finally:
            exporter.shutdown()
        assert len(SpillStore(disk / "spill").pending()) == 1
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
