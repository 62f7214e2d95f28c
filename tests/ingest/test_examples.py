"""The examples run as documented (offline, no API key, no Docker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import text

from cmbagent_otel.dag.writer import DagWriter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_offline_demo_writes_a_completed_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    env = {**os.environ, "CMBAGENT_OTEL_DATABASE_URL": url, "OTEL_TRACES_EXPORTER": "cmbagent_dag"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "offline_demo" / "run.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    writer = DagWriter(url)
    try:
        with writer.engine.connect() as conn:
            runs = conn.execute(text("select mode, status from workflow_runs where is_branch = :no"),
                                {"no": False}).all()
            nodes = {row[0] for row in conn.execute(text("select node_type from dag_nodes"))}
    finally:
        writer.close()
    assert [tuple(r) for r in runs] == [("planning-control", "completed")]
    assert {"planning", "control", "agent", "redo"} <= nodes


def test_postgres_example_refuses_without_a_postgres_url(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CMBAGENT_OTEL_DATABASE_URL"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "postgres" / "run.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "CMBAGENT_OTEL_DATABASE_URL" in proc.stderr
