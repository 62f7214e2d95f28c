"""SIGTERM keeps the run's metrics too, and the spans it ends have their durations (fourteenth campaign).

The twelfth campaign made SIGTERM/SIGHUP flush the tracer provider and end the run's open spans
failed; the metrics were left out. With ``OTEL_METRICS_EXPORTER`` set, everything recorded since
the last periodic export (60 s by default: for most runs, all of it) died with the process, the
finished steps' durations and the model calls' tokens included; and the run and step the handler
ended recorded no ``cmbagent.workflow.duration`` / ``cmbagent.step.duration`` at all, so the
metrics disagreed with the spans (a failed run in the trace, no failed run in the metrics). The
handler now records those durations (``error.type=stopped_by_signal``) and flushes the meter
provider after the tracer provider. The app is a real instrumented process exporting its metrics
to the console (stdout), stopped by a real signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import hangup_as_default
from .test_signal_flush import CHILD


def _stopped(tmp_path: Path, signum: int, more_env: dict[str, str] | None = None,
             before_signal: Callable[[], None] | None = None) -> tuple[int, list[dict[str, Any]]]:
    env = {**os.environ, "CMBAGENT_OTEL_DATABASE_URL": f"sqlite:///{tmp_path / 'cmbagent.db'}",
           "CMBAGENT_OTEL_SPILL_DIR": str(tmp_path / "spill"), "OTEL_TRACES_EXPORTER": "cmbagent_dag",
           "OTEL_METRICS_EXPORTER": "console", **(more_env or {})}
    env.pop("OTEL_SDK_DISABLED", None)
    env.pop("OTEL_METRIC_EXPORT_INTERVAL", None)  # the SDK's 60 s: the run ends long before
    proc = subprocess.Popen([sys.executable, "-c", CHILD, ""], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=hangup_as_default)
    assert proc.stdout is not None
    proc.stdout.readline()  # HANDLER ...
    assert proc.stdout.readline().strip() == "READY", proc.communicate(timeout=60)
    if before_signal is not None:
        before_signal()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    documents, decoder, text = [], json.JSONDecoder(), out.strip()
    while text:
        document, end = decoder.raw_decode(text)
        documents.append(document)
        text = text[end:].strip()
    return proc.returncode, documents


def _points(documents: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [point for document in documents for resource in document["resource_metrics"]
            for scope in resource["scope_metrics"] for metric in scope["metrics"] if metric["name"] == name
            for point in metric["data"]["data_points"]]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_exports_the_metrics_and_the_durations_of_what_it_ended(tmp_path: Path, name: str) -> None:
    signum = getattr(signal, name)
    code, documents = _stopped(tmp_path, signum)
    assert code == -signum
    assert documents, "no metrics exported before the process ended"
    steps = {(p["attributes"].get("cmbagent.step.agent"), p["attributes"].get("error.type")): p["count"]
             for p in _points(documents, "cmbagent.step.duration")}
    assert sum(steps.values()) == 2, steps  # step 1 completed, step 2 stopped
    assert [k for k in steps if k[1] == "stopped_by_signal"], steps
    runs = _points(documents, "cmbagent.workflow.duration")
    assert [p["attributes"].get("error.type") for p in runs] == ["stopped_by_signal"], runs
    assert runs[0]["attributes"].get("cmbagent.workflow.name") == "stopped run"
    gen_ai = _points(documents, "gen_ai.workflow.duration")
    assert [p["attributes"] for p in gen_ai] == [{"gen_ai.workflow.name": "stopped run",
                                                  "error.type": "stopped_by_signal"}], gen_ai
