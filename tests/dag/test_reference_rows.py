"""The writer stores byte for byte the rows of the reference writer (see ``reference_rows.py``).

The reference is the writer of commit 90398a5: SQLAlchemy Core statements compiled per
batch and every derived row recomputed for every run a batch touched. Today's writer runs
precompiled statements through the driver's executemany and recomputes derived rows only
where a batch changed their inputs; the rows must not change, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from cmbagent_otel.dag import statements

from .reference_rows import PG_ENV, as_json, batches_of, load, pg_schema, write_case

REFERENCE = load()["cases"]


def _diff(got: dict[str, list[list[Any]]], want: dict[str, list[list[Any]]]) -> dict[str, Any]:
    out = {}
    for table in want:
        missing = [r for r in want[table] if r not in got.get(table, [])]
        extra = [r for r in got.get(table, []) if r not in want[table]]
        if missing or extra:
            out[table] = {"missing": missing[:2], "unexpected": extra[:2]}
    return out


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_sqlite_rows_equal_the_reference(case: str, tmp_path: Path) -> None:
    entry = REFERENCE[case]
    got = as_json(write_case(f"sqlite:///{tmp_path}/rows.db", batches_of(entry)))
    assert got == entry["rows"]["sqlite"], _diff(got, entry["rows"]["sqlite"])


@pytest.mark.postgres
@pytest.mark.parametrize("driver", ["psycopg", "psycopg-copy", "psycopg2"])
@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_postgres_rows_equal_the_reference(case: str, driver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through psycopg 3 (new rows by pipelined executemany, many of them by COPY: ``psycopg-copy``
    takes COPY for every insert) and psycopg2 (cmbagent's driver: executemany), the same rows."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} not set (start a server with .ci/start-postgres.sh)")
    if driver == "psycopg-copy":
        monkeypatch.setattr(statements, "COPY_MIN_ROWS", 1)
        driver = "psycopg"
    entry = REFERENCE[case]
    with pg_schema(base) as url:
        url = make_url(url).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
        got = as_json(write_case(url, batches_of(entry)))
    assert got == entry["rows"]["postgresql"], _diff(got, entry["rows"]["postgresql"])
