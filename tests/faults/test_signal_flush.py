"""SIGTERM and SIGHUP no longer throw away what the run recorded.

Python's default for both signals ends the process at once, without ``atexit``: with
``instrument()`` exporting to the DAG database, a run stopped by ``docker stop``, a job
scheduler, ``timeout`` or a closed terminal left nothing at all in the database (the spans
queued for the DAG processor, the finished steps and their model calls, the live DAG's run
and node rows: up to a second of spans, lost with nothing saying so; twelfth fault
campaign). ``instrument()`` now flushes on those signals, when the application has no
handler of its own, and the process still ends by the signal. The spans of ours still open then
(the run, its phase, its current step) are ended failed, ``stopped by SIGTERM``: before, their
rows stayed ``executing``/``running`` for ever, and the cmbagent UI showed the run running.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode
from sqlalchemy import create_engine, text

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel._termination import STOPPED_BY_SIGNAL, end_open_spans
from cmbagent_otel.cli import main
from cmbagent_otel.dag.database import ensure_schema

from .conftest import hangup_as_default

CHILD = textwrap.dedent('''
    import signal, sys
    if sys.argv[1] == "own":
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
    import cmbagent_otel
    from cmbagent_otel import phase, step, workflow
    from cmbagent_otel._spans import TracedSpan
    cmbagent_otel.instrument(instrument_cmbagent=False, instrument_threading=False)
    if sys.argv[1] == "chained":
        # installed after ours, calling the handler it replaced (a callable one) first, then going on
        previous = signal.getsignal(signal.SIGTERM)
        def chained(signum, frame):
            if callable(previous):
                previous(signum, frame)
            print("CHAINED", signum, signal.getsignal(signal.SIGTERM) is chained, flush=True)
        signal.signal(signal.SIGTERM, chained)
    # what is really installed (the application sees the default where ours is: _termination._virtual_default)
    handler = cmbagent_otel._termination._real["getsignal"](signal.SIGTERM)
    print("HANDLER", "default" if handler is signal.SIG_DFL else getattr(handler, "__name__", "?"), flush=True)
    with workflow("stopped run", mode="planning-control"), phase("control"):
        for n in (1, 2):
            with step(n, f"step {n}"):
                for c in range(3):
                    with TracedSpan(f"chat m{c}", "llm", {"gen_ai.request.model": "m"}):
                        pass
                if n == 2:
                    print("READY", flush=True)
                    sys.stdin.readline()
    print("WENT ON", flush=True)
''')


def _run(tmp_path: Path, signum: int, mode: str = "", url: str = "", out: list[str] | None = None,
         **env: str) -> tuple[int, str, Path]:
    db = tmp_path / "cmbagent.db"
    child_env = {**os.environ, "CMBAGENT_OTEL_DATABASE_URL": url or f"sqlite:///{db}",
                 "CMBAGENT_OTEL_SPILL_DIR": str(tmp_path / "spill"), "OTEL_TRACES_EXPORTER": "cmbagent_dag", **env}
    child_env.pop("OTEL_SDK_DISABLED", None)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env, preexec_fn=hangup_as_default)
    assert proc.stdout is not None
    handler = proc.stdout.readline().split()[-1]
    assert proc.stdout.readline().strip() == "READY", proc.communicate(timeout=60)
    proc.send_signal(signum)
    rest, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    if out is not None:
        out.extend(rest.splitlines())
    return proc.returncode, handler, db


def _reasons(db: Path) -> tuple[list[str | None], dict[str, str | None]]:
    """The failed run's and nodes' reasons (``meta.error``)."""
    conn = sqlite3.connect(db)
    try:
        runs = [r[0] for r in conn.execute("SELECT json_extract(meta, '$.error') FROM workflow_runs")]
        nodes = {r[0]: r[1] for r in conn.execute("SELECT json_extract(meta, '$.id'), json_extract(meta, '$.error') "
                                                  "FROM dag_nodes WHERE status = 'failed'")}
        return runs, nodes
    finally:
        conn.close()


def _rows(db: Path) -> tuple[list[str], dict[str, str], int]:
    if not db.exists():
        return [], {}, 0
    conn = sqlite3.connect(db)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "workflow_runs" not in tables:
            return [], {}, 0
        runs = [r[0] for r in conn.execute("SELECT status FROM workflow_runs")]
        nodes = {r[0]: r[1] for r in conn.execute("SELECT json_extract(meta, '$.id'), status FROM dag_nodes")}
        events = conn.execute("SELECT count(*) FROM execution_events").fetchone()[0]
        return runs, nodes, events
    finally:
        conn.close()


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_that_ends_the_process_exports_what_was_recorded_first(tmp_path: Path, name: str) -> None:
    signum = getattr(signal, name)
    code, handler, db = _run(tmp_path, signum)
    assert handler == "_on_signal"
    assert code == -signum  # still ended by the signal, as without us
    runs, nodes, events = _rows(db)
    assert runs == ["failed"]  # stopped: not the live DAG's `executing` row for ever
    assert nodes.get("step_1") == "completed"
    assert nodes.get("step_2") == "failed" and nodes.get("control") == "failed"  # were `running` for ever
    assert events == 6  # the six model calls that ended before the signal
    reasons = f"stopped by {name}"
    # the failed run's terminator names the run's reason too (session 29)
    assert _reasons(db) == ([reasons], {"step_2": reasons, "control": reasons, "terminator": reasons})


def test_the_applications_own_handler_is_left_alone(tmp_path: Path) -> None:
    code, handler, db = _run(tmp_path, signal.SIGTERM, "own")
    assert handler == "<lambda>" and code == 3  # its handler ran: sys.exit(3), and atexit flushed
    runs, nodes, _ = _rows(db)
    assert runs == ["failed"] and nodes.get("step_2") == "failed"


def test_an_application_handler_that_calls_ours_goes_on_as_without_us(tmp_path: Path) -> None:
    """An application's handler installed after ours that calls the handler it replaced (``if
    callable(previous): previous(signum, frame)``, a common idiom) found ours there instead of the
    default: ours put the default in place of the APPLICATION's handler, ended the run failed and
    killed the process inside that call, so the rest of the application's handler never ran. Without
    us ``previous`` is the default (not callable) and the process goes on; called, ours only flushes."""
    out: list[str] = []
    code, handler, db = _run(tmp_path, signal.SIGTERM, "chained", out=out)
    assert handler == "chained"
    assert out == ["CHAINED 15 True", "WENT ON"] and code == 0  # its handler ran on, still installed
    runs, nodes, _ = _rows(db)
    assert runs == ["completed"] and nodes.get("step_2") == "completed"  # not stopped: the run went on


def test_the_setting_turns_it_off(tmp_path: Path) -> None:
    code, handler, db = _run(tmp_path, signal.SIGTERM, CMBAGENT_OTEL_FLUSH_ON_SIGNAL="false")
    assert handler == "default" and code == -signal.SIGTERM
    assert _rows(db) == ([], {}, 0)  # what every SIGTERM did before


def test_uninstrument_puts_the_default_back() -> None:
    script = textwrap.dedent('''
        import signal, cmbagent_otel
        from cmbagent_otel import _termination
        getsignal = signal.getsignal
        cmbagent_otel.instrument(exporters="none", instrument_cmbagent=False, instrument_threading=False)
        assert getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # as the application sees it (ours)
        cmbagent_otel.uninstrument()
        assert getsignal(signal.SIGTERM) is signal.SIG_DFL and getsignal(signal.SIGHUP) is signal.SIG_DFL
        assert signal.getsignal is getsignal and signal.signal is _termination._real["signal"]  # signal's own back
        print("OK")
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         preexec_fn=hangup_as_default)
    assert out.stdout.strip() == "OK", out.stderr


@pytest.mark.postgres
def test_a_locked_postgres_keeps_the_deadline_and_the_spill_store_the_spans(tmp_path: Path, pg_url: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_schema(pg_url)
    locker = create_engine(pg_url)
    conn = locker.connect()
    transaction = conn.begin()
    conn.execute(text("LOCK TABLE workflow_runs IN ACCESS EXCLUSIVE MODE"))  # every write waits for it
    try:
        code, _, _ = _run(tmp_path, signal.SIGTERM, url=pg_url, CMBAGENT_OTEL_EXPORT_TIMEOUT="2")
    finally:
        transaction.rollback()
        conn.close()
    assert code == -signal.SIGTERM  # within the export deadline (communicate() bounds the wait)
    assert list((tmp_path / "spill").glob("*.otlp"))
    monkeypatch.setenv("CMBAGENT_OTEL_SPILL_DIR", str(tmp_path / "spill"))
    assert main(["replay"]) == 0  # the next process (here: the CLI) stores them
    with locker.connect() as check:
        assert [r[0] for r in check.execute(text("SELECT status FROM workflow_runs"))] == ["failed"]
        assert check.execute(text("SELECT count(*) FROM execution_events")).scalar() == 6
    locker.dispose()


def test_the_open_run_and_node_spans_are_ended_failed_and_nothing_else(capture: Any) -> None:
    with workflow("w"), phase("control"):
        with step(1, "done"):
            pass
        with step(2, "judged") as judged:
            judged.fail("step judged unsuccessful")
            with TracedSpan("chat m", "llm", {"gen_ai.request.model": "m"}):  # what the signal interrupts
                assert end_open_spans("stopped by SIGTERM") == 3  # what the handler does first
                ended = {span.name: span for span in capture.spans}
    assert set(ended) == {"step 1", "step 2", "phase control", "workflow w"}  # the model call is left open
    assert ended["step 1"].status.status_code is StatusCode.UNSET  # ended before: untouched
    assert ended["step 2"].status.description == "step judged unsuccessful"  # a recorded failure keeps its reason
    for name in ("phase control", "workflow w"):
        assert ended[name].status.status_code is StatusCode.ERROR
        assert ended[name].status.description == "stopped by SIGTERM"
        assert ended[name].attributes["error.type"] == STOPPED_BY_SIGNAL


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
def test_a_forked_child_ends_none_of_its_parents_spans(capture: Any) -> None:
    with workflow("w"), phase("control"), step(1, "s"):
        pid = os.fork()
        if pid == 0:  # the child (e.g. a multiprocessing worker stopped by terminate(), a SIGTERM)
            os._exit(0 if end_open_spans("stopped by SIGTERM") == 0 else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert capture.one("step 1").status.status_code is StatusCode.UNSET
