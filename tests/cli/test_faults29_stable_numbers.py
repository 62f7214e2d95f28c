"""Twenty-ninth fault campaign: the numbers the CLI's JSON derives are printed stable, not with float noise.

``runs --format json`` and ``dag --format json`` compute a run's ``duration_ms`` from its two timestamps
(``timedelta.total_seconds() * 1000``) and its cost as a float sum: a run of 1.000001 s printed
``1000.0009999999999`` and two costs of 0.1 and 0.2 USD ``0.30000000000000004``, a value that changes with
the order of the rows summed and that a script comparing outputs or a reader sees as noise. A duration is
now exact to the microsecond stored (``1000.001``), a sum of costs rounded to 12 significant digits (the
noise of a sum is in the 16th). Values stored as they are (an event's ``duration_ms``, its ``cost_usd``)
print as stored.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.cli import main


@pytest.fixture
def db(tmp_path: Path, provider: Any) -> Path:
    path = tmp_path / "cmbagent.db"
    with workflow("fit the spectrum", mode="one-shot"):
        with phase("planning"), step(1, "plan", agent="planner"):
            pass
        with phase("control"), step(1, "fit", agent="engineer"):
            pass
    provider.store(f"sqlite:///{path}")
    conn = sqlite3.connect(path)
    with conn:
        run_id, session_id = conn.execute("SELECT id, session_id FROM workflow_runs").fetchone()
        conn.execute("UPDATE workflow_runs SET started_at = ?, completed_at = ?",
                     ("2026-12-02 10:00:00.000000", "2026-12-02 10:00:01.000001"))
        # two costs whose float sum is 0.30000000000000004, in the cost table and in the roots' subtree totals
        conn.execute("DELETE FROM cost_records")
        for cost in (0.1, 0.2):
            conn.execute("INSERT INTO cost_records (run_id, session_id, model, prompt_tokens, completion_tokens, "
                         "total_tokens, cost_usd, timestamp) "
                         "VALUES (?, ?, 'gpt-4o', 1, 1, 2, ?, '2026-12-02 10:00:00')",
                         (run_id, session_id, cost))
        roots = [r[0] for r in conn.execute("SELECT id FROM dag_nodes WHERE parent_node_id IS NULL ORDER BY id")]
        assert len(roots) >= 2, roots
        for node, cost in zip(roots, (0.1, 0.2, *[0.0] * (len(roots) - 2)), strict=True):
            conn.execute("UPDATE dag_nodes SET meta = json_set(meta, '$.cost_usd', ?) WHERE id = ?", (cost, node))
    conn.close()
    return path


def _floats(value: Any) -> list[float]:
    if type(value) is float:
        return [value]
    if isinstance(value, dict):
        return [f for item in value.values() for f in _floats(item)]
    if isinstance(value, list):
        return [f for item in value for f in _floats(item)]
    return []


@pytest.mark.parametrize("command", [["runs"], ["dag", "latest"], ["events", "latest"]], ids=" ".join)
def test_json_outputs_print_derived_numbers_without_float_noise(db: Path, command: list[str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", f"sqlite:///{db}", *command, "--format", "json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    noisy = [f for f in _floats(data) if len(repr(abs(f)).replace(".", "").lstrip("0")) > 12]
    assert not noisy, noisy
    if command[0] == "runs":
        (run,) = data
        assert run["duration_ms"] == 1000.001 and run["cost_usd"] == 0.3, run
    elif command[0] == "dag":
        assert data["run"]["duration_ms"] == 1000.001 and data["run"]["cost_usd"] == 0.3, data["run"]
