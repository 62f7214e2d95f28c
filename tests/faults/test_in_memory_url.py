"""An in-memory SQLite URL given in code is refused like any invalid database URL.

``DagSpanExporter("sqlite://")`` opened a fresh empty database on every connection: each
batch "lost its schema", was retried, then went to the spill store, bound to a database no
process could ever replay it into, for ever (the environment-variable path already refused
such URLs). The same held for ``IngestServer("sqlite://")`` (every request stored nowhere)
and ``cmbagent-otel replay --to sqlite://`` / ``ingest --db sqlite://``. Now each of them
refuses it: the exporter logs one error and drops (counted) like for any invalid URL, the
ingest server and the CLI say so in one line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter

import cmbagent_otel as c
from cmbagent_otel.cli import main
from cmbagent_otel.dag.database import BadDatabaseURL
from cmbagent_otel.ingest import IngestServer

IN_MEMORY = ["sqlite://", "sqlite:///:memory:", "sqlite:///file:dag?mode=memory&cache=shared&uri=true"]


def _spans(provider: Any) -> list[Any]:
    with c.workflow("in memory", mode="one_shot"), c.phase("control"), c.step(1, "go", agent="engineer"):
        pass
    return list(provider.memory.get_finished_spans())


@pytest.mark.parametrize("url", IN_MEMORY)
def test_the_exporter_refuses_an_in_memory_url_given_in_code(url: str, provider: Any, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    spans = _spans(provider)
    spill = tmp_path / "spill"
    with caplog.at_level(logging.ERROR, logger="cmbagent_otel"):
        exporter = DagSpanExporter(url, spill_dir=spill, timeout=2)
    assert exporter.target is None
    assert any("in-memory SQLite" in r.getMessage() for r in caplog.records)
    try:
        assert exporter.warm_up() is None
        assert exporter.export(spans).name == "FAILURE"
        assert exporter.export(spans).name == "FAILURE"
        stats = exporter.stats()
        assert stats["dropped"] == 2 * len(spans) and stats["spilled"] == 0 and stats["retried"] == 0
        assert not spill.exists() or not any(spill.iterdir())  # nothing kept for a database that cannot be
    finally:
        exporter.shutdown()


@pytest.mark.parametrize("url", IN_MEMORY)
def test_the_ingest_server_refuses_an_in_memory_url(url: str) -> None:
    with pytest.raises(BadDatabaseURL, match="in-memory"):
        IngestServer(url, port=0, grpc_port="off")


def test_replay_refuses_an_in_memory_target_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # (``ingest --db sqlite://`` builds the IngestServer above; before, it served for ever)
    assert main(["replay", "--to", "sqlite:///:memory:", "--spill-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmbagent-otel: error:") and "in-memory SQLite" in err and err.count("\n") == 1
