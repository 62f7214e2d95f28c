"""A SQLite reader holding one snapshot while the exporter writes (thirty-sixth fault campaign).

A read transaction (``DagReader``'s snapshot, a backup, a ``sqlite3`` shell or a UI left in a
transaction) keeps every commit made meanwhile in the WAL: it cannot be checkpointed past what the
reader sees, so the WAL grows for as long as the reader stays. That is SQLite's. What was ours:
afterwards SQLite checkpoints and reuses the WAL from its start but never shrinks the file, so it kept
its peak size for as long as a writer's connection stayed open (an ingest server: days). Measured on
main d1ab575: a 4 MB database kept a 42 MB WAL after 87 batches written under one reader. The writer's
connections now set ``PRAGMA journal_size_limit`` (``WAL_SIZE_LIMIT``, 16 MiB): the WAL is cut back to
it when it starts over.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cmbagent_otel.dag import database
from cmbagent_otel.dag.query import DagReader
from cmbagent_otel.dag.writer import DagWriter

from .conftest import plan_run_spans

LIMIT = 1 << 20  # made small here; the WAL must still pass SQLite's checkpoint at 1,000 pages (~4 MB)


def test_the_wal_a_long_reader_made_grow_is_cut_back_once_it_has_gone(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "WAL_SIZE_LIMIT", LIMIT, raising=False)  # no such limit on d1ab575
    db = tmp_path / "cmbagent.db"
    wal = Path(f"{db}-wal")
    writer = DagWriter(f"sqlite:///{db}")
    try:
        writer.write(plan_run_spans("before"))
        with DagReader(f"sqlite:///{db}") as reader:
            reader.runs()  # the snapshot is taken
            batch = 0
            while wal.stat().st_size <= 6 << 20:
                writer.write(plan_run_spans(f"during-{batch}", steps=30))
                batch += 1
        # the first write after the reader checkpoints the whole WAL, the next starts it over
        for after in range(2):
            writer.write(plan_run_spans(f"after-{after}", steps=30))
        assert wal.stat().st_size <= LIMIT, f"the WAL kept {wal.stat().st_size} bytes after the reader went"
    finally:
        writer.close()
