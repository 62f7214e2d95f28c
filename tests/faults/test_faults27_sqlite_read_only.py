"""Twenty-seventh fault campaign: the SQLite database's file system made read-only mid-run.

The database lives on a small tmpfs this test mounts (root only; skipped where mounting is not
permitted). Between two exports the file system is remounted read-only (the kernel refuses while
a connection has the file open for writing, so the exporter's connections are closed first, as
after a reconnect), spans exported then go to the spill store (spill files live elsewhere) with
one log line, and after it is writable again a replay stores every span as a direct write does.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter

from .conftest import dump, plan_run_spans, reference


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextlib.contextmanager
def small_tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir()
    try:
        done = _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where))
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        _mount("-o", "remount,rw", str(where))
        subprocess.run(["umount", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    done = _mount("-o", f"remount,{mode}", str(where))
    assert done.returncode == 0, done.stderr


def test_faults27_sqlite_file_system_read_only_mid_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with small_tmpfs(tmp_path / "disk") as disk:
        url = f"sqlite:///{disk}/cmbagent.db"
        spill_dir = tmp_path / "spill"
        before, during, more = plan_run_spans("before"), plan_run_spans("during"), plan_run_spans("more")
        exporter = DagSpanExporter(url, spill_dir=spill_dir, timeout=5)
        exporter.replay_after_export = False
        try:
            assert exporter.export(before).name == "SUCCESS"
            # the kernel refuses to remount while a connection holds the file open for writing
            assert exporter._writer is not None
            exporter._writer.close()
            remount(disk, "ro")
            with caplog.at_level(logging.INFO, logger="cmbagent_otel"):
                exporter.export(during)
                exporter.export(more)
            stats = exporter.stats()
            assert stats["dropped"] == 0, stats
            assert stats["spilled"] == len(during) + len(more), stats
            assert list(spill_dir.iterdir()), "nothing spilled"
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            # one line for the outage (on main: one more per reconnect attempt, 13 for two batches)
            assert len(lines) == 1, lines
            assert str(disk / "cmbagent.db") in lines[0] and str(spill_dir) in lines[0], lines
            remount(disk, "rw")
            assert exporter.replay() == (len(during) + len(more), 0)
        finally:
            exporter.shutdown()
        assert exporter.stats()["dropped"] == 0
        assert not list(spill_dir.iterdir())
        assert dump(url) == reference([*before, *during, *more], f"sqlite:///{tmp_path}/ref.db")
