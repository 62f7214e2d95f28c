"""A long database outage logs one line, and one when it ends (fourteenth fault campaign).

While the DAG database was away every spilled batch logged its own warning (``…; N spans kept in
the spill store …``): an outage of an hour at one batch a second is 3,600 lines, and the line that
mattered (the first, naming the cause) scrolled away. The exporter now says it once per outage,
counts the batches it spills meanwhile, and says once, with those counts, when the database is
back; the backlog's replay is one line too. Nothing changes in what is stored: every span is
written once (the rows equal a direct write of the recorded spans).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter

from cmbagent_otel import phase, workflow
from cmbagent_otel.dag.database import upgrade

from .conftest import dump, reference
from .test_campaign import SQLITE_HOLDER, lock_held, steps, traced


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("cmbagent_otel") and r.levelno >= level]


def test_a_long_outage_logs_one_line_when_it_starts_and_one_when_it_ends(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMBAGENT_OTEL_SQLITE_BUSY_TIMEOUT_MS", raising=False)
    caplog.set_level(logging.DEBUG, logger="cmbagent_otel")
    db_path = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db_path}"
    upgrade(url)
    exporter = DagSpanExporter(url, timeout=0.3, spill_dir=tmp_path / "spill")
    with traced(exporter, max_export_batch_size=5) as (provider, record, _), \
            workflow("outage", mode="planning-control"), phase("control"):
        steps(1, 1)
        assert provider.force_flush()
        with lock_held(SQLITE_HOLDER, str(db_path)):
            for number in range(2, 10):  # one step (5 spans) per batch: eight batches while locked
                steps(number, number)
                provider.force_flush(2000)
            during = exporter.stats()
            assert during["spilled"] >= 40 and during["dropped"] == 0
            warnings = _messages(caplog, logging.WARNING)
            assert len(warnings) == 1, warnings  # was one per batch (eight)
            assert "database is locked" in warnings[0] and "spill store" in warnings[0]
        caplog.clear()
        steps(10, 10)
        assert provider.force_flush()
        back = _messages(caplog, logging.WARNING)
        assert len(back) == 1 and "is back after" in back[0], back
        assert f"{during['spilled']} spans (" in back[0]  # the outage's count, once
        assert len([m for m in _messages(caplog, logging.INFO) if m.startswith("cmbagent_otel: replayed")]) == 1
    spans = record.get_finished_spans()
    stats = exporter.stats()
    assert stats["dropped"] == 0 and stats["replayed"] == stats["spilled"]
    assert stats["exported"] + stats["replayed"] == len(spans)
    assert dump(url) == reference(spans, f"sqlite:///{tmp_path}/reference.db")
