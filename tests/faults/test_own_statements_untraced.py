"""The DAG exporter's own database work is never traced by the application's instrumentations.

An application that instruments SQLAlchemy, sqlite3 or psycopg (opentelemetry-instrumentation-*)
gets a span for every statement run in the process, unless the OpenTelemetry context says
instrumentation is suppressed, which exporters set around their own work. The statements
of the DAG writer (exports, replays of spilled batches, flushes, schema migrations in the
background thread) must not come back as spans: they would be exported in turn, written as
events of the user's runs and sent to the user's OTLP backend.

The instrumentation here is what those packages do, reduced to its rule: a SQLAlchemy
``before_cursor_execute`` listener that starts a span unless
``opentelemetry.instrumentation.utils.is_instrumentation_enabled()`` is false.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import event
from sqlalchemy.engine import Engine

import cmbagent_otel
from cmbagent_otel import phase, workflow
from cmbagent_otel.processor import DurableBatchSpanProcessor
from cmbagent_otel.spill import SpillStore


@pytest.fixture
def sql_instrumented() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("app.sqlalchemy-instrumentation")

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if is_instrumentation_enabled():
            tracer.start_span("db " + statement.split(None, 1)[0]).end()

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield provider, memory
    finally:
        event.remove(Engine, "before_cursor_execute", before)
        provider.shutdown()


def db_spans(memory: InMemorySpanExporter) -> list[str]:
    return [s.name for s in memory.get_finished_spans() if s.name.startswith("db ")]


def spilled_earlier(spill_dir: Path, url: str) -> None:
    """A batch an earlier process spilled for ``url`` (replayed by the exporter below)."""
    from cmbagent_otel.dag.database import target_of

    other = TracerProvider()
    memory = InMemorySpanExporter()
    other.add_span_processor(SimpleSpanProcessor(memory))
    other.get_tracer("earlier").start_span("earlier work").end()
    SpillStore(spill_dir, target_of(url)).append(memory.get_finished_spans())
    other.shutdown()


def test_export_flush_replay_and_shutdown_run_no_traced_statement(tmp_path: Path, sql_instrumented: Any) -> None:
    provider, memory = sql_instrumented
    url = f"sqlite:///{tmp_path}/dag.db"
    spilled_earlier(tmp_path / "spill", url)
    exporter = DagSpanExporter(url, spill_dir=tmp_path / "spill", timeout=5)
    processor = DurableBatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False)
    try:
        with workflow("run", mode="one_shot"), phase("control"):
            pass
        assert processor.force_flush()
    finally:
        cmbagent_otel.uninstrument()
        processor.shutdown()
    assert exporter.stats()["exported"] >= 2 and exporter.stats()["replayed"] == 1
    assert db_spans(memory) == []
