"""``cmbagent-otel ingest`` names the database and what is wrong with it.

On a corrupt SQLite file, a database another application's tables left without a column
our writer needs, or an unreachable PostgreSQL, every request is answered 503 (the client
keeps its spans and retries), and the operator read only ``database unavailable
(DatabaseUnavailable); asking clients to retry``: neither which database nor why. The
line now carries the writer's message (the database without its password, the driver's
reason), on one line, once per outage (twelfth fault campaign; a leftover of the tenth). And
``cmbagent-otel ingest`` says so when it starts, not only once a client sends spans.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cmbagent_otel.dag.database import ensure_schema
from cmbagent_otel.ingest import IngestServer

SPAN = {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331", "name": "work",
        "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000"}
BODY = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [SPAN]}]}]}).encode()


def _post(srv: IngestServer) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        conn.request("POST", "/v1/traces", body=BODY, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cmbagent_otel.ingest" and "retry" in r.getMessage()]


def _corrupt(tmp_path: Path) -> tuple[str, str, str]:
    path = tmp_path / "corrupt.db"
    path.write_bytes(os.urandom(8192))
    return f"sqlite:///{path}", str(path), "file is not a database"


def _missing_column(tmp_path: Path) -> tuple[str, str, str]:
    path = tmp_path / "other.db"
    ensure_schema(f"sqlite:///{path}")
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE execution_events DROP COLUMN depth")
    conn.commit()
    conn.close()
    return f"sqlite:///{path}", str(path), "execution_events"


def _unreachable_postgres(tmp_path: Path) -> tuple[str, str, str]:
    return "postgresql+psycopg://ingest:hunter2pw@127.0.0.1:1/lab", "127.0.0.1:1/lab", "127.0.0.1"


@pytest.mark.parametrize("damage", [_corrupt, _missing_column, _unreachable_postgres], ids=lambda f: f.__name__[1:])
def test_the_log_line_names_the_database_and_the_problem(damage: object, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    url, where, why = damage(tmp_path)  # type: ignore[operator]
    caplog.set_level(logging.INFO, logger="cmbagent_otel")
    with IngestServer(url, host="127.0.0.1", port=0, grpc_port="off") as srv:
        assert _post(srv) == 503
        assert _post(srv) == 503
        assert srv.spans_written == 0
    lines = _lines(caplog)
    assert len(lines) == 1, lines  # once per outage
    line = lines[0]
    assert where in line and why in line, line
    assert "\n" not in line and "hunter2pw" not in line


@pytest.mark.parametrize("damage", [_corrupt, _unreachable_postgres], ids=lambda f: f.__name__[1:])
def test_the_cli_names_the_damage_when_it_starts(damage: object, tmp_path: Path) -> None:
    url, where, why = damage(tmp_path)  # type: ignore[operator]
    proc = subprocess.Popen([sys.executable, "-m", "cmbagent_otel.cli", "--db", url, "ingest", "--port", "0",
                             "--grpc-port", "off"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    stderr = proc.stderr
    assert stderr is not None

    def read() -> None:
        for text in stderr:
            lines.put(text)

    threading.Thread(target=read, daemon=True).start()
    try:
        line = lines.get(timeout=60)  # no request is ever sent
    except queue.Empty:
        line = ""
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert line.startswith("cmbagent-otel ingest: cannot write to") and where in line and why in line, line
    assert "hunter2pw" not in line
