"""A database password holding a raw ``@`` or ``/`` connects, and never shows.

Found by the seventh campaign: SQLAlchemy ends a URL's password at its first ``@``, so
``postgresql+psycopg://user:p@ss/w0rd@host/db`` connected to host ``ss`` (database
``w0rd@host/db``): every batch went to the spill store, and the log lines, the spill files'
headers and the CLI's messages named the database as ``…@ss/w0rd%40host/db``, half the password.
The credentials are now what comes before the URL address's last ``@``.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from sqlalchemy import create_engine, text

import cmbagent_otel as c
from cmbagent_otel.cli import main


def _with_password(url: str, password: str) -> str:
    scheme, _, rest = url.partition("://")
    user, _, host = rest.partition("@")
    return f"{scheme}://{user.partition(':')[0]}:{password}@{host}"


def _run(url: str, spill_dir: Path) -> DagSpanExporter:
    exporter = DagSpanExporter(url, timeout=5, spill_dir=spill_dir)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    c.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        with c.workflow("password with an at sign"), c.phase("control"), c.step(1, "fit", agent="engineer"):
            pass
    finally:
        c.uninstrument()
        provider.shutdown()
    return exporter


def _shown(caplog: pytest.LogCaptureFixture, spill_dir: Path, out: str) -> str:
    logs = "\n".join(r.getMessage() + str(r.exc_info and r.exc_info[1]) for r in caplog.records)
    files = "\n".join(p.read_bytes().decode("utf-8", "replace") for p in spill_dir.glob("*") if p.is_file())
    return "\n".join((logs, files, out))


@pytest.mark.postgres
def test_a_password_with_at_and_slash_connects_and_never_shows(pg_url: str, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    tail = secrets.token_hex(6)
    url = _with_password(pg_url, f"p@ss/w0rd{tail}")  # the test server trusts loopback: any password logs in
    exporter = _run(url, tmp_path / "spill")
    assert exporter.stats()["exported"] > 0 and exporter.stats()["spilled"] == 0, exporter.stats()
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM workflow_runs")).scalar() == 1
    finally:
        engine.dispose()
    assert main(["--db", url, "runs"]) == 0
    out = "".join(capsys.readouterr())
    assert f"w0rd{tail}" not in _shown(caplog, tmp_path / "spill", out)


def test_an_unreachable_database_never_shows_such_a_password(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    tail = secrets.token_hex(6)
    url = f"postgresql+psycopg://astro:p@ss/w0rd{tail}@127.0.0.1:1/runs"
    exporter = _run(url, tmp_path / "spill")
    assert exporter.stats()["spilled"] > 0  # nothing listens on port 1: spilled, with log lines
    assert main(["--db", url, "runs"]) == 2
    out = "".join(capsys.readouterr())
    shown = _shown(caplog, tmp_path / "spill", out)
    assert "127.0.0.1:1/runs" in shown  # the database is named...
    assert f"w0rd{tail}" not in shown and "ss/w0rd" not in shown  # ...without its password
