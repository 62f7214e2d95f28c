"""Twenty-seventh fault campaign: the PostgreSQL server stopped and started again mid-run.

The server is the test's own throwaway cluster (``tests.ingest.test_loss_ingest.Cluster``: its
own data folder and port, stopped with ``pg_ctl``), never the shared one. The exporter's pooled
connections die with the server: batches exported while it is down are spilled (each export
returns: the deadline, not the server, bounds it), nothing is dropped, one line tells of the
outage, and after the server is back the backlog is replayed and the next export is stored, so
the tables equal a direct write of every span.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from sqlalchemy import create_engine, make_url, text

from cmbagent_otel import phase, workflow
from tests.ingest.test_loss_ingest import Cluster, cluster  # noqa: F401 (cluster: fixture)

from .conftest import dump, plan_run_spans, reference
from .test_campaign import steps, traced


def new_database(url: str, name: str) -> str:
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def test_faults27_postgres_stopped_and_restarted_mid_run(tmp_path: Path, cluster: Cluster,  # noqa: F811
                                                        caplog: pytest.LogCaptureFixture) -> None:
    url, ref_url = new_database(cluster.url, "app"), new_database(cluster.url, "ref")
    spill_dir = tmp_path / "spill"
    before, down, more, after = (plan_run_spans(name) for name in ("before", "down", "more", "after"))
    exporter = DagSpanExporter(url, spill_dir=spill_dir, timeout=5)
    exporter.replay_after_export = False
    try:
        assert exporter.export(before).name == "SUCCESS"  # connections pooled
        cluster.stop()
        with caplog.at_level(logging.INFO, logger="cmbagent_otel"):
            exporter.export(down)
            exporter.export(more)
        stats = exporter.stats()
        assert stats["dropped"] == 0 and stats["spilled"] == len(down) + len(more), stats
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(lines) == 1 and str(spill_dir) in lines[0], lines
        cluster.start()
        assert exporter.replay() == (len(down) + len(more), 0)
        assert exporter.export(after).name == "SUCCESS"
    finally:
        exporter.shutdown()
    assert exporter.stats()["dropped"] == 0
    assert not list(spill_dir.iterdir())
    assert dump(url) == reference([*before, *down, *more, *after], ref_url)


def test_faults27_postgres_down_under_a_run_behind_the_durable_processor(tmp_path: Path,
                                                                         cluster: Cluster) -> None:  # noqa: F811
    """A run whose middle steps end while the server is stopped: the processor's flush returns
    (the batches spilled), and the provider's shutdown after the server is back replays them."""
    url, ref_url = new_database(cluster.url, "app"), new_database(cluster.url, "ref")
    exporter = DagSpanExporter(url, spill_dir=tmp_path / "spill", timeout=5)
    with traced(exporter, max_export_batch_size=16) as (provider, record, processor), \
            workflow("restart", mode="planning-control"), phase("control"):
        steps(1, 2)
        assert provider.force_flush(300_000)
        cluster.stop()
        steps(3, 5)
        provider.force_flush(300_000)  # returns: the batches went to the spill store
        assert exporter.stats()["spilled"] > 0
        cluster.start()
        steps(6, 7)
    spans = list(record.get_finished_spans())
    stats = exporter.stats()
    assert stats["dropped"] == 0 and processor.stats().get("dropped", 0) == 0, (stats, processor.stats())
    assert not list((tmp_path / "spill").iterdir())
    assert dump(url) == reference(spans, ref_url)
