"""The README's main job: `cmbagent-otel demo` on a fresh SQLite database prints the run's DAG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CLI = Path(sys.executable).with_name("cmbagent-otel")


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def test_with_nothing_configured_the_database_is_in_the_home_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CMBAGENT_"))}
    env["HOME"] = str(tmp_path / "home")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    demo = subprocess.run([str(CLI), "demo", "--work-dir", str(tmp_path / "code")], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)
    assert demo.returncode == 0, demo.stderr
    database = tmp_path / "home" / ".cmbagent-otel" / "database" / "cmbagent.db"
    assert f"spans written to the DAG database sqlite:///{database}" in demo.stdout
    assert database.exists() and list(cwd.iterdir()) == []  # no "~" folder made in the working directory


def test_demo_writes_the_run_and_prints_its_dag(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CMBAGENT_"))}
    env["CMBAGENT_DEFAULT_WORK_DIR"] = str(tmp_path / "work")  # the embedded default location
    env["CMBAGENT_OTEL_SPILL_DIR"] = str(tmp_path / "spill")
    env["PATH"] = str(tmp_path / "empty-bin")  # no `python` to be found: the demo's code runs with its interpreter
    demo = run_cli("demo", "--work-dir", str(tmp_path / "code"), env=env)
    assert demo.returncode == 0, demo.stderr
    out = demo.stdout
    database = tmp_path / "work" / "database" / "cmbagent.db"
    assert database.exists()
    assert f"spans written to the DAG database sqlite:///{database}" in out
    for line in ("planning (planning) completed", "step_1 (agent) completed", "step_2_redo_1 (redo) failed",
                 "step_2_redo_2 (redo) completed", "branch_at_step_2 (branch_point)", "step_3 (agent) completed",
                 "terminator (terminator)", "step_1_engineer (sub_agent)"):
        assert line in out, line
    assert "step_2_redo_1 (redo) failed agent=engineer" in out and "error: fit diverged again" in out
    assert "Traceback" not in demo.stderr
    events = run_cli("events", "latest", "--node", "step_2", "--recursive", "--format", "json", env=env)
    codes = [e for e in json.loads(events.stdout) if e["type"] == "code_exec"]
    # the code really ran: the first two attempts exit 1 and 3, the third succeeds
    assert [(e["status"], e["error"]) for e in codes] == [
        ("failed", "code execution exited with 1"), ("failed", "code execution exited with 3"), ("completed", None)]
    runs = run_cli("runs", env=env)
    assert runs.returncode == 0 and "planning-control" in runs.stdout
    mermaid = run_cli("dag", "latest", "--format", "mermaid", env=env)
    assert mermaid.returncode == 0 and mermaid.stdout.startswith(("graph", "flowchart"))
    missing = run_cli("dag", "no-such-run", env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
