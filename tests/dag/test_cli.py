"""The ``cmbagent-otel`` CLI against a database filled by the exporter."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel.cli import COMMANDS, main
from cmbagent_otel.dag.writer import DagWriter

from .scenario import run_scenario


@pytest.fixture
def filled(db_url: str, provider: Any) -> tuple[str, str]:
    run_scenario()
    spans = list(provider.memory.get_finished_spans())
    DagWriter(db_url).write(spans)
    return db_url, str(uuid.UUID(int=spans[0].context.trace_id))


def test_commands_are_listed_explicitly() -> None:
    assert [c.NAME for c in COMMANDS] == ["runs", "dag", "events", "db", "replay", "ingest", "demo"]
    src = Path(__file__).resolve().parents[2] / "src" / "cmbagent_otel"
    for module in ("ingest.py", "replay.py", "demo.py"):  # their command lines live in cli/
        assert "argparse" not in (src / module).read_text(), module


def test_runs_table(filled: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, run_id = filled
    assert main(["--db", url, "runs"]) == 0
    out = capsys.readouterr().out
    assert main(["runs", "--db", url]) == 0  # --db after the subcommand too
    assert capsys.readouterr().out == out
    line = next(line for line in out.splitlines() if run_id in line and "branch" not in line)
    assert "planning-control" in line and "completed" in line and "$0.0105" in line
    assert "9" in line.split() or " 9 " in line  # nodes
    assert main(["--db", url, "runs", "--format", "json"]) == 0
    records = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert (records[run_id]["nodes"], records[run_id]["events"]) == (9, 9)
    assert records[run_id]["cost_usd"] == pytest.approx(0.0105)
    assert sum(r["is_branch"] for r in records.values()) == 0  # the redos' branch runs are empty: hidden
    assert "2 empty branch run(s) hidden" in out
    assert main(["--db", url, "runs", "--all", "--format", "json"]) == 0
    assert sum(r["is_branch"] for r in json.loads(capsys.readouterr().out)) == 2


def test_dag_tree_and_formats(filled: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, run_id = filled
    assert main(["--db", url, "dag", "latest"]) == 0
    tree = capsys.readouterr().out
    assert f"run {run_id}" in tree
    for short in ("planning", "control", "step_1", "step_2", "step_2_redo_1", "branch_at_step_2", "terminator"):
        assert short in tree
    step1 = next(line for line in tree.splitlines() if "step_1 " in line)
    assert "agent=engineer" in step1 and "tokens=280" in step1 and "$0.0020" in step1 and "completed" in step1
    step2 = next(line for line in tree.splitlines() if "step_2 " in line)
    assert "failed" in step2 and "error: initial attempt failed" in step2
    redo1 = next(line for line in tree.splitlines() if "step_2_redo_1 " in line)
    assert "agent=engineer" in redo1 and "error: still failing" in redo1  # a redo is its step's agent's work
    assert tree.index("planning (") < tree.index("control (") < tree.index("step_3 (") < tree.index("terminator (")

    assert main(["--db", url, "dag", run_id[:8], "--format", "json"]) == 0
    dag = json.loads(capsys.readouterr().out)
    assert dag["run"]["id"] == run_id and len(dag["nodes"]) == 9 and len(dag["edges"]) == 11
    assert dag["run"]["tokens"] == 1295 and dag["run"]["cost_usd"] == pytest.approx(0.0105)
    assert {"source": "branch_at_step_2", "target": "step_2_redo_2", "type": "conditional",
            "condition": "branch_redo_2"} in dag["edges"]
    nodes = {n["id"]: n for n in dag["nodes"]}
    assert nodes["step_1"]["parent"] == "control" and nodes["planning"]["parent"] is None  # short ids, like id
    assert nodes["step_2_redo_1"]["parent"] == "step_2"
    assert {n: nodes[n]["error"] for n in nodes if nodes[n]["error"]} == {
        "step_2": "initial attempt failed", "step_2_redo_1": "still failing"}

    assert main(["--db", url, "dag", run_id, "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph") and "step_1 -> step_2 [" in dot and "control -> step_1 [" in dot
    assert main(["--db", url, "dag", run_id, "--format", "mermaid"]) == 0
    mermaid = capsys.readouterr().out
    assert mermaid.startswith("flowchart") and "n_step_1 --> n_step_2" in mermaid
    assert "n_branch_at_step_2 -.->|branch_redo_1| n_step_2_redo_1" in mermaid
    assert "n_control --- n_step_2" in mermaid  # the hierarchy: a parent to each child no stored edge joins
    links = [line for line in mermaid.splitlines() if any(a in line for a in (" --> ", " --- ", " -.->"))]
    for short in nodes:  # every node connected
        assert any(f"n_{short} " in line or line.endswith(f" n_{short}") for line in links), short
    assert ":::failed" in next(line for line in mermaid.splitlines() if line.strip().startswith("n_step_2_redo_1["))
    assert "error: still failing" in mermaid


def test_events(filled: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, run_id = filled
    assert main(["--db", url, "events", run_id, "--node", "step_1", "--format", "json"]) == 0
    events = json.loads(capsys.readouterr().out)
    assert [(e["type"], e["subtype"], e["node"], e["agent"]) for e in events] == [
        ("agent_call", "llm", "step_1", "engineer"), ("code_exec", "complete", "step_1", "executor")]
    assert main(["--db", url, "events", "latest"]) == 0
    table = capsys.readouterr().out
    assert "code_exec/error" in table and "step_2_redo_2" in table
    assert main(["--db", url, "events", run_id, "--node", "step_2", "--format", "json"]) == 0
    assert {e["node"] for e in json.loads(capsys.readouterr().out)} == {"step_2"}
    assert main(["--db", url, "events", run_id, "--node", "step_2", "--recursive", "--format", "json"]) == 0
    nested = json.loads(capsys.readouterr().out)
    assert {e["node"] for e in nested} == {"step_2", "step_2_redo_1", "step_2_redo_2"}
    assert [e["order"] for e in nested] == sorted(e["order"] for e in nested)
    assert [e["error"] for e in nested if e["error"]] == ["exit code 1", "exit code 1"]


def test_errors_exit_2(filled: tuple[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url, _ = filled
    assert main(["--db", url, "dag", "no-such-run"]) == 2
    assert "unknown run 'no-such-run'" in capsys.readouterr().err
    assert main(["--db", url, "events", "latest", "--node", "step_9"]) == 2
    assert "no node 'step_9'" in capsys.readouterr().err
    assert main(["--db", url, "events", "latest", "-r"]) == 2
    assert "--recursive needs --node" in capsys.readouterr().err
    assert main(["--db", "mysql://x/y", "runs"]) == 2
    assert "unsupported database backend" in capsys.readouterr().err
    assert main(["--db", "not a url", "runs"]) == 2
    err = capsys.readouterr().err
    assert "invalid database URL" in err and "Traceback" not in err
    empty = tmp_path / "empty.db"
    empty.touch()
    assert main(["--db", f"sqlite:///{empty}", "runs"]) == 2
    assert "no tracking tables" in capsys.readouterr().err
    # the same usage error on every backend (PostgreSQL refused -1, SQLite took it as "all")
    for limit in ("0", "-1", "ten"):
        with pytest.raises(SystemExit) as exited:
            main(["--db", url, "runs", "--limit", limit])
        assert exited.value.code == 2
        assert "--limit" in capsys.readouterr().err


def test_db_commands(sqlite_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--db", sqlite_url, "db", "current"]) == 2  # a read command: the file is not created
    assert "no database at" in capsys.readouterr().err
    (tmp_path / "cmbagent.db").touch()
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
    module = subprocess.run([sys.executable, "-m", "cmbagent_otel.cli", "--db", url, "runs"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert module.returncode == 0 and "planning-control" in module.stdout, module.stderr
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


@pytest.mark.parametrize("argv", [["runs"], ["dag", "latest"], ["events", "latest"], ["db", "current"],
                                  ["db", "downgrade"], ["dag", "latest", "--format", "svg"]])
def test_read_commands_never_create_a_database(argv: list[str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nodir" / "x.db"
    for args in (["--db", f"sqlite:///{missing}", *argv], [*argv, "--db", f"sqlite:///{missing}"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err == f"cmbagent-otel: error: no database at {missing} (nothing has been recorded there yet)\n"
        assert not missing.parent.exists()


def test_nothing_there_is_said_in_one_line(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cmbagent_otel.dag.database import upgrade

    upgrade(sqlite_url)
    for argv in (["runs"], ["dag", "latest"], ["events", "latest"]):
        assert main(["--db", sqlite_url, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cmbagent-otel: error: no runs in sqlite:///") and err.count("\n") == 1
    assert main(["--db", "sqlite://", "runs"]) == 2
    assert "in-memory" in capsys.readouterr().err


def test_a_failed_node_of_another_writer_shows_its_failing_event(filled: tuple[str, str],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """cmbagent's own rows carry no error on the node: the first failed event's error is its reason."""
    from sqlalchemy import create_engine, text

    url, run_id = filled
    engine = create_engine(url)
    with engine.begin() as conn:
        for node_id, meta in conn.execute(text("SELECT id, meta FROM dag_nodes WHERE status = 'failed'")).all():
            meta = json.loads(meta) if isinstance(meta, str) else meta
            meta.pop("error", None)
            conn.execute(text("UPDATE dag_nodes SET meta = :m WHERE id = :i"), {"m": json.dumps(meta), "i": node_id})
    engine.dispose()
    assert main(["--db", url, "dag", run_id, "--format", "json"]) == 0
    errors = {n["id"]: n["error"] for n in json.loads(capsys.readouterr().out)["nodes"] if n["error"]}
    assert errors == {"step_2": "exit code 1", "step_2_redo_1": "exit code 1"}


def test_svg_picture(filled: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import shutil

    if shutil.which("dot") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("Graphviz's dot is not installed (./dev setup installs it)")
        pytest.skip("Graphviz's dot is not installed (./dev setup installs it)")
    url, run_id = filled
    assert main(["--db", url, "dag", run_id, "--format", "svg"]) == 0
    svg = capsys.readouterr().out.replace("&#45;", "-")
    assert svg.startswith("<?xml") and "<svg" in svg and svg.rstrip().endswith("</svg>")
    for text in ("step_2_redo_1", "still failing", "planning-control", "#fadbd8", "#d9f2dd", "branch_redo_2"):
        assert text in svg, text


def test_svg_without_graphviz_is_a_clear_error(filled: tuple[str, str], tmp_path: Path) -> None:
    url, _ = filled
    script = Path(sys.executable).with_name("cmbagent-otel")
    done = subprocess.run([str(script), "--db", url, "dag", "latest", "--format", "svg"], capture_output=True,
                          text=True, env={"PATH": str(tmp_path)}, timeout=120, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("cmbagent-otel: error: --format svg needs Graphviz's `dot` program")


def test_a_database_cmbagent_wrote_is_read_as_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """cmbagent's own schema (no parent_node_id/depth before our revision 0002) is read without
    upgrading it, and reading leaves the file byte for byte as it was (read-only)."""
    import hashlib
    import shutil

    path = tmp_path / "cmbagent.db"
    shutil.copy(Path(__file__).parent.parent / "fixtures" / "old_cmbagent.db", path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    url = f"sqlite:///{path}"
    assert main(["--db", url, "runs", "--format", "json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert run["nodes"] == 3 and run["cost_usd"] == pytest.approx(0.003)
    assert main(["--db", url, "dag", "latest", "--format", "json"]) == 0
    dag = json.loads(capsys.readouterr().out)
    assert [n["id"] for n in dag["nodes"]] == ["planning", "step_1", "terminator"]
    assert main(["--db", url, "events", "latest", "--node", "step_1", "--recursive"]) == 0
    assert main(["--db", url, "db", "current"]) == 0
    capsys.readouterr()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmbagent.db"]


def test_help_states_every_default_the_parser_uses() -> None:
    """Each option with a default value says it in its help (what the README and docs quote)."""
    import argparse

    from cmbagent_otel.cli import build_parser

    parser = build_parser()
    assert "Exit codes: 0 success; 2 an error" in (parser.epilog or "")
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                    and not isinstance(action, argparse._HelpAction):
                assert f"default: {action.default}" in (action.help or ""), (name, action.dest, action.help)
                checked += 1
    assert checked >= 5  # runs --limit/--format, events --format, dag --format, demo --format


def test_demo_without_ag2_is_one_error_line(sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The package installs without the ag2 extra; its demo then says what to install (exit 2), no traceback."""
    monkeypatch.setitem(sys.modules, "autogen", None)  # `import autogen` raises ImportError, as where it is absent
    assert main(["--db", sqlite_url, "demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmbagent-otel: error: the demo runs AG2 agents") and "[ag2]" in err
    assert err.count("\n") == 1


def test_replay_db_help_says_what_db_does_there() -> None:
    """``replay --db`` filters spill files by database (no --db: each file to its own); its help must not
    claim the reading commands' default database."""
    import argparse

    from cmbagent_otel.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {name: next(a.help for a in sub._actions if "--db" in a.option_strings)
             for name, sub in subparsers.choices.items()}
    assert helps["replay"].startswith("replay only the files recorded for this database")
    assert "default: every file into the database it records" in helps["replay"]
    assert all(h.startswith("database URL (default:") for name, h in helps.items() if name != "replay")
