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


def test_offline_demo_prints_commands_that_read_its_database(tmp_path: Path, monkeypatch) -> None:
    """Run with no database URL in the environment, the demo writes next to itself; the commands
    it prints must read that database from a shell that does not have its URL either."""
    import shlex

    from cmbagent_otel.cli import main

    script = tmp_path / "demo dir" / "run.py"  # a space: the printed --db must stay one argument
    script.parent.mkdir()
    script.write_text((EXAMPLES / "offline_demo" / "run.py").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("CMBAGENT_OTEL_DATABASE_URL", "CMBAGENT_DATABASE_URL")}
    env |= {"OTEL_TRACES_EXPORTER": "cmbagent_dag", "CMBAGENT_DEFAULT_WORK_DIR": str(tmp_path / "work")}
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands = [shlex.split(line)[1:] for line in proc.stdout.splitlines() if line.startswith("  cmbagent-otel")]
    assert len(commands) == 3
    monkeypatch.delenv("CMBAGENT_OTEL_DATABASE_URL", raising=False)
    monkeypatch.delenv("CMBAGENT_DATABASE_URL", raising=False)
    monkeypatch.setenv("CMBAGENT_DEFAULT_WORK_DIR", str(tmp_path / "work"))  # holds no database
    for argv in commands:
        assert main(argv) == 0, argv
