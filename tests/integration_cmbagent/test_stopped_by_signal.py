"""The real cmbagent, stopped by SIGTERM mid-run, keeps what it recorded.

A ``planning_and_control`` run exported by ``instrument()`` to the DAG database is sent
SIGTERM while it waits for its 15th model call (as ``docker stop`` or a scheduler would).
Python's default ends the process without ``atexit``: what the DAG processor had queued was
lost (on the code before, 4 of the 39 model-call spans and the code execution that ended in the
last second before the signal). ``instrument()`` now flushes on the signal and the process
still ends by it (twelfth fault campaign; ``tests/faults/test_signal_flush.py``): every span the
run ended is stored. The spans still open (the run, the control phase, its step, the agent turn
waiting for the answer) are ended failed, ``stopped by SIGTERM``: before, the run stayed
``executing`` and those nodes ``running`` for ever.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

import cmbagent_otel
from tests.faults.conftest import stored_spans

from .conftest import cmbagent_dir

pytestmark = pytest.mark.skipif(cmbagent_dir() is None, reason="cmbagent is not installed")

APP = textwrap.dedent('''
    import os, sys, tempfile, threading
    from pathlib import Path
    import cmbagent_otel
    provider = cmbagent_otel.instrument()

    class Record:  # every span that ends, in the kernel at once (os.write): what the database must hold
        fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        def on_start(self, span, parent_context=None): pass
        def on_end(self, span):
            os.write(self.fd, f"{span.context.trace_id:032x} {span.context.span_id:016x}\\n".encode())
        def shutdown(self): pass
        def force_flush(self, timeout_millis=30000): return True

    provider.add_span_processor(Record())
    sys.path.insert(0, sys.argv[1])
    import cmbagent  # noqa: F401
    from scripted_cmbagent import run_until_signalled
    with tempfile.TemporaryDirectory() as wd:
        run_until_signalled("planning_and_control", Path(wd))
''')


def app_env(tmp_path: Path, db: Path, **extra: str) -> dict[str, str]:
    """The environment of an app run in a subprocess: this checkout first on its path, no ``OTEL_*`` of the
    test's own, the DAG database ``db``, a spill folder under ``tmp_path``, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "SSL_CERT_FILE"}
    env.update({"CMBAGENT_OTEL_DATABASE_URL": f"sqlite:///{db}", "CMBAGENT_OTEL_SPILL_DIR": str(tmp_path / "spill"),
                "CMBAGENT_DISABLE_DISPLAY": "true", "SSL_CERT_DIR": str(tmp_path), **extra})
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cmbagent_otel.__file__).parents[1]),
                                         *(str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                           if p)])
    return env


def stop_when_waiting(argv: list[str], env: dict[str, str], cwd: Path) -> None:
    """Start the app ``argv`` (one ending in ``run_until_signalled``), send it SIGTERM once it says
    ``WAITING`` and check that it ended by the signal."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    assert proc.stdout is not None
    line = ""
    for line in proc.stdout:  # cmbagent prints its own lines first
        if line.strip() in ("WAITING", "FINISHED"):
            break
    if line.strip() != "WAITING":
        proc.kill()
        pytest.fail(f"the run did not reach its 15th model call: {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGTERM, err[-2000:]


def test_sigterm_mid_run_stores_what_ended_before_it(tmp_path: Path) -> None:
    db = tmp_path / "cmbagent.db"
    record = tmp_path / "ended.txt"
    stop_when_waiting([sys.executable, "-c", APP, str(Path(__file__).parent), str(record)], app_env(tmp_path, db),
                      tmp_path)
    assert db.exists(), "nothing was written"
    conn = sqlite3.connect(db)
    try:
        runs = [tuple(r) for r in conn.execute("SELECT status, json_extract(meta, '$.error') FROM workflow_runs")]
        nodes = dict(conn.execute("SELECT node_type, status FROM dag_nodes WHERE node_type IN ('planning', 'control')"))
        statuses = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT json_extract(meta, '$.id'), status, json_extract(meta, '$.error') FROM dag_nodes")}
        calls = conn.execute("SELECT count(*) FROM execution_events WHERE event_type = 'agent_call' "
                             "AND status = 'completed'").fetchone()[0]
    finally:
        conn.close()
    assert runs == [("failed", "stopped by SIGTERM")]  # the stopped run: no longer `executing` for ever
    assert nodes == {"planning": "completed", "control": "failed"}
    assert "running" not in {status for status, _ in statuses.values()}, statuses
    stopped = {node for node, (_, error) in statuses.items() if error == "stopped by SIGTERM"}
    assert {"control", "step_1"} < stopped, statuses  # and the agent turn open in the step
    assert calls >= 14  # every model call answered before the signal, and the agents' calls around them
    ended = Counter(tuple(line.split()) for line in record.read_text().splitlines())
    missing = ended - stored_spans(f"sqlite:///{db}")
    assert not missing, f"{sum(missing.values())} of {sum(ended.values())} ended spans are not stored"
