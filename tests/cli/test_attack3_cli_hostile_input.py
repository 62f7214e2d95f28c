"""Hostile configuration given to the CLI: one bounded line on stderr, exit 2, or the default used.

Found by the twenty-first campaign. ``cmbagent-otel ingest --host`` (or ``CMBAGENT_OTEL_INGEST_HOST``)
holding bytes that are not UTF-8 ended in a traceback (``TypeError: encoding of hostname failed``);
a bearer token holding such bytes was refused with the codec's message, which quoted the token's
character and its position; and an error quoting what it was given (a 100 KB ``--db`` path or
``--host``) printed it whole on its "one line". Run as an operator runs it: the CLI in a
subprocess, arguments and environment given as bytes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

CODE = "from cmbagent_otel.cli import main; raise SystemExit(main())"


def _environ(tmp_path: Path, **variables: bytes) -> dict[bytes, bytes]:
    environ = {k: v for k, v in os.environb.items() if not k.startswith((b"OTEL_", b"CMBAGENT_OTEL_"))}
    environ[b"CMBAGENT_DEFAULT_WORK_DIR"] = os.fsencode(tmp_path / "work")
    environ.update({name.encode(): value for name, value in variables.items()})
    return environ


def _cli(tmp_path: Path, *args: bytes, **variables: bytes) -> subprocess.CompletedProcess[bytes]:
    db = os.fsencode(f"sqlite:///{tmp_path / 'cmbagent.db'}")
    return subprocess.run([sys.executable.encode(), b"-c", CODE.encode(), b"--db", db, *args],
                          capture_output=True, timeout=120, env=_environ(tmp_path, **variables))


def test_attack3_a_host_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    done = _cli(tmp_path, b"ingest", b"--host", b"loc\xffal", b"--port", b"0", b"--grpc-port", b"off")
    assert done.returncode == 2, done.stderr[-2000:]
    assert b"Traceback" not in done.stderr
    assert done.stderr.strip().count(b"\n") == 0 and done.stderr.startswith(b"cmbagent-otel: error: "), done.stderr


def test_attack3_a_huge_host_is_a_bounded_line(tmp_path: Path) -> None:
    done = _cli(tmp_path, b"ingest", b"--host", b"h" * 100_000, b"--port", b"0", b"--grpc-port", b"off")
    assert done.returncode == 2, done.stderr[-2000:]
    assert b"Traceback" not in done.stderr and len(done.stderr) < 1200, len(done.stderr)


def test_attack3_a_huge_db_path_is_a_bounded_line(tmp_path: Path) -> None:
    code = [sys.executable, "-c", CODE, "--db", "sqlite:///" + "/p" * 50_000 + "/x.db", "runs"]
    done = subprocess.run(code, capture_output=True, timeout=120, env=_environ(tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert b"Traceback" not in done.stderr and len(done.stderr) < 1200, len(done.stderr)


def test_attack3_a_token_that_is_not_utf8_is_refused_without_quoting_it(tmp_path: Path) -> None:
    done = _cli(tmp_path, b"ingest", b"--port", b"0", b"--grpc-port", b"off",
                CMBAGENT_OTEL_INGEST_TOKEN=b"tok\xfeen-secret")
    assert done.returncode == 2, done.stderr[-2000:]  # refused, not served without a token
    assert done.stderr.strip() == b"cmbagent-otel: error: the bearer token is not valid UTF-8", done.stderr
    assert b"udcfe" not in done.stderr and b"position" not in done.stderr


def test_attack3_an_ingest_host_variable_that_is_not_utf8_falls_back_to_loopback(tmp_path: Path) -> None:
    db = os.fsencode(f"sqlite:///{tmp_path / 'cmbagent.db'}")
    process = subprocess.Popen([sys.executable.encode(), b"-c", CODE.encode(), b"--db", db, b"ingest", b"--port", b"0",
                                b"--grpc-port", b"off"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=_environ(tmp_path, CMBAGENT_OTEL_INGEST_HOST=b"loc\xffal"))
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # "listening on ..." once bound, or nothing when it ended
        assert first.startswith(b"cmbagent-otel ingest: listening on http://127.0.0.1:"), first
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=60)
    # (its exit code is not checked: the line is printed just before the CLI's signal handlers are set)
    assert b"Traceback" not in err
    assert b"ignoring CMBAGENT_OTEL_INGEST_HOST" in err and b"not valid UTF-8" in err
