"""The DAG writer's write path: row ids, fault classification by driver codes, schema repair."""

from __future__ import annotations

import contextlib
import sqlite3
import threading

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.dag.database import deadline, target_of, upgrade, with_credentials
from cmbagent_otel.dag.errors import Fault, classify
from cmbagent_otel.dag.mapping import event_db_id
from cmbagent_otel.dag.writer import DagWriter, DatabaseUnavailable


def _span(trace_id: int, span_id: int, parent: int | None, name: str, attrs: dict) -> ReadableSpan:
    ctx = SpanContext(trace_id, span_id, False, TraceFlags(TraceFlags.SAMPLED))
    return ReadableSpan(name=name, context=ctx,
                        parent=SpanContext(trace_id, parent, False) if parent else None,
                        resource=Resource({}), attributes=attrs, kind=SpanKind.INTERNAL,
                        start_time=1_700_000_000_000_000_000, end_time=1_700_000_001_000_000_000)


def test_event_ids_use_the_whole_trace_and_span_ids(tmp_path):
    """Four traces sharing their first 80 bits, same span ids: four runs, four events each."""
    prefix = 0xABCDEF0123456789ABCD << 48
    traces = [prefix | n for n in range(1, 5)]
    spans = []
    for trace_id in traces:
        spans.append(_span(trace_id, 0x11, None, "chat", {"cmbagent.span.kind": "llm",
                                                          "cmbagent.event.depth": 0}))
        spans.append(_span(trace_id, 0x22, 0x11, "http", {}))  # foreign: attached under its parent
    ids = {event_db_id(s.context.trace_id, s.context.span_id) for s in spans}
    assert len(ids) == len(spans) and all(len(i) <= 36 for i in ids)
    url = f"sqlite:///{tmp_path}/c.db"
    DagWriter(url).write(spans)
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, run_id, parent_event_id, depth FROM execution_events")).all()
    engine.dispose()
    assert len(rows) == 8
    by_id = {r.id: r for r in rows}
    for trace_id in traces:
        child = by_id[event_db_id(trace_id, 0x22)]
        assert child.parent_event_id == event_db_id(trace_id, 0x11) and child.depth == 1
        assert by_id[child.parent_event_id].run_id == child.run_id


def _run(capture) -> list[ReadableSpan]:
    with workflow("w", mode="planning-control"), phase("control"), step(1, "s"), \
            TracedSpan("chat m", "llm", {"gen_ai.usage.input_tokens": 3}):
        pass
    return capture.spans


def test_sqlite_codes_classify_real_errors(tmp_path):
    db = tmp_path / "c.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(db, timeout=0)
    with pytest.raises(sqlite3.OperationalError) as locked:
        other.execute("INSERT INTO t VALUES (1)")
    holder.execute("ROLLBACK")
    assert classify(locked.value) is Fault.RETRY  # SQLITE_BUSY
    with pytest.raises(sqlite3.OperationalError) as missing:
        other.execute("SELECT * FROM nowhere")
    assert classify(missing.value) is Fault.SCHEMA
    with pytest.raises(sqlite3.OperationalError) as syntax:
        other.execute("SELEC 1")
    assert classify(syntax.value) is Fault.FATAL  # the same exception class, another code
    with pytest.raises(sqlite3.IntegrityError) as constraint:
        other.execute("CREATE TABLE u (x PRIMARY KEY)")
        other.execute("INSERT INTO u VALUES (1), (1)")
    assert classify(constraint.value) is Fault.FATAL
    holder.execute("PRAGMA max_page_count = 1")
    with pytest.raises(sqlite3.OperationalError) as full:
        holder.execute("CREATE TABLE big (x)")
        holder.execute("INSERT INTO big VALUES (zeroblob(100000))")
    assert classify(full.value) is Fault.RETRY  # SQLITE_FULL: space may come back


