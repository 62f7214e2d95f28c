"""Scale-out: several agent processes export over OTLP/HTTP to one ingest server and one DB."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from ingest_app import recorded
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from sqlalchemy import text

from cmbagent_otel.dag.writer import DagWriter
from cmbagent_otel.ingest import IngestServer

APP = Path(__file__).with_name("ingest_app.py")
TOKEN = "scale-out-token"
N = 4


def signature(url: str, run_id: str) -> dict[str, Any]:
    """What must be identical for every run of the same app, whatever process wrote it."""
    writer = DagWriter(url)
    try:
        with writer.engine.connect() as conn:
            run_row = conn.execute(text("select mode, status, agent, model from workflow_runs where id = :id"),
                                   {"id": run_id}).one()
            nodes = sorted((json.loads(m)["id"] if isinstance(m, str) else m["id"], t, s, d)
                           for m, t, s, d in conn.execute(
                text("select meta, node_type, status, depth from dag_nodes where run_id = :id"), {"id": run_id}))
            events = Counter(conn.execute(text(
                "select event_type, event_subtype, agent_name, status, depth from execution_events "
                "where run_id = :id"), {"id": run_id}).all())
    finally:
        writer.close()
    return {"run": tuple(run_row), "nodes": nodes, "events": events}


def runs_by_task(url: str) -> dict[str, tuple[str, str]]:
    writer = DagWriter(url)
    try:
        with writer.engine.connect() as conn:
            return {task: (run_id, status) for run_id, task, status in conn.execute(
                text("select id, task_description, status from workflow_runs"))}
    finally:
        writer.close()


def reference_signature(tmp_path: Path) -> dict[str, Any]:
    url = f"sqlite:///{tmp_path / 'ref.db'}"
    DagWriter(url).write(recorded("ref"))
    return signature(url, runs_by_task(url)["task ref"][0])


def test_four_processes_one_database(tmp_path: Path, db_url: str) -> None:
    url = db_url
    expected = reference_signature(tmp_path)
    with IngestServer(url, port=0, grpc_port=0, token=TOKEN) as srv:
        env = {
            **os.environ,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": srv.endpoint,
            "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer%20{TOKEN}",
            "OTEL_SERVICE_NAME": "scale-out-agent",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",  # several requests per process, interleaved
        }
        env.pop("CMBAGENT_OTEL_DATABASE_URL", None)
        procs = [subprocess.Popen([sys.executable, str(APP), f"p{i}"], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(N)]
        outputs = [p.communicate(timeout=180)[0] for p in procs]
        for i, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
            assert proc.returncode == 0, out
            assert f"DONE p{i}" in out
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = runs_by_task(url)
            if len(found) == N and all(status == "completed" for _, status in found.values()):
                break
            time.sleep(0.05)
    found = runs_by_task(url)
    assert sorted(found) == [f"task p{i}" for i in range(N)]
    for task, (run_id, _) in found.items():
        assert signature(url, run_id) == expected, task
    assert srv.unavailable_responses == 0


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    code = "import cmbagent_otel.ingest; from cmbagent_otel.cli import main; raise SystemExit(main())"
    env = {**os.environ, "CMBAGENT_OTEL_INGEST_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-c", code, "--db", url, "ingest", "--port", "0", "--grpc-port", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+/v1/traces)", line)
        assert match, line
        assert TOKEN not in line
        spans = recorded("cli")
        import urllib.request

        req = urllib.request.Request(match.group(1), data=encode_spans(spans).SerializeToString(), headers={
            "Content-Type": "application/x-protobuf", "Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert f"stopped after {len(spans)} span(s)" in out
    assert "task cli" in runs_by_task(url)


def test_cli_rejects_bad_database_url() -> None:
    code = "import cmbagent_otel.ingest; from cmbagent_otel.cli import main; raise SystemExit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "ingest", "--db", "mysql://x/y", "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unsupported database backend" in proc.stderr


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_cli_says_which_port_is_taken_and_how_to_move(tmp_path: Path, flag: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--grpc-port" if flag == "--port" else "--port"
        code = "from cmbagent_otel.cli import main; raise SystemExit(main())"
        proc = subprocess.run([sys.executable, "-c", code, "--db", f"sqlite:///{tmp_path / 'x.db'}", "ingest",
                               flag, str(port), other, "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and "--port/--grpc-port" in proc.stderr, proc.stderr


def test_the_schema_is_made_when_the_server_starts(db_url: str) -> None:
    """The schema is checked (here: made) in the background from the server's start, not by the
    first request, whose 3 s write wait a first PostgreSQL schema overran on a busy machine (503s)."""
    import threading

    from cmbagent_otel.dag.database import head_revisions
    from cmbagent_otel.dag.query import DagReader

    with IngestServer(db_url, port=0, grpc_port=0, token=TOKEN) as srv:
        for thread in threading.enumerate():  # the one start() began, if it has not ended yet
            if thread.name == "cmbagent-otel-schema":
                thread.join()
        assert DagReader.revision(db_url) == head_revisions()[0]
        assert srv.core.requests == 0
