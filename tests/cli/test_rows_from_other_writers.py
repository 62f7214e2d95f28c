"""The CLI never prints a key stored by a writer that did not scrub it.

Rows our writer stores are scrubbed, but ``runs``, ``dag`` and ``events`` read the
cmbagent-compatible tables whoever wrote them: cmbagent's own tracking, or an older
cmbagent-otel that did not know a key's shape yet (the eighth campaign added GitLab, npm,
PyPI... shapes: rows stored before still hold such keys). Those rows were printed as stored,
in every format. Every string shown is now redacted and secret-named keys' text hidden; rows
without secrets print as before.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.cli import main
from cmbagent_otel.dag.query import DagReader

COMMANDS = [["runs"], ["runs", "--format", "json"], ["dag", "latest"], ["dag", "latest", "--format", "json"],
            ["dag", "latest", "--format", "mermaid"], ["dag", "latest", "--format", "dot"], ["events", "latest"],
            ["events", "latest", "--format", "json"]]


@pytest.fixture
def db(tmp_path: Path, provider: Any) -> Path:
    path = tmp_path / "cmbagent.db"
    tracer = provider.get_tracer("other.instrumentation")
    with workflow("fit the spectrum", mode="one-shot"), phase("control"), step(1, "fit", agent="engineer"), \
            tracer.start_as_current_span("child"):
        pass
    provider.store(f"sqlite:///{path}")
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_keys_in_rows_from_other_writers_are_not_printed(db: Path, command: list[str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    shaped = "npm_" + secrets.token_hex(18)  # a shape the writer of before did not know
    openai = "sk-proj-" + secrets.token_hex(20)
    hidden = "pw" + secrets.token_hex(8)  # no shape: only its key's name says it is a secret
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE workflow_runs SET task_description = ?, mode = ?", (f"deploy with {shaped}", "one-shot"))
        conn.execute("UPDATE dag_nodes SET meta = json_set(meta, '$.goal', ?, '$.password', ?)",
                     (f"publish with {shaped}", hidden))
        conn.execute("UPDATE execution_events SET error_message = ?, meta = json_set(meta, '$.span_name', ?)",
                     (f"401: {openai}", f"call {shaped}"))
    conn.close()
    assert main(["--db", f"sqlite:///{db}", *command]) == 0
    out, err = capsys.readouterr()
    assert shaped not in out + err and openai not in out + err and hidden not in out + err


def test_rows_without_secrets_print_as_stored(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{db}"
    with DagReader(url) as reader:
        run = reader.run("latest")
        expected = [json.dumps(reader.dag(run), indent=2, default=str),
                    json.dumps(reader.events(run, None, recursive=False), indent=2, default=str)]
    assert main(["--db", url, "dag", "latest", "--format", "json"]) == 0
    assert main(["--db", url, "events", "latest", "--format", "json"]) == 0
    out, _ = capsys.readouterr()
    assert out == "".join(text + "\n" for text in expected)
