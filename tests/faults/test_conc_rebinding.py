"""A run open while another thread re-instruments with the application's own provider
(twenty-second fault campaign; left by the seventeenth).

``uninstrument()`` while a run is open keeps that run's processors until its spans have ended; a later
``instrument(tracer_provider=X)`` (the same thread, or another one serving the next request while the
run goes on) made the run's later phase, step and redo blocks follow the newest binding to X: the DAG
of the kept run lost them (a ``completed`` run without its later steps) and X got them as a fragment
whose parents it never saw. The blocks of a run now start their spans with the tracer its workflow
block started it with; runs opened after the switch go to X whole.

Each scenario runs in a child process (``instrument()`` sets the global provider once per process),
with real AG2 agents on the offline model client and the DAG exporter into a real SQLite file.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from .app_script import run_script

PRELUDE = """
import os, sys, threading
os.environ["CMBAGENT_OTEL_DATABASE_URL"] = "sqlite:///" + sys.argv[1]
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import cmbagent_otel
from cmbagent_otel import workflow, phase, step, redo
from cmbagent_otel.testing import offline_agent

memory = InMemorySpanExporter()
own = TracerProvider()  # the application's own provider, instrumented into later
own.add_span_processor(SimpleSpanProcessor(memory))
cmbagent_otel.instrument(exporters="cmbagent_dag", instrument_cmbagent=False)

def chat(tag):
    left = offline_agent("left_" + tag, ["hello", "TERMINATE"])
    right = offline_agent("right_" + tag, ["reply", "TERMINATE"])
    left.initiate_chat(right, message="start", max_turns=2, silent=True)

def blocks_in_own():
    return sorted(s.name for s in memory.get_finished_spans()
                  if s.name.split()[0] in ("workflow", "phase", "step", "redo"))
"""


def _run(tmp_path: Path, body: str) -> tuple[str, Path]:
    proc, db = run_script(tmp_path, PRELUDE, body)
    assert "WARNING" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout, db


def _rows(db: Path) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return [(status, sorted((t, s, json.loads(m or "{}").get("label")) for t, s, m in con.execute(
                    "SELECT node_type, status, meta FROM dag_nodes WHERE run_id = ? AND node_type != 'sub_agent'",
                    (run_id,)).fetchall()))
                for run_id, status in con.execute(
                    "SELECT id, status FROM workflow_runs WHERE NOT is_branch ORDER BY started_at")]  # redo: branch run
    finally:
        con.close()


def _printed(stdout: str, label: str) -> Any:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith(label + " "))[len(label) + 1:])


def test_instrument_with_another_provider_inside_a_kept_run(tmp_path: Path) -> None:
    stdout, db = _run(tmp_path, """
        import json
        with workflow("kept", max_redos=2), phase("control"):
            with step(1, "before"):
                chat("1")
                cmbagent_otel.uninstrument()
                cmbagent_otel.instrument(tracer_provider=own, instrument_cmbagent=False)
            with step(2, "after"):
                with redo(2, 1, "again"):
                    pass
        with workflow("next"), phase("control"), step(1, "in own"):
            chat("next")
        print("OWN " + json.dumps(blocks_in_own()))
        cmbagent_otel.uninstrument()
    """)
    assert _printed(stdout, "OWN") == ["phase control", "step 1", "workflow next"]  # the next run, whole
    assert _rows(db) == [("completed", [
        ("agent", "completed", "Step 1: before"), ("agent", "completed", "Step 2: after"),
        ("branch_point", "completed", "Branch point at step_2"), ("control", "completed", "control"),
        ("planning", "completed", "Initialize"), ("redo", "completed", "Redo 1 of step 2"),
        ("terminator", "completed", "Completion")])]


def test_another_thread_re_instruments_while_a_run_goes_on(tmp_path: Path) -> None:
    stdout, db = _run(tmp_path, """
        import json
        go, switched, second_done = threading.Event(), threading.Event(), threading.Event()

        def other_thread():  # serves the next request: re-instruments into the application's provider
            go.wait()
            cmbagent_otel.uninstrument()
            cmbagent_otel.instrument(tracer_provider=own, instrument_cmbagent=False)
            switched.set()
            with workflow("second"), phase("control"), step(1, "in own"):
                chat("second")
            second_done.set()

        worker = threading.Thread(target=other_thread)  # started outside the run: not a part of it
        worker.start()
        with workflow("first"), phase("control"):
            with step(1, "before"):
                chat("first")
                go.set()
                switched.wait()
            with step(2, "after the switch"):
                second_done.wait()
        worker.join()
        print("OWN " + json.dumps(blocks_in_own()))
        cmbagent_otel.uninstrument()
    """)
    assert _printed(stdout, "OWN") == ["phase control", "step 1", "workflow second"]
    assert _rows(db) == [("completed", [
        ("agent", "completed", "Step 1: before"), ("agent", "completed", "Step 2: after the switch"),
        ("control", "completed", "control"), ("planning", "completed", "Initialize"),
        ("terminator", "completed", "Completion")])]
