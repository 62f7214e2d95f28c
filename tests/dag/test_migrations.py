"""Alembic migrations: one head, no-op at head, upgrade of an old cmbagent DB keeps every row."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, inspect, text

from cmbagent_otel.dag import database
from cmbagent_otel.dag.writer import DagWriter, dump_tables

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


def _columns(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_exactly_one_head() -> None:
    assert database.head_revisions() == ("0002_dag_hierarchy_columns",)


def test_upgrade_is_noop_at_head(db_url: str) -> None:
    database.upgrade(db_url)
    assert database.current_revision(db_url) == "0002_dag_hierarchy_columns"
    engine = create_engine(db_url)
    with engine.connect() as conn:
        before = dump_tables(conn)
        tables_before = sorted(inspect(conn).get_table_names())
    database.upgrade(db_url)
    with engine.connect() as conn:
        assert dump_tables(conn) == before
        assert sorted(inspect(conn).get_table_names()) == tables_before
    engine.dispose()
    assert database.current_revision(db_url) == "0002_dag_hierarchy_columns"
    assert "cmbagent_otel_alembic_version" in tables_before and "alembic_version" not in tables_before


def test_upgrade_old_cmbagent_db_keeps_rows(tmp_path: Path, provider: Any) -> None:
    path = tmp_path / "old.db"
    shutil.copy(FIXTURE, path)
    url = f"sqlite:///{path}"
    assert "depth" not in _columns(url, "dag_nodes") and "agent_name" not in _columns(url, "cost_records")
    before = _snapshot(url)
    assert sum(len(rows) for rows in before.values()) == 13

    database.upgrade(url)
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

    database.downgrade(url, "0001_tracking_schema")
    assert "depth" not in _columns(url, "dag_nodes") and "agent_name" not in _columns(url, "cost_records")
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM execution_events WHERE id LIKE 'event-%'")).scalar() == 3
        assert conn.execute(text("SELECT COUNT(*) FROM dag_nodes WHERE id LIKE 'node-%'")).scalar() == 3
        assert conn.execute(text("SELECT COUNT(*) FROM cost_records")).scalar() == 2 + 5
    engine.dispose()
    database.upgrade(url)
    assert database.current_revision(url) == "0002_dag_hierarchy_columns"


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
