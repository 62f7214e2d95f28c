"""The ``cmbagent-otel`` CLI against a database filled by the exporter."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel.cli import SUBCOMMANDS, main
from cmbagent_otel.dag.writer import DagWriter

from .scenario import run_scenario


@pytest.fixture
def filled(db_url: str, provider: Any) -> tuple[str, str]:
    run_scenario()
    spans = list(provider.memory.get_finished_spans())
    DagWriter(db_url).write(spans)
    return db_url, str(uuid.UUID(int=spans[0].context.trace_id))


def test_registry_has_builtin_commands() -> None:
    assert {"runs", "dag", "events", "db"} <= set(SUBCOMMANDS)


def test_runs_table(filled: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, run_id = filled
    assert main(["--db", url, "runs"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if run_id in line and "branch" not in line)
    assert "planning-control" in line and "completed" in line and "$0.0105" in line
    assert "9" in line.split() or " 9 " in line  # nodes
    assert main(["--db", url, "runs", "--format", "json"]) == 0
    records = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert (records[run_id]["nodes"], records[run_id]["events"]) == (9, 9)
    assert records[run_id]["cost_usd"] == pytest.approx(0.0105)
    assert sum(r["is_branch"] for r in records.values()) == 2


def test_dag_tree_and_formats(filled: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, run_id = filled
    assert main(["--db", url, "dag", "latest"]) == 0
    tree = capsys.readouterr().out
    assert f"run {run_id}" in tree
    for short in ("planning", "control", "step_1", "step_2", "step_2_redo_1", "branch_at_step_2", "terminator"):
        assert short in tree
    step1 = next(line for line in tree.splitlines() if "step_1 " in line)
    assert "agent=engineer" in step1 and "tokens=280" in step1 and "$0.0020" in step1 and "completed" in step1
    assert "failed" in next(line for line in tree.splitlines() if "step_2 " in line)

    assert main(["--db", url, "dag", run_id[:8], "--format", "json"]) == 0
    dag = json.loads(capsys.readouterr().out)
    assert dag["run"]["id"] == run_id and len(dag["nodes"]) == 9 and len(dag["edges"]) == 11
    assert dag["run"]["tokens"] == 1295 and dag["run"]["cost_usd"] == pytest.approx(0.0105)
    assert {"source": "branch_at_step_2", "target": "step_2_redo_2", "type": "conditional",
            "condition": "branch_redo_2"} in dag["edges"]

    assert main(["--db", url, "dag", run_id, "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph") and '"step_1" -> "step_2";' in dot
    assert main(["--db", url, "dag", run_id, "--format", "mermaid"]) == 0
    mermaid = capsys.readouterr().out
    assert mermaid.startswith("flowchart TD") and "n_step_1 --> n_step_2" in mermaid
    assert "n_branch_at_step_2 -.->|branch_redo_1| n_step_2_redo_1" in mermaid


def test_events(filled: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, run_id = filled
    assert main(["--db", url, "events", run_id, "--node", "step_1", "--format", "json"]) == 0
    events = json.loads(capsys.readouterr().out)
    assert [(e["type"], e["subtype"], e["node"], e["agent"]) for e in events] == [
        ("agent_call", "llm", "step_1", "engineer"), ("code_exec", "complete", "step_1", "executor")]
    assert main(["--db", url, "events", "latest"]) == 0
    table = capsys.readouterr().out
    assert "code_exec/error" in table and "step_2_redo_2" in table


def test_errors_exit_2(filled: tuple[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url, _ = filled
    assert main(["--db", url, "dag", "no-such-run"]) == 2
    assert "unknown run 'no-such-run'" in capsys.readouterr().err
    assert main(["--db", url, "events", "latest", "--node", "step_9"]) == 2
    assert "no node 'step_9'" in capsys.readouterr().err
    assert main(["--db", "mysql://x/y", "runs"]) == 2
    assert "unsupported database backend" in capsys.readouterr().err
    assert main(["--db", "not a url", "runs"]) == 2
    err = capsys.readouterr().err
    assert "invalid database URL" in err and "Traceback" not in err
    assert main(["--db", f"sqlite:///{tmp_path}/empty.db", "runs"]) == 2
    assert "cmbagent-otel db upgrade" in capsys.readouterr().err


def test_db_commands(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", sqlite_url, "db", "current"]) == 0
    assert "<none>" in capsys.readouterr().out
    assert main(["--db", sqlite_url, "db", "upgrade"]) == 0
    assert "0003_cmbagent_tables (head: 0003_cmbagent_tables)" in capsys.readouterr().out
    assert main(["--db", sqlite_url, "db", "downgrade"]) == 0
    assert ": 0002_dag_hierarchy_columns" in capsys.readouterr().out
    assert main(["--db", sqlite_url, "db", "upgrade"]) == 0
    capsys.readouterr()


def test_console_script(tmp_path: Path, provider: Any) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    run_scenario()
    DagWriter(url).write(provider.memory.get_finished_spans())
    script = Path(sys.executable).with_name("cmbagent-otel")
    assert script.exists(), "package not installed with its console script"
    env_url = {"CMBAGENT_OTEL_DATABASE_URL": url, "PATH": str(script.parent)}
    done = subprocess.run([str(script), "dag", "latest", "--format", "mermaid"], capture_output=True, text=True,
                          env=env_url, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "n_step_2 --> n_step_3" in done.stdout
    bad = subprocess.run([str(script), "dag", "nope"], capture_output=True, text=True, env=env_url, timeout=120,
                         check=False)
    assert bad.returncode == 2 and "unknown run" in bad.stderr and "Traceback" not in bad.stderr


def test_run_without_nodes_counts_its_events(sqlite_url: str, provider: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A trace with no DAG node (e.g. a lone LLM call) still shows its usage on the run."""
    from .scenario import llm

    with llm("assistant", 30, 12, 0.0004):
        pass
    DagWriter(sqlite_url).write(provider.memory.get_finished_spans())
    assert main(["--db", sqlite_url, "dag", "latest"]) == 0
    tree = capsys.readouterr().out
    assert "tokens=42" in tree and "1 event(s) outside any DAG node" in tree
    assert main(["--db", sqlite_url, "dag", "latest", "--format", "json"]) == 0
    dag = json.loads(capsys.readouterr().out)
    assert (dag["run"]["tokens"], dag["run"]["events_outside_nodes"], dag["nodes"]) == (42, 1, [])


