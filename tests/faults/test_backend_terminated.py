"""A PostgreSQL backend terminated in the middle of a batch loses nothing and stores nothing twice.

An operator's ``pg_terminate_backend`` (or a server's idle or failover policy) ends the exporter's
connection while its transaction waits inside a batch: the batch is written again on a new
connection (SQLSTATE 57P01 is retried), its rows once.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from sqlalchemy import create_engine, text

from cmbagent_otel.dag.database import upgrade

from .conftest import dump, plan_run_spans, reference

pytestmark = pytest.mark.postgres


def test_backend_terminated_while_its_batch_waits_is_written_once(pg_schema: Any, tmp_path: Path) -> None:
    spans = plan_run_spans("terminated", steps=5)
    with pg_schema() as url, pg_schema() as ref_url:
        upgrade(url)
        schema = url.rpartition("search_path%3D")[2] or url.rpartition("search_path=")[2]
        exporter = DagSpanExporter(url, timeout=30, spill_dir=tmp_path / "spill")
        admin = create_engine(url)
        result: list[Any] = []
        try:
            with admin.connect() as holder, admin.connect() as killer:
                holder.execute(text("BEGIN"))
                holder.execute(text("LOCK TABLE dag_nodes IN ACCESS EXCLUSIVE MODE"))
                worker = threading.Thread(target=lambda: result.append(exporter.export(spans)))
                worker.start()
                killed = 0
                # the exporter's backend, waiting for the lock inside its batch: a backend waiting for
                # this schema's table (the server and database are shared with other tests and suites)
                while not killed:
                    killed = killer.execute(text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE NOT granted "
                        "AND relation = 'dag_nodes'::regclass AND pid <> pg_backend_pid()")).scalar()
                    killer.commit()
                    assert worker.is_alive() or result, "the export ended before it was interrupted"
                holder.execute(text("COMMIT"))
                worker.join(60)
                assert not worker.is_alive()
        finally:
            admin.dispose()
        stats = exporter.stats()
        exporter.shutdown()
        assert result and result[0].name == "SUCCESS", (result, stats)
        assert stats["dropped"] == 0 and stats["exported"] + stats["spilled"] == len(spans), stats
        if stats["spilled"]:
            exporter2 = DagSpanExporter(url, spill_dir=tmp_path / "spill")
            exporter2.force_flush()
            exporter2.shutdown()
        assert dump(url) == reference(spans, ref_url), schema
