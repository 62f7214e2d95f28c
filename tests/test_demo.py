"""The README's main job: `cmbagent-otel demo` on a fresh SQLite database prints the run's DAG."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CLI = Path(sys.executable).with_name("cmbagent-otel")


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def test_demo_writes_the_run_and_prints_its_dag(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CMBAGENT_"))}
    env["CMBAGENT_DEFAULT_WORK_DIR"] = str(tmp_path / "work")  # the embedded default location
    env["CMBAGENT_OTEL_SPILL_DIR"] = str(tmp_path / "spill")
    demo = run_cli("demo", "--work-dir", str(tmp_path / "code"), env=env)
    assert demo.returncode == 0, demo.stderr
    out = demo.stdout
    assert (tmp_path / "work" / "database" / "cmbagent.db").exists()
    assert "spans written to the DAG database" in out
    for line in ("planning (planning) completed", "step_1 (agent) completed", "step_2_redo_1 (redo) failed",
                 "step_2_redo_2 (redo) completed", "branch_at_step_2 (branch_point)", "step_3 (agent) completed",
                 "terminator (terminator)", "step_1_engineer (sub_agent)"):
        assert line in out, line
    assert "Traceback" not in demo.stderr
    runs = run_cli("runs", env=env)
    assert runs.returncode == 0 and "planning-control" in runs.stdout
    mermaid = run_cli("dag", "latest", "--format", "mermaid", env=env)
    assert mermaid.returncode == 0 and mermaid.stdout.startswith(("graph", "flowchart"))
    missing = run_cli("dag", "no-such-run", env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