def test_rows_of_older_versions_are_read(filled: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Rows written before issue 11: a dict in event meta.tokens, no usage totals on nodes."""
    from sqlalchemy import create_engine, text

    url, run_id = filled
    engine = create_engine(url)
    with engine.begin() as conn:
        for node_id, meta in conn.execute(text("SELECT id, meta FROM dag_nodes")).all():
            meta = json.loads(meta) if isinstance(meta, str) else meta
            for key in ("tokens", "prompt_tokens", "completion_tokens", "cost_usd"):
                meta.pop(key, None)
            conn.execute(text("UPDATE dag_nodes SET meta = :m WHERE id = :i"), {"m": json.dumps(meta), "i": node_id})
        for event_id, meta in conn.execute(text("SELECT id, meta FROM execution_events")).all():
            meta = json.loads(meta) if isinstance(meta, str) else meta
            if "tokens" in meta:
                meta["tokens"] = {"prompt": meta.pop("prompt_tokens"), "completion": meta.pop("completion_tokens"),
                                  "total": meta["tokens"]}
                conn.execute(text("UPDATE execution_events SET meta = :m WHERE id = :i"),
                             {"m": json.dumps(meta), "i": event_id})
    engine.dispose()
    assert main(["--db", url, "dag", run_id]) == 0
    step1 = next(line for line in capsys.readouterr().out.splitlines() if "step_1 " in line)
    assert "tokens=280" in step1
    assert main(["--db", url, "events", run_id, "--node", "step_1", "--format", "json"]) == 0
    assert [e["tokens"] for e in json.loads(capsys.readouterr().out)] == [280, None]
