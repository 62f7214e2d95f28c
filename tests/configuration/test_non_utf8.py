"""Bytes that are not UTF-8 in the environment or on the command line.

POSIX paths and arguments are bytes; Python keeps the ones that are not UTF-8 as lone
surrogates, which no SQLAlchemy URL can hold. A work dir or database URL like that in the
environment made ``instrument()`` raise in the application; given to the CLI (a run id, a
``--db`` path) it ended in a traceback. Now: warned once and the default used; one line
and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import cmbagent_otel
from cmbagent_otel import environment_variables as env
from cmbagent_otel import phase, step, workflow
from cmbagent_otel.dag.database import upgrade

NOT_UTF8 = os.fsdecode(b"run-\xff\xfe")  # what os.environ and sys.argv hold for those bytes


@pytest.mark.parametrize("name", [env.WORK_DIR, env.DATABASE_URL])
def test_instrument_falls_back_from_a_non_utf8_location(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    for other in (env.DATABASE_URL, env.CMBAGENT_DATABASE_URL, env.WORK_DIR, "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # the default work dir: ~/.cmbagent-otel
    monkeypatch.setenv(name, f"sqlite:///{tmp_path}/{NOT_UTF8}.db" if name == env.DATABASE_URL
                       else f"{tmp_path}/{NOT_UTF8}")
    with caplog.at_level(logging.WARNING, logger="cmbagent_otel"):
        cmbagent_otel.instrument(instrument_cmbagent=False, metrics=False)
    try:
        with workflow("non-utf8", mode="planning-control"), phase("control"), step(1, "fit"):
            pass
    finally:
        cmbagent_otel.uninstrument()  # flushes the DAG exporter
    assert f"ignoring {name}=" in caplog.text and "not valid UTF-8" in caplog.text
    with sqlite3.connect(tmp_path / ".cmbagent-otel" / "database" / "cmbagent.db") as conn:
        assert conn.execute("SELECT mode, status FROM workflow_runs").fetchall() == [("planning-control", "completed")]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cmbagent_otel.cli", *args], capture_output=True, text=True,
                          errors="replace", timeout=120, check=False)


@pytest.mark.parametrize("args", [
    ["dag", NOT_UTF8],
    ["--db", f"sqlite:///{{tmp}}/{NOT_UTF8}.db", "runs"],
    ["--db", f"sqlite:///{{tmp}}/{NOT_UTF8}.db", "db", "upgrade"],
    ["demo", "--work-dir", "/proc/no-such-folder", "--db", "sqlite:///{tmp}/demo.db"],
], ids=["run-id", "db-path-read", "db-path-upgrade", "work-dir-refused"])
def test_cli_says_it_in_one_line_with_exit_code_2(args: list[str], tmp_path: Path) -> None:
    db = tmp_path / "cmbagent.db"
    upgrade(f"sqlite:///{db}")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = cli("--db", f"sqlite:///{db}", *args) if args[0] != "--db" else cli(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmbagent-otel: error: "), done.stderr
