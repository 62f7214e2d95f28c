"""Alembic migrations: one head, no-op at head, upgrade of an old cmbagent DB keeps every row."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from cmbagent_otel.dag import database
from cmbagent_otel.dag.schema import CMBAGENT_TABLES, TABLE_ORDER, metadata
from cmbagent_otel.dag.writer import DagWriter, dump_tables

HEAD = "0003_cmbagent_tables"

FIXTURE = Path(__file__).parent.parent / "fixtures" / "old_cmbagent.db"
TABLES = ("sessions", "workflow_runs", "dag_nodes", "dag_edges", "execution_events", "cost_records", "messages")


def _snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            out = {}
            for table in TABLES:
                cols = [c["name"] for c in inspect(conn).get_columns(table)
                        if c["name"] not in ("parent_node_id", "depth", "agent_name")]
                out[table] = sorted(conn.execute(text(f"SELECT {', '.join(cols)} FROM {table}")).all(), key=repr)
            return out
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_exactly_one_head() -> None:
    assert database.head_revisions() == (HEAD,)


def test_upgrade_is_noop_at_head(db_url: str) -> None:
    database.upgrade(db_url)
    assert database.current_revision(db_url) == HEAD
    engine = create_engine(db_url)
    with engine.connect() as conn:
        before = dump_tables(conn)
        tables_before = sorted(inspect(conn).get_table_names())
    database.upgrade(db_url)
    with engine.connect() as conn:
        assert dump_tables(conn) == before
        assert sorted(inspect(conn).get_table_names()) == tables_before
    engine.dispose()
    assert database.current_revision(db_url) == HEAD
    assert "cmbagent_otel_alembic_version" in tables_before and "alembic_version" not in tables_before
    assert set(TABLE_ORDER) <= set(tables_before)


def test_migrated_schema_is_the_models(db_url: str) -> None:
    """The explicit DDL of the revisions builds exactly the tables, columns, keys and indexes of schema.py."""
    database.upgrade(db_url)
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": database.VERSION_TABLE})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_upgrade_old_cmbagent_db_keeps_rows(tmp_path: Path, provider: Any) -> None:
    path = tmp_path / "old.db"
    shutil.copy(FIXTURE, path)
    url = f"sqlite:///{path}"
    assert "depth" not in _columns(url, "dag_nodes") and "agent_name" not in _columns(url, "cost_records")
    before = _snapshot(url)
    assert sum(len(rows) for rows in before.values()) == 13

    database.upgrade(url)
    assert set(CMBAGENT_TABLES) <= _tables(url)  # the fixture has none of them: all created
    assert {"parent_node_id", "depth"} <= _columns(url, "dag_nodes")
    assert "agent_name" in _columns(url, "cost_records")
    assert _snapshot(url) == before
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "a7b8c9d0e1f2"
        assert {r.depth for r in conn.execute(text("SELECT depth FROM dag_nodes"))} == {0}
        assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
    engine.dispose()

    # the exporter can write into the upgraded database
    from .scenario import run_scenario

    run_scenario()
    DagWriter(url).write(provider.memory.get_finished_spans())
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM workflow_runs")).scalar() == 4
    engine.dispose()

    database.downgrade(url, "0002_dag_hierarchy_columns")
    assert not set(CMBAGENT_TABLES) & _tables(url)  # created empty, dropped empty
    database.downgrade(url, "0001_tracking_schema")
    assert "depth" not in _columns(url, "dag_nodes") and "agent_name" not in _columns(url, "cost_records")
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM execution_events WHERE id LIKE 'event-%'")).scalar() == 3
        assert conn.execute(text("SELECT COUNT(*) FROM dag_nodes WHERE id LIKE 'node-%'")).scalar() == 3
        assert conn.execute(text("SELECT COUNT(*) FROM cost_records")).scalar() == 2 + 5
    engine.dispose()
    database.upgrade(url)
    assert database.current_revision(url) == HEAD


def test_downgrade_to_base_keeps_tables_with_rows(sqlite_url: str, provider: Any) -> None:
    from .scenario import run_scenario

    run_scenario()
    DagWriter(sqlite_url).write(provider.memory.get_finished_spans())
    database.downgrade(sqlite_url, "base")
    engine = create_engine(sqlite_url)
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"workflow_runs", "dag_nodes", "execution_events"} <= names
    assert "messages" not in names  # empty tables are dropped
    assert database.current_revision(sqlite_url) is None


@pytest.mark.parametrize("table", ["files", "checkpoints"])
def test_cmbagent_table_already_there_is_left_alone(tmp_path: Path, table: str) -> None:
    """A table cmbagent built (its shape, its rows) survives the upgrade and the downgrade untouched."""
    path = tmp_path / "cmb.db"
    shutil.copy(FIXTURE, path)
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id VARCHAR(36) PRIMARY KEY, run_id VARCHAR(36) NOT NULL, "
                          "cmbagent_only TEXT)"))
        conn.execute(text(f"INSERT INTO {table} VALUES ('row-1', '11111111-2222-3333-4444-555555555555', 'x')"))
    engine.dispose()
    database.upgrade(url)
    assert "cmbagent_only" in _columns(url, table)
    assert set(CMBAGENT_TABLES) <= _tables(url)
    database.downgrade(url, "0002_dag_hierarchy_columns")
    assert _tables(url) & set(CMBAGENT_TABLES) == {table}
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT id, cmbagent_only FROM {table}")).all() == [("row-1", "x")]
    engine.dispose()


def test_revisions_never_read_the_live_models() -> None:
    """Each revision writes its DDL out (op.create_table ...): a later change to schema.py must
    not change what an old revision creates."""
    versions = Path(database.__file__).resolve().parents[3] / "migrations" / "versions"
    import ast

    for path in sorted(versions.glob("0*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(m.startswith("cmbagent_otel") for m in modules), (path.name, modules)
            if isinstance(node, ast.Attribute):
                assert node.attr != "create_all", path.name
