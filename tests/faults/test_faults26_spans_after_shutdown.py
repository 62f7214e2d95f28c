"""Spans ended after the DAG processor shut down wait in the spill store (twenty-sixth fault campaign).

``atexit`` runs its hooks last-registered first, and the tracer provider ``instrument()`` builds
registers its shutdown when it is made: an application hook registered *before* ``instrument()``
(a final report, a cleanup step recorded as a workflow) runs after the provider shut down. On main
c543977 the processor dropped every span such a hook ended, with one log line counting the first
("dropped 1 spans ... (1 so far)") and none for the rest; the run was never stored. Now such spans
take the full-queue path: the exporter keeps them in the spill store, and the next process (or
``cmbagent-otel replay``) writes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cmbagent_otel.exporters.dag import DagSpanExporter
from sqlalchemy import create_engine, text

APP = """
import atexit
import cmbagent_otel as c

def final_report():
    with c.workflow("final report", mode="planning-control"), c.phase("control"):
        with c.step(1, "summary", agent="engineer"):
            pass

atexit.register(final_report)  # before instrument(): runs after the provider's own exit hook
c.instrument(instrument_cmbagent=False)
with c.workflow("main", mode="planning-control"), c.phase("control"):
    with c.step(1, "work", agent="engineer"):
        pass
"""


def _runs(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT r.meta, (SELECT count(*) FROM dag_nodes n WHERE n.run_id = r.id) "
                                     "FROM workflow_runs r")).all()
    finally:
        engine.dispose()
    return {json.loads(meta)["name"]: nodes for meta, nodes in rows}


def test_faults26_a_workflow_recorded_by_an_earlier_atexit_hook_is_kept(tmp_path: Path) -> None:
    env = {**os.environ, "CMBAGENT_DEFAULT_WORK_DIR": str(tmp_path), "OTEL_TRACES_EXPORTER": "cmbagent_dag"}
    for name in ("CMBAGENT_OTEL_DATABASE_URL", "CMBAGENT_DATABASE_URL", "CMBAGENT_OTEL_SPILL_DIR"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", APP], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    url = f"sqlite:///{tmp_path}/database/cmbagent.db"
    assert set(_runs(url)) == {"main"}  # the hook ran after the shutdown: not written then
    later = DagSpanExporter(url, spill_dir=tmp_path / "spill")  # the next process
    assert later.force_flush() is True
    later.shutdown()
    assert later.stats()["replayed"] == 3, (later.stats(), done.stderr)
    runs = _runs(url)
    assert set(runs) == {"main", "final report"} and runs["final report"] == runs["main"], runs
