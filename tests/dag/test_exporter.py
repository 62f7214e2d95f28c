"""DagSpanExporter with the SDK's BatchSpanProcessor; failure handling and stats."""

from __future__ import annotations

from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
from sqlalchemy import create_engine, text

from cmbagent_otel._spans import workflow_tracers
from cmbagent_otel.dag.database import default_sqlite_path, resolve_url

from .scenario import run_scenario


def test_batch_processor_end_to_end(db_url: str) -> None:
    exporter = DagSpanExporter(db_url)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=4))
    try:
        with workflow_tracers.routed_to(provider):
            run_scenario()
        assert provider.force_flush()
    finally:
        provider.shutdown()
    engine = create_engine(db_url)
    with engine.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar()
                  for t in ("dag_nodes", "dag_edges", "execution_events", "cost_records", "branches")}
    engine.dispose()
    assert counts == {"dag_nodes": 9, "dag_edges": 11, "execution_events": 9, "cost_records": 5, "branches": 2}
    assert exporter.stats() == {"exported": 17, "retried": 0, "spilled": 0, "replayed": 0, "dropped": 0}
    exporter.shutdown()
    exporter.shutdown()


def test_unreachable_database_retries_then_fails_without_spill(provider: Any, refused_port: int) -> None:
    run_scenario()
    spans = provider.memory.get_finished_spans()
    exporter = DagSpanExporter(f"postgresql+psycopg://nobody@127.0.0.1:{refused_port}/none", timeout=2.0,
                               spill=False)
    assert exporter.export(spans) is SpanExportResult.FAILURE
    stats = exporter.stats()
    assert stats["dropped"] == len(spans) and stats["retried"] >= len(spans) and stats["exported"] == 0
    exporter.shutdown()
    assert exporter.export(spans) is SpanExportResult.FAILURE


def test_bad_url_fails_without_raising(provider: Any) -> None:
    run_scenario()
    exporter = DagSpanExporter("mysql://nowhere/db", timeout=0.1)
    assert exporter.export(provider.memory.get_finished_spans()) is SpanExportResult.FAILURE
    exporter.shutdown()


def test_url_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.delenv("CMBAGENT_OTEL_DATABASE_URL", raising=False)
    monkeypatch.delenv("CMBAGENT_DATABASE_URL", raising=False)
    monkeypatch.setenv("CMBAGENT_DEFAULT_WORK_DIR", str(tmp_path))
    assert default_sqlite_path() == tmp_path / "database" / "cmbagent.db"
    assert resolve_url() == f"sqlite:///{tmp_path}/database/cmbagent.db"
    monkeypatch.setenv("CMBAGENT_DATABASE_URL", "postgresql://u@h/cmb")
    assert resolve_url() == "postgresql+psycopg://u@h/cmb"
    monkeypatch.setenv("CMBAGENT_OTEL_DATABASE_URL", "sqlite:///ours.db")
    assert resolve_url() == "sqlite:///ours.db"
    assert resolve_url("sqlite:///arg.db") == "sqlite:///arg.db"


def test_a_sqlite_path_under_home_is_written_there(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                                   provider: Any) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert resolve_url("sqlite:///~/runs/dag.db") == f"sqlite:///{tmp_path}/home/runs/dag.db"
    run_scenario()
    exporter = DagSpanExporter("sqlite:///~/runs/dag.db", spill=False)
    assert exporter.export(provider.memory.get_finished_spans()) is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert (tmp_path / "home" / "runs" / "dag.db").exists() and not (tmp_path / "~").exists()


def test_timeout_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMBAGENT_OTEL_EXPORT_TIMEOUT", "3.5")
    assert DagSpanExporter("sqlite://")._timeout == 3.5
    assert DagSpanExporter("sqlite://", timeout=1)._timeout == 1.0


def test_entry_point() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="opentelemetry_traces_exporter") if e.name == "cmbagent_dag"]
    assert ep.load() is DagSpanExporter


def test_cost_records_setting(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from cmbagent_otel.dag.writer import DagWriter, resolve_cost_records

    monkeypatch.delenv("CMBAGENT_OTEL_COST_RECORDS", raising=False)
    assert resolve_cost_records() == "per_agent"
    monkeypatch.setenv("CMBAGENT_OTEL_COST_RECORDS", " OFF ")
    assert resolve_cost_records() == "off" and DagWriter("sqlite://").cost_records == "off"
    assert resolve_cost_records("per-agent") == "per_agent"  # the argument wins
    assert DagWriter("sqlite://", cost_records="per_agent").cost_records == "per_agent"
    monkeypatch.setenv("CMBAGENT_OTEL_COST_RECORDS", "per_call")
    with caplog.at_level("WARNING", logger="cmbagent_otel.dag"):
        assert resolve_cost_records() == "per_agent"
    assert "CMBAGENT_OTEL_COST_RECORDS='per_call'" in caplog.text


class _Unreadable:
    def __iter__(self) -> Any:
        raise RuntimeError("not a sequence of spans")

    def __len__(self) -> int:
        raise RuntimeError("no length")

    def __bool__(self) -> bool:
        raise RuntimeError("no truth value")


@pytest.mark.parametrize("batch", [42, None, _Unreadable(), "spans"], ids=["int", "none", "unreadable", "str"])
def test_export_of_something_not_spans_fails_without_raising(db_url: str, batch: Any) -> None:
    # SpanExporter.export's contract: a result, never an exception, whatever the caller passes
    exporter = DagSpanExporter(db_url, spill=False)
    try:
        assert exporter.export(batch) in (SpanExportResult.SUCCESS, SpanExportResult.FAILURE)
    finally:
        exporter.shutdown()
    assert exporter.export(batch) in (SpanExportResult.SUCCESS, SpanExportResult.FAILURE)  # shut down too
