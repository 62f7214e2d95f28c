"""NaN and Infinity in another writer's rows: the CLI prints them, and its JSON stays JSON.

Found by the fifteenth campaign (the tenth filled columns with wrong-typed values, not the numbers
inside a row's JSON ``meta``). ``json.loads`` reads ``NaN`` and ``Infinity`` in a ``meta`` column,
and SQLite keeps ``1e999`` in a REAL column as infinity: an event whose ``meta`` held a ``tokens`` of
``NaN`` or ``Infinity`` made ``dag`` and ``events`` end in a traceback (``int()`` of it), and
``runs --format json`` printed ``"cost_usd": Infinity``, which no strict JSON reader (``jq``,
JavaScript's ``JSON.parse``) takes. Such a number now counts as no tokens and no cost, and the
JSON formats print ``null`` for it. Run as an operator runs it: the CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = [["runs"], ["runs", "--format", "json"], ["dag", "latest"], ["dag", "latest", "--format", "json"],
            ["dag", "latest", "--format", "mermaid"], ["dag", "latest", "--format", "dot"], ["events", "latest"],
            ["events", "latest", "--format", "json"]]


def _cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    code = "from cmbagent_otel.cli import main; raise SystemExit(main())"
    return subprocess.run([sys.executable, "-c", code, "--db", f"sqlite:///{db}", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def _strict(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("non-finite") / "cmbagent.db"
    demo = _cli(path, "demo")
    assert demo.returncode == 0, demo.stderr
    conn = sqlite3.connect(path)
    with conn:
        assert conn.execute("SELECT COUNT(*) FROM cost_records").fetchone()[0] > 0
        conn.execute("UPDATE cost_records SET cost_usd = 1e999 WHERE id = (SELECT MIN(id) FROM cost_records)")
        events = [r[0] for r in conn.execute("SELECT id FROM execution_events ORDER BY id LIMIT 3")]
        for event, meta in zip(events, ('{"tokens": NaN, "cost_usd": Infinity}',
                                        '{"tokens": Infinity, "cost_usd": NaN}',
                                        '{"tokens": {"total": -Infinity}, "cost_usd": -Infinity}'), strict=True):
            conn.execute("UPDATE execution_events SET meta = ? WHERE id = ?", (meta, event))
        node, meta = conn.execute("SELECT id, meta FROM dag_nodes ORDER BY id LIMIT 1").fetchone()
        conn.execute("UPDATE dag_nodes SET meta = ? WHERE id = ?",
                     (json.dumps({**json.loads(meta), "cost_usd": float("nan"), "tokens": float("inf")}), node))
    conn.close()
    return path


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_non_finite_numbers_are_shown_and_json_stays_json(db: Path, command: list[str]) -> None:
    done = _cli(db, *command)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-800:]
    assert done.stdout.strip()
    if "json" in command:
        _strict(done.stdout)
