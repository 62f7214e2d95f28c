"""A PostgreSQL database whose name holds a raw ``@`` is reached, and named right.

Left by the seventh campaign, whose fix reads a URL's credentials up to the last ``@`` of its
address (a password may hold ``@`` and ``/``): ``postgresql+psycopg://postgres@127.0.0.1:55432/lab@x``
then read as user ``postgres@127.0.0.1``, password ``55432/lab`` and host ``x``. Every batch
went to the spill store, and the log lines, spill headers and CLI messages named a database
that does not exist (``postgres%40127.0.0.1:***@x``). A reading whose credentials would hold a
host and path (a user name with ``/``, or ``@host:port/`` followed by no host and path of its
own) now ends them at an earlier ``@``, and the database name's ``@`` is escaped for SQLAlchemy.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from cmbagent_otel.cli import main
from cmbagent_otel.dag import database

from .test_url_password_at import _run, _shown

PG_ENV = "CMBAGENT_OTEL_TEST_PG_URL"


@pytest.fixture
def at_database() -> Iterator[tuple[str, str]]:
    """(server URL without a database, name of a fresh database holding a raw "@")."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} not set")
    name = f"lab@x8{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    parsed = make_url(base)
    server = f"{parsed.drivername}://{parsed.username}@{parsed.host}:{parsed.port}"
    try:
        yield server, name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("password", [None, "pw"])
def test_a_database_name_with_at_is_reached(at_database: tuple[str, str], password: str | None, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    server, name = at_database
    if password:  # the test server trusts loopback: any password logs in
        scheme, _, rest = server.partition("://")
        server = f"{scheme}://{rest.replace('@', f':{password}@', 1)}"
    url = f"{server}/{name}"  # the "@" as written, unescaped
    exporter = _run(url, tmp_path / "spill")
    assert exporter.stats()["exported"] > 0 and exporter.stats()["spilled"] == 0, exporter.stats()
    engine = create_engine(make_url(database.resolve_url(url)))
    try:
        assert engine.url.database == name
        with engine.connect() as conn:
            (run_id,) = conn.execute(text("SELECT id FROM workflow_runs")).scalars().all()
    finally:
        engine.dispose()
    assert main(["--db", url, "runs", "--format", "json"]) == 0
    out = "".join(capsys.readouterr())
    assert run_id in out  # read back from that database
    shown = _shown(caplog, tmp_path / "spill", out)
    assert "%40127.0.0.1" not in shown and ":***@x8" not in shown


@pytest.mark.parametrize(("url", "host", "database_name", "password"), [
    ("postgresql://u:p@ss/w0rd@db/x", "db", "x", "p@ss/w0rd"),  # the seventh campaign's: still the password's
    ("postgresql://u:p@ss/w0rd@db", "db", None, "p@ss/w0rd"),
    ("postgresql://u:p@ss:1/w@db:5432/x", "db", "x", "p@ss:1/w"),
    ("postgresql://me@lab.org:pw@db/x", "db", "x", "pw"),
    ("postgresql://postgres@db:5432/lab@x", "db", "lab@x", None),
    ("postgresql://postgres@db/lab@x", "db", "lab@x", None),
    ("postgresql://u:p@ss@db:5432/a@b@c", "db", "a@b@c", "p@ss"),
])
def test_where_the_credentials_end(url: str, host: str, database_name: str | None, password: str | None) -> None:
    parsed = make_url(database.resolve_url(url))
    assert (parsed.host, parsed.database, parsed.password) == (host, database_name, password)
    if password:
        assert password not in database.redacted(url) and password not in database.target_of(url)
