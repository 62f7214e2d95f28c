"""``os.fork()`` while a step is open (seventeenth fault campaign).

The child holds copies of the run, phase and step spans open in the parent. Leaving the blocks it
was forked in ended those copies, and the child's exporter wrote them, with the parent's ids, over
the parent's rows: a failure in the child after the parent had stored its run showed the parent's
step and phase ``failed`` in a ``completed`` run. Now the spans open at the fork are the parent's
alone: the child ends none of them, and the spans the child opens itself are stored under them.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

APP = """
import os, sys
os.environ["CMBAGENT_OTEL_DATABASE_URL"] = "sqlite:///" + sys.argv[1]
import cmbagent_otel
from cmbagent_otel import workflow, phase, step
cmbagent_otel.instrument(exporters="cmbagent_dag", instrument_cmbagent=False)
go_r, go_w = os.pipe()
pid = -1
try:
    with workflow("forked"), phase("control"):
        with step(1, "forks"):
            pid = os.fork()
            if pid == 0:
                os.read(go_r, 1)  # the parent has stored its whole run
        if pid == 0:
            with step(3, "the child's own"):
                pass
            raise RuntimeError("the child's own failure, after its step")
        with step(2, "the parent's"):
            pass
except RuntimeError:
    pass
finally:
    if pid == 0:
        cmbagent_otel.uninstrument()  # stores what the child recorded
        os._exit(0)
cmbagent_otel.uninstrument()
os.write(go_w, b"x")
_, status = os.waitpid(pid, 0)
assert status == 0, status
"""


def test_a_child_forked_in_a_step_leaves_the_parents_rows_alone(tmp_path: Path) -> None:
    db = tmp_path / "dag.sqlite"
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(APP))
    env = {k: v for k, v in os.environ.items() if k != "CMBAGENT_OTEL_DATABASE_URL"}
    proc = subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=120,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    con = sqlite3.connect(db)
    try:
        runs = con.execute("SELECT status FROM workflow_runs").fetchall()
        nodes = dict(con.execute("SELECT json_extract(meta, '$.id'), status FROM dag_nodes").fetchall())
        parents = dict(con.execute(
            "SELECT json_extract(n.meta, '$.id'), json_extract(p.meta, '$.id') FROM dag_nodes n "
            "JOIN dag_nodes p ON p.id = n.parent_node_id").fetchall())
    finally:
        con.close()
    assert runs == [("completed",)]
    assert {short: nodes[short] for short in ("control", "step_1", "step_2")} == {
        "control": "completed", "step_1": "completed", "step_2": "completed"}, nodes
    assert nodes["step_3"] == "completed" and parents["step_3"] == "control"  # the child's own step, kept
