"""Rows become the parameters SQLAlchemy's types would have made, column by column."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from cmbagent_otel.dag.schema import metadata
from cmbagent_otel.dag.statements import Sql, encode_json

EVENTS = metadata.tables["execution_events"]


def _expected(row: dict[str, Any], cols: tuple[tuple[str, str], ...], pg: bool) -> tuple[Any, ...]:
    out: list[Any] = []
    for name, kind in cols:
        value = row.get(name)
        if value is not None and kind == "json":
            value = json.dumps(value, default=str, separators=(",", ":"))  # compact, ASCII
        elif value is not None and kind == "dt" and not pg:
            value = value.replace(tzinfo=None).isoformat(" ", "microseconds")
        elif value is not None and kind == "bool" and not pg:
            value = int(value)
        out.append(value)
    return tuple(out)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_params_convert_each_column_of_its_own_row(dialect: str) -> None:
    """A converted value reused for a column holding the same object (an event's timestamp
    is its started_at) is never reused for an equal-looking or a different one."""
    sql = Sql(dialect)
    cols = sql.columns(EVENTS)
    start = datetime(2026, 1, 2, 3, 4, 5, 6)
    meta = {"a": ["é", 1, None], "b": b"raw"}
    rows: list[dict[str, Any]] = [
        {"id": "same", "timestamp": start, "started_at": start, "completed_at": start + timedelta(seconds=1),
         "inputs": meta, "outputs": meta, "meta": {"x": 1}},
        {"id": "other", "timestamp": datetime(2020, 1, 1), "started_at": start,
         "completed_at": start.replace(tzinfo=timezone.utc), "inputs": None, "outputs": {"y": 2}, "meta": meta},
        {"id": "none", "timestamp": None, "started_at": None, "completed_at": start, "meta": None},
        {"id": "missing-columns"},
    ]
    got = sql.params(rows, cols)
    assert got == [_expected(row, cols, dialect == "postgresql") for row in rows]
    assert got[1][cols.index(("timestamp", "dt"))] != got[1][cols.index(("started_at", "dt"))]


def test_params_of_a_single_column_and_of_booleans() -> None:
    sql = Sql("sqlite")
    assert sql.params([{"id": 5}, {}], [("id", "")]) == [(5,), (None,)]
    runs = metadata.tables["workflow_runs"]
    cols = sql.columns(runs)
    row = {"id": "r", "is_branch": True, "meta": {"k": "v"}}
    assert sql.params([row], cols) == [_expected(row, cols, False)]


@pytest.mark.postgres
@pytest.mark.parametrize("meta_type", ["json", "jsonb"])
def test_copy_of_odd_values_and_types_stores_what_text_copy_stores(pg_url: str, meta_type: str) -> None:
    """Binary COPY (every column of a type it writes) stops at a row holding a value of another
    Python type than its column's binary form (an aware datetime, a number in a text column),
    and text COPY carries that row and the rest; a table with a column of another type (jsonb)
    goes by text COPY. Either way the rows stored are those text COPY stores."""
    from sqlalchemy import create_engine, text

    from cmbagent_otel.dag.database import ensure_schema
    from cmbagent_otel.dag.statements import _COPY_TYPES, sql_for

    ensure_schema(pg_url)
    sessions = metadata.tables["sessions"]
    start = datetime(2026, 1, 2, 3, 4, 5, 6)
    rows: list[dict[str, Any]] = [
        {"id": "plain", "name": "a\tb\\c\nd", "created_at": start, "last_active_at": start, "status": "active",
         "meta": {"k": "é\\\"\n"}},
        {"id": "aware", "name": "n", "created_at": start.replace(tzinfo=timezone(timedelta(hours=2))),
         "last_active_at": start, "status": "active", "meta": None},
        {"id": "number", "name": 12, "created_at": start, "last_active_at": start, "status": "active", "meta": [1]},
        {"id": "after", "name": "z", "created_at": start, "last_active_at": start, "status": "active", "meta": {}},
    ]
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            if meta_type == "jsonb":
                conn.execute(text("ALTER TABLE sessions ALTER COLUMN meta TYPE jsonb"))
        with engine.begin() as conn:
            sql = sql_for(conn)
            sql.copy(conn, sessions, rows)
            binary = conn.info[_COPY_TYPES]["sessions"] is not None
            stored = conn.execute(text("SELECT id, name, created_at, last_active_at, meta::text FROM sessions "
                                       "ORDER BY id")).all()
    finally:
        engine.dispose()
    assert binary == (meta_type == "json")
    # json keeps the text the writer sent; jsonb its own rendering of the same value
    stored = [(*r[:4], r[4] if meta_type == "json" or r[4] is None else encode_json(json.loads(r[4])))
              for r in stored]
    assert stored == [
        ("after", "z", start, start, encode_json({})),
        ("aware", "n", start, start, None),
        ("number", "12", start, start, encode_json([1])),
        ("plain", "a\tb\\c\nd", start, start, encode_json({"k": "é\\\"\n"})),
    ]


@pytest.mark.postgres
def test_insert_new_returns_only_the_rows_it_created(pg_url: str) -> None:
    """``_insert_new`` (one executemany ``RETURNING id`` on psycopg 3) names exactly the rows it
    inserted, with the held-back writes sent before it, and leaves a stored row as it was."""
    from sqlalchemy import create_engine, text

    from cmbagent_otel.dag.database import ensure_schema
    from cmbagent_otel.dag.statements import sql_for
    from cmbagent_otel.dag.writer import _insert_new

    ensure_schema(pg_url)
    sessions = metadata.tables["sessions"]
    start = datetime(2026, 1, 2, 3, 4, 5)

    def row(session_id: str, name: str) -> dict[str, Any]:
        return {"id": session_id, "name": name, "created_at": start, "last_active_at": start, "status": "active"}

    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            sql = sql_for(conn)
            with sql.batch(conn):
                sql.insert(conn, sessions, [row("held-back", "first")])  # held back until the next read
                created = _insert_new(conn, sql, sessions, [row("a", "new"), row("held-back", "second"),
                                                            row("b", "new")])
                sql.flush(conn)
            stored = conn.execute(text("SELECT id, name FROM sessions ORDER BY id")).all()
    finally:
        engine.dispose()
    assert created == {"a", "b"}
    assert [tuple(r) for r in stored] == [("a", "new"), ("b", "new"), ("held-back", "first")]


def test_sqlite_columns_null_in_every_row_store_null(tmp_path: Any) -> None:
    """Columns NULL in every row go as NULL literals (not parameters): inserted and updated rows
    hold exactly what binding each None would store, an update clears the values it nulls, and
    a column NULL in only some rows keeps its other rows' values."""
    from sqlalchemy import create_engine, text

    from cmbagent_otel.dag.database import ensure_schema

    url = f"sqlite:///{tmp_path}/nulls.db"
    ensure_schema(url)
    sessions = metadata.tables["sessions"]
    sql = Sql("sqlite")
    at = datetime(2026, 1, 2, 3, 4, 5, 6)

    def session(sid: str, **values: Any) -> dict[str, Any]:
        return {"id": sid, "user_id": None, "name": sid, "created_at": at, "last_active_at": at,
                "status": "active", "meta": None, "resource_limits": None, **values}

    engine = create_engine(url)
    with engine.begin() as conn:
        sql.insert(conn, sessions, [session("a"), session("b", meta={"k": 1})])  # meta NULL in one row only
        sql.insert(conn, sessions, [session("c", user_id="u", resource_limits={"cpu": 2})])
        # every row's user_id and resource_limits NULL: both cleared, the other columns set
        sql.update(conn, sessions, [session("c", name="renamed"), session("b", meta={"k": 2})],
                   ("user_id", "name", "meta", "resource_limits"))
        rows = conn.execute(text("SELECT id, user_id, name, meta, resource_limits FROM sessions ORDER BY id")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [
        ("a", None, "a", None, None),
        ("b", None, "b", '{"k":2}', None),
        ("c", None, "renamed", None, None),
    ]
