"""Thirty-third campaign (attacks): another writer's node ids against the names the pictures give nodes.

``dag --format dot`` named a node by its id, or by a digest of it when Graphviz would not read the id as
one name. Ids are unique once read (``dag.query._unique_ids``), but their DOT names were not: an id equal
to another node's digest name (``id_<16 hex>``), or two ids that escape alike (an ESC character and the
literal text ``\\x1b``), drew two nodes as one box with both nodes' edges. Mermaid kept its keys apart,
but by trying every suffix from ``__2`` up for each id: ids alike in their first 64 characters (the part
a key keeps) cost a scan of all the suffixes taken before each, quadratic in the number of nodes.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.cli import render
from cmbagent_otel.cli._common import plain
from cmbagent_otel.dag.query import DagReader

from .test_attack31_node_ids import _cli


def _store(provider: Any, db: Path, steps: int) -> None:
    with workflow("wf", mode="one-shot"), phase("control"):
        for n in range(1, steps + 1):
            with step(n, "goal", agent="engineer"):
                pass
    provider.store(f"sqlite:///{db}")


def _set_ids(db: Path, ids: dict[str, str]) -> None:
    """Another writer's short ids: ``{our short id: theirs}``."""
    with sqlite3.connect(db) as conn:
        for ours, theirs in ids.items():
            conn.execute("UPDATE dag_nodes SET meta = json_set(meta, '$.id', ?) WHERE json_extract(meta, '$.id') = ?",
                         (theirs, ours))


def _dot_nodes(source: str) -> list[str]:
    """The names of the node statements of a DOT source (not edges, not graph/node/edge defaults)."""
    names = []
    for line in source.splitlines():
        found = re.match(r'\t("(?:[^"\\]|\\.)*"|[^\s\[]+) \[', line)
        if found and "->" not in line and found.group(1) not in ("graph", "node", "edge"):
            names.append(found.group(1))
    return names


def test_every_node_is_its_own_box_in_dot(tmp_path: Path, provider: Any) -> None:
    """Fails on e0732e2: two names given twice (two boxes, each drawn over by another node)."""
    db = tmp_path / "names.db"
    _store(provider, db, 4)
    digest = "id_" + hashlib.blake2b(plain("a:b").encode(), digest_size=8).hexdigest()
    _set_ids(db, {"step_1": "a:b", "step_2": digest, "step_3": "a\x1b", "step_4": "a\\x1b"})
    dag = json.loads(_cli(db, "dag", "latest", "--format", "json"))
    count = len(dag["nodes"])
    assert len({n["id"] for n in dag["nodes"]}) == count
    names = _dot_nodes(_cli(db, "dag", "latest", "--format", "dot"))
    assert len(names) == count, names
    assert len(set(names)) == count, names


def _lines_run(function: Callable[..., Any], *args: Any) -> int:
    """How many lines of ``cli/render.py`` running ``function(*args)`` executed (a count, not a time)."""
    count = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def calls(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == render.__file__ else None

    sys.settrace(calls)
    try:
        function(*args)
    finally:
        sys.settrace(None)
    return count


def test_mermaid_keys_of_ids_alike_cost_linear_work(tmp_path: Path, provider: Any) -> None:
    """Fails on e0732e2: twice the nodes ran 3.2 times the lines (each key scanned the suffixes taken)."""
    lines = []
    for count in (300, 600):
        db = tmp_path / f"alike{count}.db"
        _store(provider, db, count)
        provider.memory.clear()
        # alike in the 64 characters a mermaid key keeps, then a number of the same width
        _set_ids(db, {f"step_{n}": "P" * 64 + f"{n:04d}" for n in range(1, count + 1)})
        with DagReader(f"sqlite:///{db}") as reader:
            dag = reader.dag(reader.run("latest"))
        keys = re.findall(r"^  (n_P+(?:__\d+)?)\[", render.mermaid(dag), re.M)
        assert len(keys) == len(set(keys)) == count
        lines.append(_lines_run(render.mermaid, dag))
    assert lines[1] < 2.3 * lines[0], lines
