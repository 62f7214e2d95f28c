"""Schema preparation off the export path: a cheap version check, Alembic only when needed,
migration in the background step the durable processor starts, once per process per URL."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from sqlalchemy import create_engine, text

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.dag import database
from cmbagent_otel.processor import DurableBatchSpanProcessor


def _spans(provider: Any) -> list[Any]:
    with workflow("prepare", mode="one-shot", task="t"), phase("control"), step(1, "g"):
        pass
    return list(provider.memory.get_finished_spans())


def test_script_heads_match_alembic() -> None:
    assert database.script_heads() == frozenset(database.head_revisions())


def test_schema_current_is_one_query_on_the_version_table(db_url: str) -> None:
    engine = database.make_engine(db_url)
    try:
        assert not database.schema_current(engine)  # empty database: no version table
        database.upgrade(db_url)
        assert database.schema_current(engine)
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {database.VERSION_TABLE} SET version_num = '0002_dag_hierarchy_columns'"))
        assert not database.schema_current(engine)  # older revision: Alembic must run
    finally:
        engine.dispose()


def test_a_database_at_head_is_written_without_importing_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/at-head.db"
    database.upgrade(url)
    script = textwrap.dedent(f"""
        import sys
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from cmbagent_otel import _spans, phase, step, workflow
        from cmbagent_otel.exporters.dag import DagSpanExporter
        provider = TracerProvider()
        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        with _spans.workflow_tracers.routed_to(provider), workflow("w", mode="one-shot", task="t"), \
                phase("control"), step(1, "g"):
            pass
        exporter = DagSpanExporter({url!r}, spill=False)
        print(exporter.export(memory.get_finished_spans()).name, "alembic" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["SUCCESS", "False"], out.stderr
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM dag_nodes WHERE json_extract(meta, '$.id') IN "
                                 "('control', 'step_1')")).scalar() == 2
    engine.dispose()


def test_the_processor_migrates_in_the_background_once(tmp_path: Path, provider: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite:///{tmp_path}/new.db"
    spans = _spans(provider)
    caplog.set_level(logging.INFO, logger="cmbagent_otel.dag")
    exporter = DagSpanExporter(url, spill=False)
    processor = DurableBatchSpanProcessor(exporter)  # what instrument() builds: starts the warm-up
    try:
        running = exporter.warm_up()  # the thread already started (or None when it is done)
        if running is not None:
            running.join()
        assert database.schema_ready(url)
        migrations = [r for r in caplog.records if "created the schema" in r.getMessage()]  # a new file
        assert [r.threadName for r in migrations] == ["cmbagent-otel-schema"]
        for span in spans:
            processor.on_end(span)
        assert processor.force_flush()
        assert exporter.stats()["exported"] == len(spans)
        assert exporter.warm_up() is None  # nothing left to prepare
        second = DagSpanExporter(url, spill=False)
        assert second.export(spans).name == "SUCCESS"
        second.shutdown()
    finally:
        processor.shutdown()
    assert len([r for r in caplog.records if "the schema of" in r.getMessage()]) == 1


def test_an_export_waits_for_the_background_step_no_longer_than_its_deadline(tmp_path: Path, provider: Any) -> None:
    url = f"sqlite:///{tmp_path}/busy.db"
    spans = _spans(provider)
    exporter = DagSpanExporter(url, timeout=0.3, spill=True, spill_dir=tmp_path / "spill")
    database._migrate_lock.acquire()  # another thread of this process is preparing the schema
    try:
        assert exporter.export(spans).name == "SUCCESS"  # kept in the spill store, not lost
        assert exporter.stats()["spilled"] == len(spans)
    finally:
        database._migrate_lock.release()
    assert exporter.replay() == (len(spans), 0)
    exporter.shutdown()


def test_starting_the_background_step_never_waits_for_a_migration_in_progress(tmp_path: Path) -> None:
    import threading

    url = f"sqlite:///{tmp_path}/second.db"
    started = []
    database._migrate_lock.acquire()  # another thread of this process is migrating some database
    try:
        caller = threading.Thread(target=lambda: started.append(DagSpanExporter(url, spill=False).warm_up()))
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), "instrument() would hang behind a migration"
        (thread,) = started
        assert thread is not None and thread.name == "cmbagent-otel-schema"
    finally:
        database._migrate_lock.release()
    thread.join(30)
    assert database.schema_ready(url)


