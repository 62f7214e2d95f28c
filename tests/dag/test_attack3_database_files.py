"""The SQLite files we create are their owner's alone; a planted link is not written through.

Found by the twenty-first campaign (the eighteenth had declined it). The DAG database holds what a
run captured (prompts, answers, code output, errors), and SQLite created its file with the umask's
mode, 0644 usually, readable by every local user, as were its ``-wal`` and ``-shm`` files (SQLite
copies the database file's mode) and the ``database/`` folder we made (0755). A symbolic link to
nothing planted at the database path (a shared work dir) made SQLite create the file wherever it
pointed. Now a database file we create is 0600 (its folder 0700) before SQLite opens it, again when
it was deleted and is made anew; a file already there keeps its mode; a link to nothing is refused
(the batch waits in the spill store, like any database that cannot be opened).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cmbagent_otel._spans import workflow_tracers
from cmbagent_otel.dag import DagWriter
from cmbagent_otel.dag.writer import DatabaseUnavailable

from .scenario import run_scenario

SRC = Path(__file__).resolve().parents[2]


@pytest.fixture
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def spans() -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with workflow_tracers.routed_to(provider):
        run_scenario()
    return list(memory.get_finished_spans())


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.usefixtures("usual_umask")
def test_attack3_a_new_database_and_its_wal_are_owner_only(tmp_path: Path, spans: list[ReadableSpan]) -> None:
    db = tmp_path / "work" / "database" / "cmbagent.db"
    writer = DagWriter(f"sqlite:///{db}")
    try:
        writer.write(spans)
        # the writer's pooled connection keeps the WAL and shared-memory files while it lives
        modes = {p.name: _mode(p) for p in db.parent.iterdir()}
    finally:
        writer.close()
    assert {"cmbagent.db", "cmbagent.db-wal", "cmbagent.db-shm"} <= set(modes), modes
    assert set(modes.values()) == {0o600}, {k: oct(v) for k, v in modes.items()}
    assert _mode(db.parent) == 0o700


@pytest.mark.usefixtures("usual_umask")
def test_attack3_a_database_deleted_mid_run_is_made_again_owner_only(tmp_path: Path,
                                                                      spans: list[ReadableSpan]) -> None:
    db = tmp_path / "cmbagent.db"
    writer = DagWriter(f"sqlite:///{db}")
    try:
        writer.write(spans[:5])
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        writer.write(spans[5:])
    finally:
        writer.close()
    assert _mode(db) == 0o600


@pytest.mark.usefixtures("usual_umask")
def test_attack3_the_cli_creates_an_owner_only_database(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    done = subprocess.run([sys.executable, "-m", "cmbagent_otel.cli", "--db", f"sqlite:///{db}", "db", "upgrade"],
                          capture_output=True, text=True, timeout=120, cwd=SRC,
                          env={**os.environ, "PYTHONPATH": f"{SRC / 'src'}:{SRC}"})
    assert done.returncode == 0, done.stderr
    assert _mode(db) == 0o600


@pytest.mark.usefixtures("usual_umask")
def test_attack3_an_existing_database_keeps_its_mode(tmp_path: Path, spans: list[ReadableSpan]) -> None:
    db = tmp_path / "shared.db"
    db.touch(mode=0o664)  # cmbagent's own, or the user's choice: never changed
    os.chmod(db, 0o664)
    writer = DagWriter(f"sqlite:///{db}")
    try:
        writer.write(spans)
    finally:
        writer.close()
    assert _mode(db) == 0o664


def test_attack3_a_link_to_an_existing_file_is_the_users_choice(tmp_path: Path, spans: list[ReadableSpan]) -> None:
    real = tmp_path / "elsewhere" / "real.db"
    real.parent.mkdir()
    real.touch()
    link = tmp_path / "cmbagent.db"
    link.symlink_to(real)
    writer = DagWriter(f"sqlite:///{link}")
    try:
        writer.write(spans)
    finally:
        writer.close()
    assert real.stat().st_size > 0 and link.is_symlink()


def test_attack3_a_link_to_nothing_is_not_written_through(tmp_path: Path, spans: list[ReadableSpan]) -> None:
    target = tmp_path / "attacker" / "loot.db"
    target.parent.mkdir()
    link = tmp_path / "database" / "cmbagent.db"
    link.parent.mkdir()
    link.symlink_to(target)
    writer = DagWriter(f"sqlite:///{link}")
    try:
        with pytest.raises(DatabaseUnavailable):
            writer.write(spans)
    finally:
        writer.close()
    assert not target.exists() and not list(target.parent.iterdir())


def test_attack3_the_exporter_spills_what_a_link_to_nothing_refuses(tmp_path: Path,
                                                                    spans: list[ReadableSpan]) -> None:
    target = tmp_path / "attacker" / "loot.db"
    target.parent.mkdir()
    link = tmp_path / "cmbagent.db"
    link.symlink_to(target)
    exporter = DagSpanExporter(f"sqlite:///{link}", timeout=0.5, spill_dir=tmp_path / "spill")
    try:
        exporter.export(spans)
        assert exporter.stats()["spilled"] == len(spans)
    finally:
        exporter.shutdown()
    assert not target.exists()
