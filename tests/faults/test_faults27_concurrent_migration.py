"""Twenty-seventh fault campaign: two processes migrating one fresh database at the same moment.

Each child prints ``READY`` and waits for a line on stdin; both are released by one write each,
so both reach the migration together (a pipe as barrier, no sleeps). Two ``cmbagent-otel db
upgrade``s, and one ``db upgrade`` with an instrumented application's first export: both succeed,
the schema is at head with one version row, and every span is stored as a direct write stores it.
On PostgreSQL the database itself is new (``CREATE DATABASE`` on the shared server, dropped after).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from cmbagent_otel.dag.database import VERSION_TABLE, head_revisions

from .conftest import dump, read_record, reference, spawn

PG_ENV = "CMBAGENT_OTEL_TEST_PG_URL"  # as tests/conftest.py names it

UPGRADE = (
    "import sys\n"
    "from cmbagent_otel.cli import main\n"
    "print('READY', flush=True)\n"
    "sys.stdin.readline()\n"
    "sys.exit(main(['db', 'upgrade', '--db', sys.argv[1]]))\n"
)


def upgrader(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", UPGRADE, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def release_together(children: list[subprocess.Popen[str]]) -> list[tuple[str, str]]:
    try:
        for child in children:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "READY", child.stderr.read() if child.stderr else ""
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        return [child.communicate(timeout=300) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()


@contextlib.contextmanager
def fresh_database(kind: str, tmp_path: Path, name: str) -> Iterator[str]:
    """A database that does not exist yet (SQLite: a file not made; PostgreSQL: a new database)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path}/{name}.db"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} not set (start a server with .ci/start-postgres.sh)")
    dbname = f"x_faults27_{name}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{dbname}"'))
        try:
            yield make_url(base).set(database=dbname).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
    finally:
        admin.dispose()


def versions(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [row[0] for row in conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))]
    finally:
        engine.dispose()


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("rounds", [4])
def test_two_db_upgrades_of_one_fresh_database(tmp_path, kind, rounds):
    for attempt in range(rounds):
        with fresh_database(kind, tmp_path, f"up{attempt}") as url:
            results = release_together([upgrader(url), upgrader(url)])
            for out, err in results:
                assert "Traceback" not in err and "error" not in err.lower(), err
                assert f"(head: {head_revisions()[0]})" in out, (out, err)
            assert versions(url) == list(head_revisions())


@pytest.mark.parametrize("kind", BACKENDS)
def test_db_upgrade_and_first_export_at_once(tmp_path, kind):
    with fresh_database(kind, tmp_path, "app") as url, fresh_database(kind, tmp_path, "ref") as ref_url:
        app = spawn(url, tmp_path / "spill", str(tmp_path / "record.jsonl"), start=1, steps=3, calls=3,
                    batch=4, timeout=30)
        (app_out, app_err), (up_out, up_err) = release_together([app, upgrader(url)])
        assert app.returncode == 0 and "Traceback" not in app_err, app_err
        assert "Traceback" not in up_err and f"(head: {head_revisions()[0]})" in up_out, (up_out, up_err)
        stats = json.loads(app_out.split("DONE ", 1)[1].split()[0])
        assert stats["dropped"] == 0, stats
        assert not any((tmp_path / "spill").glob("*")), "spans left in the spill store"
        assert versions(url) == list(head_revisions())
        spans, _ = read_record(tmp_path / "record.jsonl")
        assert spans
        assert dump(url) == reference(spans, ref_url)


def test_an_upgrade_that_another_finishes_meanwhile_stays_correct(tmp_path):
    """The interleaving CI met by chance (stop 37: "expected to match one row when updating
    '0002_dag_hierarchy_columns' to '0003_cmbagent_tables' ... 0 found"), forced: the first
    upgrade reads the schema's version, and before its next transaction begins a second
    ``db upgrade`` of the same SQLite file (another process) runs to its end. Alembic runs each
    SQLite migration in a transaction of its own; the version read must share one transaction
    (one write lock) with every step it decides."""
    import threading

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from cmbagent_otel.dag import database

    url = f"sqlite:///{tmp_path}/one.db"
    first = threading.get_ident()
    begins: list[int] = []
    other: list[tuple[str, str]] = []

    def on_begin(_conn: object) -> None:
        # inserted first: runs before the engine's own BEGIN IMMEDIATE, so no lock is held here
        if threading.get_ident() != first:
            return
        begins.append(1)
        if len(begins) == 2 and not other:
            other.extend(release_together([upgrader(url)]))

    event.listen(Engine, "begin", on_begin, insert=True)
    try:
        database.upgrade(url)
    finally:
        event.remove(Engine, "begin", on_begin)
    assert len(other) == 1 and "error" not in other[0][1].lower(), other
    assert versions(url) == list(head_revisions())