def _structure(url: str) -> dict[str, Any]:
    """Every table's columns, keys, foreign keys and indexes, by name, as the database reports them."""
    from sqlalchemy import inspect

    engine = create_engine(url)
    try:
        found = inspect(engine)
        return {table: {
            "columns": [(c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                        for c in found.get_columns(table)],
            "primary_key": found.get_pk_constraint(table),
            "foreign_keys": sorted(repr(sorted(fk.items())) for fk in found.get_foreign_keys(table)),
            "indexes": sorted(repr(sorted(ix.items())) for ix in found.get_indexes(table)),
            "unique": sorted(repr(sorted(u.items())) for u in found.get_unique_constraints(table)),
        } for table in sorted(found.get_table_names())}
    finally:
        engine.dispose()


def test_a_new_database_is_created_as_upgrade_would_make_it(db_url: str, pg_schema: Any, tmp_path: Path) -> None:
    """create_if_empty (what the first export of a new database runs, without Alembic) builds the
    same tables, columns, keys, indexes and version row as ``upgrade head``; Alembic then takes
    it from there (no-op upgrade, downgrade to base)."""
    assert database.create_if_empty(db_url)
    assert not database.create_if_empty(db_url)  # tables there: nothing done, Alembic decides
    assert database.current_revision(db_url) == database.head_revisions()[0]
    if db_url.startswith("sqlite"):
        migrated = f"sqlite:///{tmp_path}/migrated.db"
        database.upgrade(migrated)
        assert _structure(db_url) == _structure(migrated)
    else:
        with pg_schema() as migrated:
            database.upgrade(migrated)
            assert _structure(db_url) == _structure(migrated)
    created = _structure(db_url)
    database.upgrade(db_url)
    assert _structure(db_url) == created
    database.downgrade(db_url, "base")
    assert database.current_revision(db_url) is None


def test_create_if_empty_leaves_a_database_with_tables_to_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/theirs.db"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE their_table (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    assert not database.create_if_empty(url)
    assert set(_structure(url)) == {"their_table"}
    database.ensure_schema(url)  # Alembic's upgrade: the application's table stays
    assert "their_table" in _structure(url) and database.schema_ready(url)


def test_a_new_database_is_created_without_importing_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/new.db"
    script = textwrap.dedent(f"""
        import sys
        from cmbagent_otel.dag import database
        database.ensure_schema({url!r})
        print(database.schema_ready({url!r}), "alembic" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"], out.stderr
    assert database.current_revision(url) == database.head_revisions()[0]


def test_the_first_export_after_instrument_compiles_no_row_converter(db_url: str, tmp_path: Path) -> None:
    # A fresh process: the statements and converters are cached per process, and other tests of
    # this one have built them. The background step that instrument()'s processor starts must
    # build what the run's exports use; the exports themselves compile none.
    script = textwrap.dedent(f"""
        import json, os, tempfile
        os.environ["AUTOGEN_USE_DOCKER"] = "False"
        from opentelemetry.sdk.trace import TracerProvider
        import cmbagent_otel
        from cmbagent_otel.demo import run_demo
        from cmbagent_otel.dag import statements
        from cmbagent_otel.exporters.dag import DagSpanExporter
        from cmbagent_otel.processor import DurableBatchSpanProcessor

        def compiled():
            return sorted(repr(key) for sql in statements._BY_DIALECT.values() for key in sql._cache
                          if key[0] in ("params", "binary"))

        exporter = DagSpanExporter({db_url!r}, spill=False)
        processor = DurableBatchSpanProcessor(exporter)  # what instrument() builds: starts the warm-up
        running = exporter.warm_up()
        if running is not None:
            running.join()
        before = compiled()
        provider = TracerProvider()
        provider.add_span_processor(processor)
        cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False)
        try:
            with tempfile.TemporaryDirectory(dir={str(tmp_path)!r}) as work_dir:
                run_demo(work_dir)
        finally:
            cmbagent_otel.uninstrument()
        assert processor.force_flush()
        stats = exporter.stats()
        provider.shutdown()
        print(json.dumps([len(before), stats["exported"], stats["dropped"], sorted(set(compiled()) - set(before))]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    built, exported, dropped, compiled_in_exports = json.loads(out.stdout.strip().splitlines()[-1])
    assert exported > 40 and dropped == 0, out.stdout + out.stderr  # the demo run's spans were written
    assert built > 0  # by the background step, before the run
    assert compiled_in_exports == []
