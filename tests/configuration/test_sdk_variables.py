"""OTEL_* variables the OpenTelemetry SDK parses itself never fail the application.

The SDK raises on some bad values: span limits when ``opentelemetry.sdk.trace`` is imported
or a TracerProvider built, ``OTEL_PROPAGATORS`` when ``opentelemetry.propagate`` is
imported, the gRPC exporters' timeout and compression when they are built. An application
that only added ``cmbagent_otel.instrument()`` must run as before: each bad value is logged
once and the SDK's default used. Checked in a child process (the import is what fails),
whose spans go over OTLP/gRPC to a real ingest server.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cmbagent_otel import environment_variables as env
from cmbagent_otel.ingest import IngestServer

CHILD = """
import cmbagent_otel
from cmbagent_otel import phase, step, workflow
cmbagent_otel.instrument(instrument_cmbagent=False)
with workflow("sdk variables", mode="planning-control"), phase("control"), step(1, "fit"):
    pass
cmbagent_otel.uninstrument()
print("APP DONE")
"""

BAD = {
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "-1",  # read when the SDK's trace module is imported
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "4k",
    "OTEL_SPAN_EVENT_COUNT_LIMIT": "lots",
    "OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT": "many",
    "OTEL_PROPAGATORS": "tracecontext,b3-typo",
    "OTEL_EXPORTER_OTLP_TIMEOUT": "soon",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "10s",
    "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd",
    "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "none",  # the spec's value, which the gRPC exporter refuses
    # the SDK's batch span processor and periodic metric reader raise when they are built
    "OTEL_BSP_SCHEDULE_DELAY": "0",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "5000",  # above the queue (2048)
    "OTEL_BSP_EXPORT_TIMEOUT": "30s",  # the SDK logs a traceback
    "OTEL_METRIC_EXPORT_INTERVAL": "-1",
}
# the SDK logs a malformed header entry whole: here, a credential written with a colon
HEADER_SECRET = "sk-HEADERSECRET0123456789"
BAD_HEADERS = f"x-tenant=cmb,Authorization: Bearer {HEADER_SECRET}"


def run_child(tmp_path: Path, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update({"CMBAGENT_DEFAULT_WORK_DIR": str(tmp_path / "work"), **extra})
    return subprocess.run([sys.executable, "-c", CHILD], env=environ, capture_output=True, text=True,
                          timeout=300, check=False)


def test_bad_sdk_variables_are_warned_once_and_the_app_runs(tmp_path: Path) -> None:
    with IngestServer(f"sqlite:///{tmp_path}/ingest.db", port="off", grpc_port=0).start() as server:
        child = run_child(tmp_path, {
            **BAD,
            "OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": server.grpc_endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_EXPORTER_OTLP_HEADERS": BAD_HEADERS,
        })
        assert child.returncode == 0 and "APP DONE" in child.stdout, child.stderr
        assert "Traceback" not in child.stderr, child.stderr
        for name, value in BAD.items():
            assert child.stderr.count(f"ignoring {name}={value!r}") == 1, (name, child.stderr)
        assert child.stderr.count("ignoring OTEL_EXPORTER_OTLP_HEADERS=<hidden> (1 of its 2 entries") == 1
        assert HEADER_SECRET not in child.stderr
        assert server.spans_written == 3  # exported with the defaults (no compression, 10 s timeout)
    with sqlite3.connect(tmp_path / "ingest.db") as conn:
        assert conn.execute("SELECT mode, status FROM workflow_runs").fetchall() == [("planning-control", "completed")]


def test_valid_and_empty_values_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    good = {"OTEL_SPAN_EVENT_COUNT_LIMIT": "64", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "",  # empty: no limit
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5", "OTEL_EXPORTER_OTLP_COMPRESSION": " GZIP ",
            "OTEL_PROPAGATORS": "tracecontext, baggage"}
    for name, value in good.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "")  # empty: unset, as the spec says
    assert env.check_sdk_variables() == ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"]
    assert {name: os.environ.get(name) for name in good} == good


def test_a_queue_smaller_than_the_default_batch_lowers_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``OTEL_BSP_MAX_QUEUE_SIZE=100`` alone made the SDK's batch processor raise (its default batch,
    512, is larger): the batch is lowered to the queue, and the processor builds."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "100")
    monkeypatch.delenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", raising=False)
    env.check_sdk_variables()
    assert os.environ["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] == "100"
    BatchSpanProcessor(ConsoleSpanExporter()).shutdown()


def test_header_variables_keep_their_good_entries(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", f"a=1, Authorization: Bearer {HEADER_SECRET} ,b=x%20y")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "api-key=fine,x=1")
    env.check_sdk_variables()
    assert os.environ["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] == "a=1,b=x%20y"
    assert os.environ["OTEL_EXPORTER_OTLP_HEADERS"] == "api-key=fine,x=1"
    assert HEADER_SECRET not in caplog.text


def test_http_exporters_keep_deflate_and_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OTLP/HTTP exporters accept deflate and none (the gRPC ones only gzip): dropping deflate
    there turned an HTTP user's compression off. A variable read by a gRPC exporter too still goes."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    for signal in ("TRACES", "METRICS", "LOGS"):
        monkeypatch.delenv(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "deflate")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "deflate")
    assert env.check_sdk_variables() == ["OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION"]
    assert os.environ["OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"] == "none"
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "deflate")
    assert env.check_sdk_variables() == []
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION")
    assert OTLPSpanExporter()._compression.value == "deflate"


def test_a_queue_alone_is_named_in_the_warning(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "64")
    monkeypatch.delenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", raising=False)
    with caplog.at_level("WARNING", logger="cmbagent_otel"):
        env.check_sdk_variables()
    assert "OTEL_BSP_MAX_QUEUE_SIZE=64 is below the default batch size 512" in caplog.text
    assert "ignoring OTEL_BSP_MAX_EXPORT_BATCH_SIZE" not in caplog.text


def test_a_schedule_delay_too_long_to_wait_is_warned_and_the_spans_exported(tmp_path: Path) -> None:
    # the SDK's BatchSpanProcessor worker died of OverflowError ("timestamp out of range for
    # platform time_t") waiting 1e26 ms: a traceback, and its spans left to the final flush
    delay = "99999999999999999999999999"
    with IngestServer(f"sqlite:///{tmp_path}/ingest.db", port="off", grpc_port=0).start() as server:
        child = run_child(tmp_path, {
            "OTEL_BSP_SCHEDULE_DELAY": delay, "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": server.grpc_endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        })
        assert child.returncode == 0 and "APP DONE" in child.stdout, child.stderr
        assert "Traceback" not in child.stderr, child.stderr
        assert child.stderr.count(f"ignoring OTEL_BSP_SCHEDULE_DELAY={delay!r}") == 1, child.stderr
        assert server.spans_written == 3