@pytest.mark.postgres
def test_postgres_sqlstates_classify_real_errors(pg_schema):
    with pg_schema() as url:
        engine = create_engine(url)
        with engine.connect() as conn:
            with pytest.raises(DBAPIError) as missing_error:
                conn.execute(text("SELECT * FROM nowhere"))
            conn.rollback()
        assert classify(missing_error.value) is Fault.SCHEMA  # 42P01
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x int primary key)"))
            conn.execute(text("INSERT INTO t VALUES (1), (2)"))
        # a real deadlock: two transactions lock rows 1 and 2 in opposite orders
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def lock(first: int, second: int) -> None:
            with engine.connect() as conn:
                try:
                    conn.execute(text("UPDATE t SET x = x WHERE x = :v"), {"v": first})
                    barrier.wait()
                    conn.execute(text("UPDATE t SET x = x WHERE x = :v"), {"v": second})
                except Exception as exc:
                    errors.append(exc)
                conn.rollback()

        threads = [threading.Thread(target=lock, args=args) for args in ((1, 2), (2, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 1 and errors[0].orig.sqlstate == "40P01"
        assert classify(errors[0]) is Fault.RETRY
        with engine.connect() as conn:
            with pytest.raises(DBAPIError) as dup:
                conn.execute(text("INSERT INTO t VALUES (1)"))
            conn.rollback()
        assert classify(dup.value) is Fault.FATAL  # 23505
        engine.dispose()
    refused = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(OperationalError) as down:
        refused.connect()
    assert classify(down.value) is Fault.RETRY


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_dropped_table_is_migrated_again_not_retried_forever(tmp_path, capture, backend, pg_schema):
    spans = _run(capture)
    with pg_schema() if backend == "postgres" else contextlib.nullcontext(f"sqlite:///{tmp_path}/c.db") as url:
        writer = DagWriter(url)
        writer.write(spans[:2])
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE cost_records"))
        writer.write(spans)  # "no such table" / 42P01: the schema is repaired, the batch written
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM cost_records")).scalar() == 1
        engine.dispose()
        writer.close()


def test_without_migrations_a_missing_schema_is_unavailable_not_dropped(tmp_path, capture):
    spans = _run(capture)
    writer = DagWriter(f"sqlite:///{tmp_path}/empty.db", migrate=False)
    with pytest.raises(DatabaseUnavailable, match="schema"):
        writer.write(spans)


def test_write_timeout_bounds_the_sqlite_busy_wait(tmp_path, capture, monkeypatch):
    """SQLite's own busy timeout (30 s here) is cut to the write's timeout: the write gives up
    while another connection still holds the lock (it never released it)."""
    monkeypatch.setenv("CMBAGENT_OTEL_SQLITE_BUSY_TIMEOUT_MS", "30000")
    spans = _run(capture)
    url = f"sqlite:///{tmp_path}/c.db"
    upgrade(url)
    holder = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    writer = DagWriter(url)
    with pytest.raises(DatabaseUnavailable, match="locked"):
        writer.write(spans, timeout=0.2)
    holder.execute("ROLLBACK")
    writer.write(spans, timeout=5)
    writer.close()


def test_deadlines_nest_and_never_extend():
    from cmbagent_otel.dag.database import time_left_ms

    assert time_left_ms() is None
    with deadline(10):
        outer = time_left_ms()
        with deadline(100):
            assert time_left_ms() <= outer
        with deadline(0):
            assert time_left_ms() == 0
    assert time_left_ms() is None


def test_spill_targets_never_hold_credentials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = target_of("postgresql://alice:s3cret@db.example:5432/cmb?sslpassword=x&application_name=a")
    assert "s3cret" not in target and "sslpassword" not in target and "alice@db.example" in target
    assert target_of("sqlite:///rel.db") == f"sqlite:///{tmp_path}/rel.db"
    full = "postgresql+psycopg://alice:s3cret@db.example:5432/cmb"
    assert with_credentials(target_of(full), full) == full
    assert with_credentials(target_of(full), "postgresql://bob:x@elsewhere/db") == target_of(full)



POISON = ("CREATE TRIGGER poison BEFORE INSERT ON execution_events WHEN NEW.event_subtype = 'llm' "
          "AND json_extract(NEW.meta, '$.span_name') = 'chat poison' BEGIN SELECT RAISE(ABORT, 'refused'); END")


def test_a_span_the_database_refuses_is_dropped_alone_with_a_log_line(tmp_path, capture, caplog):
    """A non-retryable error (here a real trigger refusing one row): the batch is written in
    halves around it, only that span is dropped and logged; a spilled batch holding it too."""
    from cmbagent_otel.exporters.dag import DagSpanExporter

    from cmbagent_otel.spill import SpillStore

    with workflow("w", mode="planning-control"), phase("control"), step(1, "s"):
        for name in ("chat a", "chat poison", "chat b", "chat c"):
            with TracedSpan(name, "llm", {"gen_ai.usage.input_tokens": 1}):
                pass
    spans = capture.spans
    url = f"sqlite:///{tmp_path}/c.db"
    upgrade(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(POISON)
    exporter = DagSpanExporter(url, spill_dir=tmp_path / "spill")
    assert exporter.export(spans).name == "FAILURE"
    assert exporter.stats()["exported"] == len(spans) - 1 and exporter.stats()["dropped"] == 1
    assert "dropping span 'chat poison'" in caplog.text
    # the same spans waiting in a spill file: replayed around the refused one, the file done
    SpillStore(tmp_path / "spill", exporter.target).append(spans)
    assert exporter.replay() == (len(spans) - 1, 0)
    assert exporter.stats()["dropped"] == 2
    exporter.shutdown()
    with engine.connect() as conn:
        names = {r[0] for r in conn.exec_driver_sql("SELECT json_extract(meta, '$.span_name') FROM execution_events")}
    engine.dispose()
    assert names == {"chat a", "chat b", "chat c"}
