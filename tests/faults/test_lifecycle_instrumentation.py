"""Instrumentation stopped, or the process ending, while a run is open (seventeenth fault campaign).

Before, ``uninstrument()`` called inside a run shut its span processors down at once: the run's
blocks ended after that, their spans were dropped, and the live DAG's rows stayed ``executing`` /
``running`` for ever. A run still open when the interpreter exits (a daemon thread inside a step, a
block entered by hand and never left) left the same rows. Now the processors of a run left open
by ``uninstrument()`` are kept until its spans have ended (the run is stored whole, then they are
flushed and shut down), and at the interpreter's exit the run and node spans still open are ended
failed (``error.type=process_exited``) before the providers are shut down.

Each scenario runs in a child process (the global provider can be set once per process, and exit
is part of the scenario), with the DAG exporter writing a real SQLite file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .app_script import run_script

PRELUDE = """
import os, sys, threading
os.environ["CMBAGENT_OTEL_DATABASE_URL"] = "sqlite:///" + sys.argv[1]
import cmbagent_otel
from cmbagent_otel import workflow, phase, step
from cmbagent_otel.provider import slot_of
provider = cmbagent_otel.instrument(exporters="cmbagent_dag", instrument_cmbagent=False)
"""


def _run(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    return run_script(tmp_path, PRELUDE, body)


def _rows(db: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    con = sqlite3.connect(db)
    try:
        runs = con.execute("SELECT status, meta FROM workflow_runs ORDER BY started_at").fetchall()
        nodes = con.execute("SELECT node_type, status, meta FROM dag_nodes ORDER BY order_index").fetchall()
    finally:
        con.close()
    return ([(s, json.loads(m or "{}").get("error")) for s, m in runs],
            [(t, s, json.loads(m or "{}").get("label"), json.loads(m or "{}").get("error")) for t, s, m in nodes])


def test_uninstrument_inside_a_run_keeps_recording_it_until_its_blocks_end(tmp_path: Path) -> None:
    proc, db = _run(tmp_path, """
        import sqlite3
        with workflow("left open"), phase("control"):
            with step(1, "before"):
                cmbagent_otel.uninstrument()  # the application's shutdown hook, called mid-run
            with step(2, "after"):
                pass
        con = sqlite3.connect(sys.argv[1])  # read before the process exits: nothing else flushed it
        print("RUNS", con.execute("SELECT status FROM workflow_runs").fetchall())
        print("NODES", sorted(con.execute("SELECT status, count(*) FROM dag_nodes GROUP BY status").fetchall()))
        print("HELD", len(slot_of(provider).processors) + len(getattr(slot_of(provider), "kept", ())))
        with workflow("after uninstrument"):  # not recorded: instrumentation is off
            pass
    """)
    assert "RUNS [('completed',)]" in proc.stdout, proc.stdout + proc.stderr
    assert "NODES [('completed', 5)]" in proc.stdout, proc.stdout  # init, control, steps 1 and 2, terminator
    assert "HELD 0" in proc.stdout  # released once the run ended
    assert proc.stderr == ""
    runs, nodes = _rows(db)
    assert runs == [("completed", None)]
    assert [label for _, _, label, _ in nodes if label.startswith("Step")] == ["Step 1: before", "Step 2: after"]


def test_uninstrument_then_instrument_inside_a_run_stores_it_whole(tmp_path: Path) -> None:
    proc, db = _run(tmp_path, """
        with workflow("again"), phase("control"):
            with step(1, "before"):
                cmbagent_otel.uninstrument()
                cmbagent_otel.instrument(exporters="cmbagent_dag", instrument_cmbagent=False)
            with step(2, "after"):
                pass
        cmbagent_otel.uninstrument()
    """)
    runs, nodes = _rows(db)
    assert runs == [("completed", None)]
    assert {status for _, status, _, _ in nodes} == {"completed"} and len(nodes) == 5
    assert proc.stderr == ""


def test_instrument_again_with_other_exporters_inside_a_run(tmp_path: Path) -> None:
    """The open run goes on through the processors that recorded its start (its DAG rows end
    ``completed``); the new exporters get the runs started after."""
    proc, db = _run(tmp_path, """
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        memory = InMemorySpanExporter()
        with workflow("moved"), phase("control"):
            with step(1, "before"):
                cmbagent_otel.instrument(exporters="none", span_exporters=[memory])  # active: changes nothing
            with step(2, "switches"):
                cmbagent_otel.uninstrument()
                cmbagent_otel.instrument(exporters="none", span_exporters=[memory], instrument_cmbagent=False)
            with step(3, "after"):
                pass
        with workflow("next"), phase("control"):
            pass
        cmbagent_otel.uninstrument()
        print("MEMORY", sorted(span.name for span in memory.get_finished_spans()))
    """)
    assert "MEMORY ['phase control', 'workflow next']" in proc.stdout, proc.stdout
    runs, nodes = _rows(db)
    assert runs == [("completed", None)]
    assert {status for _, status, _, _ in nodes} == {"completed"} and len(nodes) == 6  # init, control, 3 steps, end
    assert proc.stderr == ""


def test_runs_of_two_rounds_left_open_each_stay_with_their_own_exporters(tmp_path: Path) -> None:
    """``uninstrument()`` twice, each time with a run open (one run per round, in two threads): each run goes
    on through the processors that recorded its start. Before, the second ``uninstrument()`` shut the
    first round's processors down: the first run's later steps went to the second round's exporters,
    and its DAG rows stayed ``executing``/``running``."""
    proc, db = _run(tmp_path, """
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        second, third = InMemorySpanExporter(), InMemorySpanExporter()
        opened = {name: threading.Event() for name in ("first", "second")}
        go_on = threading.Event()

        def run(name):
            with workflow(name), phase("control"):
                with step(1, "before"):
                    opened[name].set()
                    go_on.wait()
                with step(2, "after"):
                    pass

        first_run = threading.Thread(target=run, args=("first",))
        first_run.start()
        opened["first"].wait()
        cmbagent_otel.uninstrument()  # round 1 (the DAG exporter) kept for the first run
        cmbagent_otel.instrument(exporters="none", span_exporters=[second], instrument_cmbagent=False)
        second_run = threading.Thread(target=run, args=("second",))
        second_run.start()
        opened["second"].wait()
        cmbagent_otel.uninstrument()  # round 2 kept for the second run
        cmbagent_otel.instrument(exporters="none", span_exporters=[third], instrument_cmbagent=False)
        go_on.set()
        first_run.join()
        second_run.join()
        with workflow("third"):
            pass
        cmbagent_otel.uninstrument()
        print("SECOND", sorted(span.name for span in second.get_finished_spans()))
        print("THIRD", sorted(span.name for span in third.get_finished_spans()))
        print("HELD", len(slot_of(provider).processors) + len(slot_of(provider).kept))
    """)
    assert "SECOND ['phase control', 'step 1', 'step 2', 'workflow second']" in proc.stdout, proc.stdout
    assert "THIRD ['workflow third']" in proc.stdout, proc.stdout
    assert "HELD 0" in proc.stdout, proc.stdout
    runs, nodes = _rows(db)
    assert runs == [("completed", None)]
    assert {status for _, status, _, _ in nodes} == {"completed"} and len(nodes) == 5  # init, control, 2 steps, end
    assert proc.stderr == ""


def test_the_provider_shut_down_inside_a_run_ends_it_failed(tmp_path: Path) -> None:
    """``provider.shutdown()`` of the provider ``instrument()`` built, called by the application inside a
    run: its open spans are ended failed (``instrumentation_stopped``) and exported before the processors
    go, instead of being dropped when the blocks end; the application goes on without an error."""
    proc, db = _run(tmp_path, """
        with workflow("stopped"), phase("control"):
            with step(1, "open"):
                provider.shutdown()
            with step(2, "after"):
                pass
        print("WENT ON")
    """)
    assert "WENT ON" in proc.stdout
    stopped = "the tracer provider was shut down while it was open"
    runs, nodes = _rows(db)
    assert runs == [("failed", stopped)]
    assert sorted((kind, status, error) for kind, status, _, error in nodes if kind != "planning") == [
        ("agent", "failed", stopped), ("control", "failed", stopped), ("terminator", "failed", stopped)]
    # step 2, opened after the shutdown, waits in the spill store as any span ended after it does
    # (dropped with a line before the twenty-sixth campaign): one line
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "1 spans ended after the DAG processor shut down, kept in the spill store" in lines[0], \
        proc.stderr


EXITED = "the process exited while it was open"


@pytest.mark.parametrize("uninstrument", [False, True], ids=["instrumented", "uninstrumented"])
def test_a_daemon_threads_run_open_at_exit_is_stored_failed(tmp_path: Path, uninstrument: bool) -> None:
    proc, db = _run(tmp_path, f"""
        inside, forever = threading.Event(), threading.Event()

        def worker():
            with workflow("daemon"), phase("control"), step(1, "never ends"):
                inside.set()
                forever.wait()

        threading.Thread(target=worker, daemon=True).start()
        inside.wait()
        if {uninstrument}:
            cmbagent_otel.uninstrument()
    """)
    runs, nodes = _rows(db)
    assert runs == [("failed", EXITED)]
    assert sorted((kind, status, error) for kind, status, _, error in nodes if kind != "planning") == [
        ("agent", "failed", EXITED), ("control", "failed", EXITED), ("terminator", "failed", EXITED)]
    assert proc.stderr == ""


def test_blocks_entered_by_hand_and_never_left_are_stored_failed_at_exit(tmp_path: Path) -> None:
    proc, db = _run(tmp_path, """
        import contextvars

        def suspended():
            with workflow("generator"), phase("control"), step(1, "suspended"):
                yield 1

        held = suspended()
        contextvars.Context().run(next, held)  # suspended in its step, never resumed: closed when collected
        blocks = [workflow("by hand"), phase("control"), step(1, "never left")]
        for block in blocks:
            block.__enter__()
    """)
    runs, nodes = _rows(db)
    assert runs == [("failed", EXITED), ("failed", EXITED)]
    assert {status for kind, status, _, _ in nodes if kind != "planning"} == {"failed"}
    assert proc.stderr == ""


BEFORE = """
import os, sqlite3, sys
os.environ["CMBAGENT_OTEL_DATABASE_URL"] = "sqlite:///" + sys.argv[1]
from autogen import ConversableAgent
import cmbagent_otel
from cmbagent_otel import workflow, phase, step
from cmbagent_otel.testing import offline_agent


