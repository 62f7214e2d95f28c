"""Another instrumentation's span names and attribute keys are bounded in the DAG rows.

Attribute values are cut to the attribute bound wherever they come from, and the ingest
server cuts names and keys too (``otlp_decode.Limits``), but ``DagSpanExporter`` stored a
foreign span's name and keys as given: the SDK bounds neither, so a span named after a 2 MB
SQL statement, with a 200 KB attribute key, put ~4 MB into its ``execution_events`` row (the
name twice in its meta) and cost the redaction of the whole name on every span. Names are now
cut to the attribute bound, keys to 256 characters, each with a hash of the whole so that two
keys differing past the cut stay two keys; shorter names and keys are stored as before.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import cmbagent_otel as c

BOUND = 64 * 1024  # far above what the bounds allow, far below what was stored


def _rows(db: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(db)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: list(conn.execute(f'SELECT * FROM "{t}"')) for t in tables}
    finally:
        conn.close()


def test_huge_foreign_names_and_keys_are_bounded(tmp_path: Path) -> None:
    db = tmp_path / "dag.db"
    exporter = DagSpanExporter(f"sqlite:///{db}")
    provider = TracerProvider(span_limits=SpanLimits(max_attribute_length=None))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    c.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    statement = "SELECT * FROM spectra WHERE ell IN (" + ",".join(map(str, range(300_000))) + ")"
    long_key = "db.statement.parameter." + "p" * 200_000
    try:
        tracer = provider.get_tracer("other.instrumentation")
        with c.workflow("bounds"), c.phase("control"), c.step(1, "fit", agent="engineer"):
            with tracer.start_as_current_span(statement) as span:
                span.set_attribute(long_key + "a", "first")
                span.set_attribute(long_key + "b", "second")
            with tracer.start_as_current_span("GET /spectra/" + "x" * 300) as span:
                span.set_attribute("http.route." + "r" * 200, "kept")
    finally:
        c.uninstrument()
        provider.shutdown()
    assert exporter.stats()["exported"] > 0 and exporter.stats()["dropped"] == 0
    rows = _rows(db)
    too_long = [(table, len(str(value))) for table, table_rows in rows.items() for row in table_rows
                for value in row if len(str(value)) > BOUND]
    assert not too_long
    conn = sqlite3.connect(db)
    try:
        metas = [json.loads(meta) for (meta,) in conn.execute("SELECT meta FROM execution_events") if meta]
    finally:
        conn.close()
    names = {m.get("span_name", "") for m in metas if m}
    cut = [n for n in names if n.startswith("SELECT")]
    assert len(cut) == 1 and statement[:1000] in cut[0] and len(cut[0]) <= 4096
    assert "GET /spectra/" + "x" * 300 in names  # a name under the bound: as it was
    keys = [k for m in metas if m for k in (m.get("attributes") or {})]
    assert len([k for k in keys if k.startswith("db.statement.parameter.")]) == 2  # still two keys
    assert all(len(k) <= 256 for k in keys if k.startswith("db.statement.parameter."))
    assert "http.route." + "r" * 200 in keys
