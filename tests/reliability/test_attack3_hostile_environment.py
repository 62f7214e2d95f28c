"""Hostile environment values: a bounded warning, the default used, nothing lost.

Found by the twenty-first campaign (the third and fifth checked malformed numbers; these are the
sizes and bytes of a value):

* a value of 120,000 characters (Linux takes up to 128 KiB per variable) in a setting that
  could not be parsed was quoted whole in its warning (and again inside the parser's reason for
  an unknown exporter name): a 120 KB log line per variable;
* ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` holding bytes that are not UTF-8 (Python
  keeps them as lone surrogates) put them on the resource of every span, which the OTLP encoder
  refuses: a traceback for every batch and the spans sent without ``service.name``;
* a ``CMBAGENT_OTEL_SPILL_DIR`` (or ``CMBAGENT_DEFAULT_WORK_DIR``, or a SQLite path) longer than
  the system's path limits was taken: every spill and replay failed (``File name too long``), a
  traceback logged each time, the spans the database refused dropped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cmbagent_otel import environment_variables as env
from cmbagent_otel import provider as providers

APP = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
import cmbagent_otel
cmbagent_otel.instrument(instrument_cmbagent=False)
with cmbagent_otel.workflow("w"):
    pass
cmbagent_otel.uninstrument()
print("app ran")
"""


def _run_app(tmp_path: Path, **variables: bytes) -> subprocess.CompletedProcess[bytes]:
    environ = dict(os.environb)
    for name in list(environ):
        if name.startswith((b"OTEL_", b"CMBAGENT_OTEL_")):
            del environ[name]
    environ[b"CMBAGENT_DEFAULT_WORK_DIR"] = os.fsencode(tmp_path / "work")
    environ.update({name.encode(): value for name, value in variables.items()})
    return subprocess.run([sys.executable, "-c", APP], env=environ, capture_output=True, timeout=180)


@pytest.mark.parametrize("name", ["CMBAGENT_OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_QUEUE_SIZE",
                                  "CMBAGENT_OTEL_MAX_ATTRIBUTE_LENGTH", "OTEL_TRACES_EXPORTER",
                                  "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"])
def test_attack3_a_huge_value_gives_a_short_warning(tmp_path: Path, name: str) -> None:
    done = _run_app(tmp_path, **{name: b"z" * 120_000})
    assert done.returncode == 0 and b"app ran" in done.stdout, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if name.encode() in line]
    assert warnings and b"ignoring" in warnings[0], done.stderr[:2000]
    assert max(len(line) for line in done.stderr.splitlines()) < 1000, [len(line) for line in warnings]
    assert b"(120000 characters)" in warnings[0]


@pytest.mark.parametrize(("name", "value"), [("OTEL_SERVICE_NAME", "lab\udcff\udcfe"),
                                             ("OTEL_RESOURCE_ATTRIBUTES", "service.name=lab\udcff\udcfe,site=a\udce9")])
def test_attack3_resource_bytes_that_are_not_utf8_are_exportable(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                 value: str) -> None:
    monkeypatch.setenv(name, value)  # what os.environ holds for those bytes
    memory = InMemorySpanExporter()
    tracer_provider = TracerProvider(resource=providers.resource())
    tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer_provider.get_tracer("t").start_span("s").end()
    encoded = encode_spans(memory.get_finished_spans())  # the OTLP exporters' encoder: raised for it
    assert b"lab\\xff\\xfe" in encoded.SerializeToString()
    assert memory.get_finished_spans()[0].resource.attributes["service.name"] == "lab\\xff\\xfe"


def test_attack3_resource_bytes_that_are_not_utf8_log_no_traceback(tmp_path: Path) -> None:
    done = _run_app(tmp_path, OTEL_SERVICE_NAME=b"lab\xff", OTEL_TRACES_EXPORTER=b"console")
    assert done.returncode == 0, done.stderr[-2000:]
    assert b"Traceback" not in done.stderr and b"Failed to encode" not in done.stderr, done.stderr[-2000:]
    assert b'"service.name": "lab\\\\xff"' in done.stdout


@pytest.mark.parametrize("value", ["/tmp/" + "d" * 300 + "/spill", "/tmp/" + "/".join(["x" * 200] * 25)])
def test_attack3_a_spill_dir_past_the_path_limits_is_ignored(value: str, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CMBAGENT_DEFAULT_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("CMBAGENT_OTEL_SPILL_DIR", value)
    assert env.get(env.SPILL_DIR) == str(tmp_path / "work" / "spill")
    assert any("CMBAGENT_OTEL_SPILL_DIR" in r.getMessage() and "ignoring" in r.getMessage() for r in caplog.records)
    # the spans a database refuses are kept, in the default folder
    memory = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer_provider.get_tracer("t").start_span("s").end()
    exporter = DagSpanExporter("postgresql+psycopg://nobody@127.0.0.1:1/none", timeout=0.2)
    try:
        exporter.export(memory.get_finished_spans())
        assert exporter.stats()["spilled"] == 1, exporter.stats()
    finally:
        exporter.shutdown()
    assert list((tmp_path / "work" / "spill").iterdir())


@pytest.mark.parametrize("name", ["CMBAGENT_DEFAULT_WORK_DIR", "CMBAGENT_OTEL_DATABASE_URL"])
def test_attack3_paths_past_the_limits_fall_back_to_the_default(name: str, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    long_path = "/tmp/" + "n" * 256 + "/db.sqlite"
    monkeypatch.setenv(name, f"sqlite:///{long_path}" if name.endswith("URL") else long_path)
    url = env.database_url()
    assert "n" * 256 not in url
    assert any(name in r.getMessage() and "ignoring" in r.getMessage() for r in caplog.records)
