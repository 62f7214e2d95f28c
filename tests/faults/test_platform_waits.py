"""Timeouts and intervals in ``OTEL_*`` variables that no platform wait can hold.

The fifth fault campaign bounded the batch processors' schedule delays; two more SDK
variables had the same fault (twelfth fault campaign). ``OTEL_EXPORTER_OTLP_TIMEOUT`` (and the
per-signal ones) of 1e10 s made every export of the OTLP/HTTP exporter fail ("timestamp out
of range for platform time_t": every span dropped, an error line per batch), and from ~9e9 s
the gRPC exporter's deadline overflowed into "Deadline Exceeded" at once (the same). An
``OTEL_METRIC_EXPORT_INTERVAL`` past ``threading.TIMEOUT_MAX`` killed the periodic metric
reader's thread with an ``OverflowError`` traceback, and no metric was exported again. Such
values are now warned once and the SDK's default used; the spans reach a real receiver.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cmbagent_otel.ingest import IngestServer

APP = textwrap.dedent('''
    import cmbagent_otel
    from cmbagent_otel import phase, step, workflow
    from cmbagent_otel._spans import TracedSpan
    from opentelemetry import context
    cmbagent_otel.instrument(instrument_cmbagent=False, instrument_threading=False)
    with workflow("waits", mode="one-shot"), phase("control"), step(1, "fit"):
        with TracedSpan("chat m", "llm", {"gen_ai.request.model": "m"}):
            pass
    cmbagent_otel.uninstrument()
    print("APP DONE", type(context._RUNTIME_CONTEXT).__name__, flush=True)
''')


def run_app(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A small instrumented workflow in a child process with ``env`` (no other ``OTEL_*``); it prints
    ``APP DONE <runtime context class>`` when it ran to its end."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    child.update({"CMBAGENT_OTEL_DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}",
                  "CMBAGENT_OTEL_SPILL_DIR": str(tmp_path / "spill"), **env})
    return subprocess.run([sys.executable, "-c", APP], env=child, capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
@pytest.mark.parametrize("timeout", ["1e10", "9e9"])
def test_an_otlp_timeout_past_the_platform_is_warned_and_spans_arrive(tmp_path: Path, protocol: str,
                                                                     timeout: str) -> None:
    with IngestServer(f"sqlite:///{tmp_path / 'received.db'}", host="127.0.0.1", port=0, grpc_port=0) as srv:
        endpoint = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": srv.endpoint} if protocol.startswith("http") else \
            {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{srv.grpc_endpoint}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
        proc = run_app(tmp_path, OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
                    OTEL_EXPORTER_OTLP_TIMEOUT=timeout, **endpoint)
        written = srv.spans_written
    assert "APP DONE" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert written == 4, proc.stderr[-2000:]  # workflow, phase, step, chat
    warnings = [line for line in proc.stderr.splitlines() if "OTEL_EXPORTER_OTLP_TIMEOUT" in line]
    assert len(warnings) == 1 and "above the maximum" in warnings[0]


def test_a_metric_interval_past_the_platform_is_warned_and_the_reader_lives(tmp_path: Path) -> None:
    proc = run_app(tmp_path, OTEL_METRICS_EXPORTER="console", OTEL_METRIC_EXPORT_INTERVAL="1e30",
                OTEL_TRACES_EXPORTER="none")
    assert "APP DONE" in proc.stdout
    assert "Traceback" not in proc.stderr and "OverflowError" not in proc.stderr, proc.stderr[-2000:]
    assert "resource_metrics" in proc.stdout  # exported when the provider shut down
    warnings = [line for line in proc.stderr.splitlines() if "OTEL_METRIC_EXPORT_INTERVAL" in line]
    assert len(warnings) == 1 and "above the maximum" in warnings[0]