def chat():
    bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
    bob.initiate_chat(offline_agent("alice", ["pong"]), message="ping", max_turns=1, silent=True)


def instrument():
    cmbagent_otel.instrument(exporters="cmbagent_dag", instrument_cmbagent=False)


if sys.argv[2] == "first":  # the reference: instrumented before the run
    instrument()
with workflow("w", task="the task"), phase("control"):
    if sys.argv[2] == "in-phase":
        instrument()
    chat()
    with step(1, "a") as one:
        if sys.argv[2] == "in-step":
            one.set_summary("set before instrument()")
            instrument()
        chat()
cmbagent_otel.uninstrument()
con = sqlite3.connect(sys.argv[1])
print("RUNS", con.execute("SELECT status, task_description FROM workflow_runs").fetchall())
print("NODES", sorted(con.execute(
    "SELECT json_extract(meta, '$.id'), status, node_type, order_index, depth, parent_node_id IS NULL "
    "FROM dag_nodes").fetchall()))
print("EVENTS", sorted(con.execute(
    "SELECT event_type, event_subtype, status, count(*) FROM execution_events GROUP BY 1, 2, 3").fetchall()))
"""


def _before(tmp_path: Path, when: str) -> list[str]:
    db, script = tmp_path / f"{when}.sqlite", tmp_path / "before.py"
    script.write_text(BEFORE)
    env = {k: v for k, v in os.environ.items() if k != "CMBAGENT_OTEL_DATABASE_URL"}
    proc = subprocess.run([sys.executable, str(script), str(db), when], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith(("RUNS", "NODES", "EVENTS"))]


@pytest.mark.parametrize("when", ["in-phase", "in-step"])
def test_blocks_opened_before_instrument_are_recorded_whole(tmp_path: Path, when: str) -> None:
    """A workflow (and phase, and step) opened before ``instrument()``: the blocks start their spans once
    a provider records, with the time they were entered; the rows are those of a run instrumented from
    the start. Before, the steps named a parent node whose span never came (a placeholder ``running``
    for ever), and each became a run of its own."""
    reference = _before(tmp_path, "first")
    assert reference[0] == "RUNS [('completed', 'the task')]", reference
    got = _before(tmp_path, when)
    if when == "in-step":  # the chat in the phase ran before instrument(): not recorded, nodes the same
        assert got[:2] == reference[:2]
        assert "('agent_call', 'invoke', 'completed', 1)" not in got[2]
    else:
        assert got == reference
