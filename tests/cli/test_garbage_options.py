"""Garbage option values get one clear line and exit 2, never a traceback (fourth fault campaign).

Found: ``runs --limit 99999999999999999999`` reached the SQLite driver, which raised
``OverflowError`` (a 40-line traceback, exit 1); ``ingest --workers``/``--max-bytes``/
``--max-inflight-bytes`` took any integer (zero and negatives were refused later, in a
message naming six settings); an error of the database driver was printed on several lines
(libpq's ``connection refused`` ends in ``\\n\\tIs the server running...``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import cmbagent_otel as c
from cmbagent_otel.cli import main


@pytest.fixture
def stored(db_url: str, provider: Any) -> str:
    with c.workflow("garbage", mode="planning-control"), c.phase("control"), c.step(1, "go", agent="engineer"):
        pass
    provider.store(db_url)
    return db_url


@pytest.mark.parametrize("limit", ["99999999999999999999", str(2**63), str(2**63 - 1)])
def test_a_limit_past_what_the_database_takes_means_all(stored: str, limit: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", stored, "runs", "--limit", limit, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert [run["mode"] for run in json.loads(out)] == ["planning-control"] and not err


@pytest.mark.parametrize("option", ["--workers", "--max-bytes", "--max-inflight-bytes"])
@pytest.mark.parametrize("value", ["0", "-3", "abc", "1.5"])
def test_ingest_counts_are_checked_by_the_parser(option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["ingest", "--port", "off", "--grpc-port", "0", option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err.splitlines()[-1] and "Traceback" not in err


def test_a_driver_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # port 1 on loopback: nothing listens there, libpq answers on two lines
    assert main(["--db", "postgresql+psycopg://someone:pw@127.0.0.1:1/nothing", "runs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmbagent-otel: error: cannot open database") and err.count("\n") == 1
    assert "\t" not in err and "pw" not in err
