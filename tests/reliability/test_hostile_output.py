"""What the CLI prints from a database it did not write itself, and from database URLs.

Rows can come from anyone: another writer of cmbagent's tables, an ingest client's spans,
an app whose agent names or exception messages hold terminal escape sequences. Printed raw,
``ESC ] 0 ; ... BEL`` retitles the reader's terminal, ``ESC [ 2 J`` clears it and U+009B is
a one-character CSI. Database URLs carry passwords, also as query parameters
(``sslpassword=``), which no message may show.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.cli import main

HOSTILE = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mRED\x1b[0m\r\x08\x9b31m\u202eevil[/red][bold]"
RAW_CONTROLS = ("\x1b", "\x07", "\x9b", "\x08", "\r", "\u202e")


@pytest.fixture
def hostile_db(tmp_path: Path, provider: Any) -> str:
    url = f"sqlite:///{tmp_path}/hostile.db"
    with (pytest.raises(RuntimeError), workflow("wf" + HOSTILE, mode="mode" + HOSTILE, task="task" + HOSTILE),
          phase("control"), step(1, "desc" + HOSTILE, agent="agent" + HOSTILE)):
        with provider.get_tracer("other").start_as_current_span("call" + HOSTILE) as span:
            span.set_attribute("gen_ai.agent.name", "agent" + HOSTILE)
        raise RuntimeError("boom" + HOSTILE)
    provider.store(url)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:  # another writer's statuses: markup, not one of ours
            conn.execute(text("UPDATE dag_nodes SET status = :s WHERE node_type = 'terminator'"),
                         {"s": "[/x]" + HOSTILE})
    finally:
        engine.dispose()
    return url


@pytest.mark.parametrize("command", [["runs"], ["dag", "latest"], ["dag", "latest", "--format", "dot"],
                                     ["dag", "latest", "--format", "mermaid"], ["events", "latest"],
                                     ["dag", "latest", "--format", "json"], ["events", "latest", "--format", "json"]])
def test_control_characters_in_rows_never_reach_the_terminal(hostile_db: str, command: list[str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", hostile_db, *command]) == 0
    out, err = capsys.readouterr()
    assert not [c for c in RAW_CONTROLS if c in out + err], out
    assert "PWNED" in out or (command[0] == "runs" and "mode" in out)  # the text stays readable, escaped
    if command[:2] == ["dag", "latest"] and len(command) == 2:
        assert "\\x1b]0;PWNED\\x07" in out and "evil[/red][bold]" in out  # shown literally, markup too


def test_a_run_id_argument_with_escapes_is_echoed_neutralised(hostile_db: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", hostile_db, "dag", "\x1b[2Jnope"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2Jnope" in err


SECRETS = ("SECRETPW1", "SECRETQ2")


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://postgres:SECRETPW1@127.0.0.1:1/db?sslpassword=SECRETQ2&application_name=x",
    "postgresql+psycopg://u:SECRETPW1@host:notaport/db?sslpassword=SECRETQ2",  # sqlalchemy: ValueError
    "postgresql+nodriver://u:SECRETPW1@h/db?sslpassword=SECRETQ2",  # sqlalchemy: NoSuchModuleError
    "mysql://u:SECRETPW1@h/db?sslpassword=SECRETQ2",
    "not a url SECRETPW1",
], ids=["refused", "bad-port", "unknown-driver", "other-backend", "no-url"])
@pytest.mark.parametrize("command", [["runs"], ["dag", "latest"], ["db", "current"], ["db", "upgrade"]])
def test_bad_or_unreachable_database_urls_are_one_line_without_secrets(url: str, command: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "cmbagent_otel.cli", "--db", url, *command],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("cmbagent-otel: error: ")
    assert not [s for s in SECRETS if s in done.stdout + done.stderr], done.stderr


def test_exporter_logs_never_show_secret_query_parameters(tmp_path: Path, provider: Any,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from cmbagent_otel.exporters.dag import DagSpanExporter

    with workflow("w", mode="m"):
        pass
    url = "postgresql+psycopg://postgres:SECRETPW1@127.0.0.1:1/db?sslpassword=SECRETQ2&application_name=x"
    exporter = DagSpanExporter(url, spill_dir=str(tmp_path / "spill"), timeout=0.2)
    caplog.set_level(logging.DEBUG)
    try:
        exporter.export(list(provider.memory.get_finished_spans()))
    finally:
        exporter.shutdown()
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    assert "127.0.0.1:1/db?application_name=x" in logged  # the database is named...
    assert not [s for s in SECRETS if s in logged]  # ...without its secrets
    for f in (tmp_path / "spill").iterdir():
        assert not [s for s in SECRETS if s.encode() in f.read_bytes()], f.name


@pytest.mark.parametrize("command", [["runs"], ["dag", "latest"], ["events", "latest"], ["dag", "latest", "--format",
                                                                                          "json"]])
def test_bytes_that_are_not_utf8_in_rows_are_shown_replaced(hostile_db: str, command: list[str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """SQLite keeps whatever bytes another writer stored; before, one such row made every
    reading command fail ("Could not decode to UTF-8 column")."""
    import sqlite3

    path = hostile_db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE workflow_runs SET mode = CAST(X'6dc328' AS TEXT)")
        conn.execute("UPDATE dag_nodes SET agent = CAST(X'fffe41' AS TEXT)")
        conn.execute("UPDATE execution_events SET agent_name = CAST(X'c328' AS TEXT)")
    assert main(["--db", hostile_db, *command]) == 0
    out = capsys.readouterr().out
    assert "\ufffd" in out or "\\ufffd" in out
