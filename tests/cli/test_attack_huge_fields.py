"""Eighteenth campaign (attacks): another writer's megabyte-long fields in what the CLI prints.

Our writer bounds names (``agent`` is ``String(100)`` in cmbagent's tables, names are cut at 256
characters), but SQLite keeps whatever another writer stores. The table, tree and picture views
printed every field whole: a 2 MB agent name on each event of a demo run made ``events`` print
569 MB in 7 minutes with 3.5 GB of memory (rich wraps the cell into its column), and every such
string was redacted whole first. A field is now shown cut to ``FIELD_CHARS`` (256) characters,
only a 64 KiB prefix of it is redacted, and a long node id is written once (DOT names it by a
digest, mermaid's key takes its first 64 characters). JSON keeps every value whole.

The bound is checked by what is printed (its size), not by time.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.cli import main

HUGE = "ab c:" * 200_000  # 1 MB


@pytest.fixture
def huge_db(tmp_path: Path, provider: Any) -> str:
    db = tmp_path / "huge.db"
    with workflow("wf", mode="one-shot"), phase("control"), step(1, "goal", agent="engineer"), \
            TracedSpan("chat m", "llm", {"gen_ai.agent.name": "engineer"}):
        pass
    provider.store(f"sqlite:///{db}")
    with sqlite3.connect(db) as conn:  # another writer: no bound on what it stores
        conn.execute("UPDATE execution_events SET agent_name = ?, event_subtype = ?", (HUGE, HUGE))
        conn.execute("UPDATE dag_nodes SET agent = ?", (HUGE,))
        conn.execute("UPDATE workflow_runs SET mode = ?", (HUGE,))
        conn.execute("UPDATE dag_nodes SET meta = json_set(meta, '$.id', ?) WHERE node_type = 'step'", ("s" + HUGE,))
    return f"sqlite:///{db}"


@pytest.mark.parametrize("command", [["runs"], ["dag", "latest"], ["dag", "latest", "--format", "dot"],
                                     ["dag", "latest", "--format", "mermaid"], ["events", "latest"]],
                         ids=lambda c: " ".join(c))
def test_a_huge_field_is_shown_cut(huge_db: str, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", huge_db, *command]) == 0
    out = capsys.readouterr().out
    assert len(out) < 60_000, len(out)  # a few fields of 256 characters, not megabytes
    assert "ab c:ab c:" in out and ("…" in out or "#8230;" in out)  # mermaid escapes the ellipsis


def test_json_keeps_the_whole_field(huge_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", huge_db, "events", "latest", "--format", "json"]) == 0
    events = json.loads(capsys.readouterr().out)
    assert any(e["agent"] == HUGE for e in events)
