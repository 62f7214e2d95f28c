"""A database URL's password never reaches the CLI's output, an error message or a spill file's target.

Found by the twenty-first campaign. A PostgreSQL URL whose password lost its ``@``
(``postgresql://app:<password>/db``, ``postgresql://app:<password>``: the host's default meant)
is read by SQLAlchemy as host ``app`` and port ``<password>``; ``int()`` refused the port, and its
``ValueError`` (``invalid literal for int() with base 10: '<password>'``) went whole into the
``BadDatabaseURL`` message: printed by every command given it in ``--db`` (``runs``, ``dag``,
``events``, ``db``, ``replay``, ``ingest``, ``demo``), logged by ``DagSpanExporter(url)``. And a
secret-named query parameter other than libpq's (``?pwd=``, ``?client_secret=``) stayed in the
URL every message shows and in the target written at the head of each spill file. A database
driver that is not installed (``postgresql+pg8000://``) ended the CLI in a traceback. Run as an
operator runs it: the CLI in a subprocess.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter

from cmbagent_otel.dag import database

PASSWORD = f"Pw{secrets.token_hex(8)}"
# passwords the parser takes for a port: the "@" left out, the host's default meant
LOST_AT = [f"postgresql://app:{PASSWORD}/cmbagent", f"postgresql+psycopg://app:{PASSWORD}",
           f"postgresql://app:{PASSWORD}?sslmode=require", f"postgresql://app:#{PASSWORD}/x"]
COMMANDS = [["runs"], ["dag", "latest"], ["events", "latest"], ["db", "current"], ["db", "upgrade"], ["replay"],
            ["ingest", "--port", "0", "--grpc-port", "off"], ["demo"]]


def _cli(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = "from cmbagent_otel.cli import main; raise SystemExit(main())"
    env = {**os.environ, "CMBAGENT_DEFAULT_WORK_DIR": str(tmp_path / "work")}
    env.pop("CMBAGENT_OTEL_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-c", code, "--db", url, *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: "-".join(c[:2]))
def test_attack3_a_password_read_as_a_port_is_not_printed(tmp_path: Path, command: list[str]) -> None:
    done = _cli(tmp_path, LOST_AT[0], *command)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert PASSWORD not in done.stdout + done.stderr, done.stderr
    assert done.stderr.startswith("cmbagent-otel: error: invalid database URL (postgresql://...)"), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("url", LOST_AT)
def test_attack3_bad_url_messages_hold_no_password(url: str) -> None:
    with pytest.raises(database.BadDatabaseURL) as raised:
        database.resolve_url(url)
    assert PASSWORD not in str(raised.value)
    assert PASSWORD not in database.redacted(url)


def test_attack3_the_exporter_logs_no_password_of_a_bad_url(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for url in LOST_AT:
        exporter = DagSpanExporter(url, spill=False)
        exporter.shutdown()
    assert caplog.records
    assert not [r.getMessage() for r in caplog.records if PASSWORD in r.getMessage()]


@pytest.mark.parametrize("name", ["pwd", "client_secret", "db_password", "secret"])
def test_attack3_secret_named_query_parameters_are_hidden(name: str) -> None:
    url = f"postgresql://app@db.internal:5432/cmbagent?sslmode=require&{name}={PASSWORD}"
    assert PASSWORD not in database.redacted(url)
    assert PASSWORD not in database.target_of(url)
    assert "sslmode=require" in database.target_of(url)  # the other parameters still name the database
    # the password is given back to whoever connects to that target
    assert PASSWORD in database.with_credentials(database.target_of(url), url)


def test_attack3_a_missing_driver_is_one_line(tmp_path: Path) -> None:
    url = f"postgresql+pg8000://app:{PASSWORD}@127.0.0.1:9/cmbagent"
    pytest.importorskip("sqlalchemy.dialects.postgresql.pg8000")
    try:
        import pg8000  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pg8000 is installed here")
    for command in (["runs"], ["db", "upgrade"], ["db", "current"]):
        done = _cli(tmp_path, url, *command)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and PASSWORD not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines() == [
            "cmbagent-otel: error: a module this needs is not installed: No module named 'pg8000'"]
