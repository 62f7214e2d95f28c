"""Thirty-first campaign (attacks): another writer's node ids and parent links in what ``dag`` and
``events`` show.

Our writer derives a node's row id from its short id (one row per short id in a run), so the short
ids it stores are unique and its parent links form a tree. Another writer's rows need not be: two
nodes of a run with the same ``meta.id`` (or one's ``meta.id`` equal to another's row id) made the
``dag`` tree print a node under itself for ever (memory growing without bound), merged them into one
box in mermaid and DOT, and ``events --node`` picked one of them silently. Nodes whose parent links
form a cycle were left out of the tree. Now a repeated short id is shown as the node's row id, and
the tree lists a cycle's nodes at its top, marked.

The tree is printed by a child (the old code's never returned: the timeout is a hang guard only).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.cli import main
from cmbagent_otel.cli.render import TREE_DEPTH


def _tree(db: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "cmbagent_otel.cli", "--db", f"sqlite:///{db}", "dag", "latest"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def _cli(db: Path, *args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--db", f"sqlite:///{db}", *args]) == 0
    return out.getvalue()


@pytest.fixture
def stored(tmp_path: Path, provider: Any) -> Path:
    db = tmp_path / "nodes.db"
    with workflow("wf", mode="one-shot"), phase("control"):
        for n in (1, 2):
            with step(n, "goal", agent="engineer"), TracedSpan("chat m", "llm", {"gen_ai.agent.name": "engineer"}):
                pass
    provider.store(f"sqlite:///{db}")
    return db


def _rows(db: Path) -> dict[str, tuple[str, str | None]]:
    with sqlite3.connect(db) as conn:
        return {json.loads(meta)["id"]: (row_id, parent) for row_id, parent, meta
                in conn.execute("SELECT id, parent_node_id, meta FROM dag_nodes")}


def test_repeated_short_ids_are_shown_apart(stored: Path) -> None:
    rows = _rows(stored)
    control, step_1, step_2 = rows["control"][0], rows["step_1"][0], rows["step_2"][0]
    with sqlite3.connect(stored) as conn:  # another writer: every step named like its parent phase
        conn.execute("UPDATE dag_nodes SET meta = json_set(meta, '$.id', 'control') WHERE id IN (?, ?)",
                     (step_1, step_2))
    tree = _tree(stored)
    assert tree.count("(agent) completed agent=engineer") == 2, tree  # each step once, not for ever
    dag = json.loads(_cli(stored, "dag", "latest", "--format", "json"))
    ids = [n["id"] for n in dag["nodes"]]
    assert len(ids) == len(set(ids)), ids
    steps = [n for n in dag["nodes"] if n["type"] == "agent"]
    assert sorted(n["id"] for n in steps) == sorted([step_1, step_2])  # shown as their row ids
    assert {n["parent"] for n in steps} == {"control"}
    assert next(n for n in dag["nodes"] if n["db_id"] == control)["id"] == "control"
    mermaid = _cli(stored, "dag", "latest", "--format", "mermaid")
    assert mermaid.count("agent=engineer") == 2, mermaid  # two boxes, not one drawn twice under one key
    dot = _cli(stored, "dag", "latest", "--format", "dot")
    assert f'"{step_1}"' in dot or f"{step_1} [" in dot, dot
    events = json.loads(_cli(stored, "events", "latest", "--node", step_2, "--format", "json"))
    assert [e["node"] for e in events] == [step_2], events


def test_a_short_id_equal_to_another_nodes_row_id(stored: Path) -> None:
    rows = _rows(stored)
    step_1 = rows["step_1"][0]
    with sqlite3.connect(stored) as conn:  # step_2 claims step_1's row id as its short id
        conn.execute("UPDATE dag_nodes SET meta = json_remove(meta, '$.id') WHERE id = ?", (step_1,))
        conn.execute("UPDATE dag_nodes SET meta = json_set(meta, '$.id', ?) WHERE id = ?", (step_1, rows["step_2"][0]))
    dag = json.loads(_cli(stored, "dag", "latest", "--format", "json"))
    ids = [n["id"] for n in dag["nodes"]]
    assert len(ids) == len(set(ids)), ids
    assert _tree(stored).count("(agent) completed agent=engineer") == 2


def test_a_parent_cycle_is_shown_in_the_tree(stored: Path) -> None:
    rows = _rows(stored)
    with sqlite3.connect(stored) as conn:  # step_1 and step_2 each other's parent
        conn.execute("UPDATE dag_nodes SET parent_node_id = ? WHERE id = ?", (rows["step_2"][0], rows["step_1"][0]))
        conn.execute("UPDATE dag_nodes SET parent_node_id = ? WHERE id = ?", (rows["step_1"][0], rows["step_2"][0]))
    tree = _tree(stored)
    assert "step_1 (agent)" in tree and "step_2 (agent)" in tree, tree
    assert "(parent step_2: a cycle)" in tree and "(parent step_1: a cycle)" in tree, tree


def test_a_deep_chain_shows_every_node(stored: Path) -> None:
    """60 nodes each under the last (another writer's, or an ingest client's parent links): rich drew
    every level's guides on every line (a 6,000-deep chain took 30 s) and at 200 columns a node past
    level ~48 showed nothing of itself. Levels past ``TREE_DEPTH`` are listed at it, marked."""
    with sqlite3.connect(stored) as conn:
        conn.row_factory = sqlite3.Row
        row = dict(conn.execute("SELECT * FROM dag_nodes WHERE json_extract(meta, '$.id') = 'step_2'").fetchone())
        parent = row["id"]
        for i in range(60):
            node = {**row, "id": f"deep{i:04d}", "parent_node_id": parent,
                    "meta": json.dumps({**json.loads(row["meta"]), "id": f"deep_{i}"})}
            conn.execute(f"INSERT INTO dag_nodes ({', '.join(node)}) VALUES ({', '.join('?' * len(node))})",
                         list(node.values()))
            parent = node["id"]
    tree = _cli(stored, "dag", "latest")
    assert all(f"deep_{i} (agent)" in tree for i in range(60)), tree
    assert f"(depth {TREE_DEPTH + 1}) deep_{TREE_DEPTH - 2} " in tree and "(depth 62) deep_59 (agent)" in tree, tree
    assert max(len(text) for text in tree.splitlines()) < 4 * TREE_DEPTH + 100
