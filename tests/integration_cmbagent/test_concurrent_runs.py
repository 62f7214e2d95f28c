"""Two real cmbagent runs at once, in two threads of one process (thirteenth fault campaign).

Each thread calls ``cmbagent.planning_and_control`` against the scripted model while the other
runs (one ``instrument()``, one exporter, one database). Both runs complete, each run's nodes
and events are stored under its own run id (no event of one run on a node of the other, no node
under a parent of the other) and each run has exactly the rows a run alone has.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cmbagent_otel

from .conftest import cmbagent_dir

pytestmark = pytest.mark.skipif(cmbagent_dir() is None, reason="cmbagent is not installed")

APP = textwrap.dedent('''
    import os, sys, tempfile, threading
    from pathlib import Path
    import cmbagent_otel
    cmbagent_otel.instrument()
    sys.path.insert(0, sys.argv[1])
    import cmbagent  # noqa: F401
    from scripted_cmbagent import call_workflow, script_for
    from cmbagent_otel.testing import FakeOpenAIServer
    runs = int(sys.argv[2])
    script = script_for("planning_and_control")  # its answers depend on the request only
    errors = []
    started = threading.Barrier(runs)
    def run(i, wd):
        try:
            started.wait()
            call_workflow("planning_and_control", Path(wd) / f"run{i}")
        except BaseException as exc:
            errors.append(repr(exc))
    with FakeOpenAIServer(request_responder=script) as server:
        os.environ["OPENAI_BASE_URL"] = server.base_url
        with tempfile.TemporaryDirectory() as wd:
            threads = [threading.Thread(target=run, args=(i, wd)) for i in range(runs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    cmbagent_otel.uninstrument()
    print("DONE", errors, script.unexpected, flush=True)
''')


def _run(tmp_path: Path, runs: int) -> dict[str, object]:
    db = tmp_path / f"runs{runs}.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "SSL_CERT_FILE"}
    env.update({"CMBAGENT_OTEL_DATABASE_URL": f"sqlite:///{db}", "CMBAGENT_OTEL_SPILL_DIR": str(tmp_path / "spill"),
                "CMBAGENT_DISABLE_DISPLAY": "true", "SSL_CERT_DIR": str(tmp_path)})
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cmbagent_otel.__file__).parents[1]),
                                         *(str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                           if p)])
    proc = subprocess.run([sys.executable, "-c", APP, str(Path(__file__).parent), str(runs)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False)
    assert "DONE [] []" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "cmbagent_otel" not in proc.stderr, proc.stderr[-2000:]
    conn = sqlite3.connect(db)
    try:
        runs_stored = dict(conn.execute("SELECT id, status FROM workflow_runs"))
        per_run = {run: (sorted(conn.execute("SELECT node_type, status, count(*) FROM dag_nodes WHERE run_id = ? "
                                             "GROUP BY node_type, status", (run,))),
                         sorted(conn.execute("SELECT event_type, status, count(*) FROM execution_events "
                                             "WHERE run_id = ? GROUP BY event_type, status", (run,))))
                   for run in runs_stored}
        mixed = conn.execute("SELECT count(*) FROM execution_events e JOIN dag_nodes n ON e.node_id = n.id "
                             "WHERE e.run_id != n.run_id").fetchone()[0]
        mixed += conn.execute("SELECT count(*) FROM dag_nodes a JOIN dag_nodes p ON a.parent_node_id = p.id "
                              "WHERE a.run_id != p.run_id").fetchone()[0]
        orphans = conn.execute("SELECT count(*) FROM execution_events WHERE run_id NOT IN "
                               "(SELECT id FROM workflow_runs)").fetchone()[0]
    finally:
        conn.close()
    return {"runs": runs_stored, "per_run": per_run, "mixed": mixed, "orphans": orphans}


def test_two_runs_in_two_threads_are_stored_apart_as_one_run_alone(tmp_path: Path) -> None:
    alone = _run(tmp_path, 1)
    both = _run(tmp_path, 2)
    assert list(alone["runs"].values()) == ["completed"]  # type: ignore[attr-defined]
    assert list(both["runs"].values()) == ["completed", "completed"]  # type: ignore[attr-defined]
    assert both["mixed"] == 0 and both["orphans"] == 0
    (one,) = alone["per_run"].values()  # type: ignore[attr-defined]
    assert one[0] and one[1]  # nodes and events
    assert list(both["per_run"].values()) == [one, one]  # type: ignore[attr-defined]
