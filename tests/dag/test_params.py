"""Rows become the parameters SQLAlchemy's types would have made, column by column."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from cmbagent_otel.dag.schema import metadata
from cmbagent_otel.dag.statements import Sql

EVENTS = metadata.tables["execution_events"]


def _expected(row: dict[str, Any], cols: tuple[tuple[str, str], ...], pg: bool) -> tuple[Any, ...]:
    out: list[Any] = []
    for name, kind in cols:
        value = row.get(name)
        if value is not None and kind == "json":
            value = json.dumps(value, default=str)
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
