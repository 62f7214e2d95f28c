"""A run or step ended for its owner is timed once (twenty-second fault campaign; left by the seventeenth).

When the tracer provider ``instrument()`` built is shut down inside a run, or the interpreter exits
while a daemon thread is inside a step, the run and node spans still open are ended failed and their
duration metrics (``cmbagent.step.duration``, ``cmbagent.workflow.duration``,
``gen_ai.workflow.duration``) recorded for their owners. The owners went on: the application's blocks
were left later (the daemon thread released by an exit hook of the application's, the thread that
shut the provider down), and each recorded the same run and step again: two data points for one step.

Each scenario runs in a child process (the global provider is set once per process, and exit is part
of the scenario), with real blocks, a real AG2 chat and the SDK's in-memory metric reader.
"""

from __future__ import annotations

import json
from pathlib import Path

from .app_script import run_script

PRELUDE = """
import atexit, json, os, sys, threading
os.environ["CMBAGENT_OTEL_DATABASE_URL"] = "sqlite:///" + sys.argv[1]
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
import cmbagent_otel
from cmbagent_otel import workflow, phase, step
from cmbagent_otel.testing import offline_agent

reader = InMemoryMetricReader()
meters = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)

def counts():
    found = {}
    data = reader.get_metrics_data()
    for resource in (data.resource_metrics if data else ()):
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name.endswith(".duration") and "client" not in metric.name:
                    for point in metric.data.data_points:
                        key = metric.name + " " + str(dict(point.attributes).get("error.type"))
                        found[key] = found.get(key, 0) + point.count
    return found

def chat():
    left = offline_agent("left", ["hello", "TERMINATE"])
    right = offline_agent("right", ["reply", "TERMINATE"])
    left.initiate_chat(right, message="start", max_turns=2, silent=True)
"""


def _run(tmp_path: Path, body: str) -> dict[str, int]:
    proc, _ = run_script(tmp_path, PRELUDE, body)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("COUNTS ")]
    assert lines, proc.stdout + proc.stderr
    assert "Calling end() on an ended span" not in proc.stderr
    return json.loads(lines[-1][len("COUNTS "):])  # type: ignore[no-any-return]


def test_a_daemon_threads_step_ended_at_exit_is_timed_once(tmp_path: Path) -> None:
    counts = _run(tmp_path, """
        inside, release = threading.Event(), threading.Event()
        worker = None

        def at_exit():  # registered before instrument(): runs after its exit hook has ended the open spans
            release.set()
            worker.join()  # the daemon thread leaves its step and workflow blocks now
            print("COUNTS " + json.dumps(counts()), flush=True)

        atexit.register(at_exit)
        cmbagent_otel.instrument(exporters="cmbagent_dag", instrument_cmbagent=False, meter_provider=meters)

        def daemon():
            with workflow("background"), phase("control"), step(1, "long"):
                chat()
                inside.set()
                release.wait()

        worker = threading.Thread(target=daemon, daemon=True)
        worker.start()
        inside.wait()
    """)
    assert counts == {
        "cmbagent.step.duration process_exited": 1,
        "cmbagent.workflow.duration process_exited": 1,
        "gen_ai.workflow.duration process_exited": 1,
    }


def test_a_run_whose_provider_was_shut_down_is_timed_once(tmp_path: Path) -> None:
    counts = _run(tmp_path, """
        provider = cmbagent_otel.instrument(exporters="cmbagent_dag", instrument_cmbagent=False,
                                            meter_provider=meters)
        with workflow("shut down"), phase("control"):
            with step(1, "first"):
                chat()
                provider.shutdown()  # the application's own shutdown, mid-run
            with step(2, "after"):  # its span dropped as any after a shutdown; its owner times it
                pass
        print("COUNTS " + json.dumps(counts()), flush=True)
    """)
    assert counts == {
        "cmbagent.step.duration instrumentation_stopped": 1,
        "cmbagent.step.duration None": 1,  # step 2
        "cmbagent.workflow.duration instrumentation_stopped": 1,
        "gen_ai.workflow.duration instrumentation_stopped": 1,
    }
