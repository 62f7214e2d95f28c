"""``OTEL_PYTHON_CONTEXT`` naming no installed context and OTLP TLS files that do not exist.

The twelfth fault campaign left both (thirteenth campaign): ``OTEL_PYTHON_CONTEXT=bogus`` made
the OpenTelemetry API log a ``StopIteration`` traceback when ``opentelemetry.context`` was first
imported, and a missing ``OTEL_EXPORTER_OTLP_CERTIFICATE`` (or client key or certificate) file
made the gRPC exporter log a ``FileNotFoundError`` traceback when it was built; both then went
on with their default. Importing cmbagent-otel now checks them with the other SDK variables: one
warning line, the variable removed, the default used.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .test_platform_waits import run_app


def _lines(proc: subprocess.CompletedProcess[str], name: str) -> list[str]:
    return [line for line in proc.stderr.splitlines() if f"{name}=" in line]


@pytest.mark.parametrize("name", ["bogus", " contextvars_context"])  # the API looks the name up as given
def test_an_unknown_context_is_warned_in_one_line(tmp_path: Path, name: str) -> None:
    proc = run_app(tmp_path, OTEL_PYTHON_CONTEXT=name)
    assert "APP DONE ContextVarsRuntimeContext" in proc.stdout, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "StopIteration" not in proc.stderr, proc.stderr[-2000:]
    warnings = _lines(proc, "OTEL_PYTHON_CONTEXT")
    assert len(warnings) == 1 and "no such OpenTelemetry context" in warnings[0], proc.stderr[-2000:]


def test_the_installed_context_is_kept(tmp_path: Path) -> None:
    proc = run_app(tmp_path, OTEL_PYTHON_CONTEXT="contextvars_context")
    assert "APP DONE ContextVarsRuntimeContext" in proc.stdout, proc.stderr[-2000:]
    assert not _lines(proc, "OTEL_PYTHON_CONTEXT") and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def _tlsrun_app(tmp_path: Path, port: int, **files: str) -> subprocess.CompletedProcess[str]:
    # a TLS endpoint (https): the gRPC exporter reads its certificate files when it is built
    return run_app(tmp_path, OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
                OTEL_EXPORTER_OTLP_ENDPOINT=f"https://127.0.0.1:{port}", OTEL_EXPORTER_OTLP_TIMEOUT="1",
                **files)


def test_a_missing_certificate_file_is_warned_in_one_line(tmp_path: Path, refused_port: int) -> None:
    proc = _tlsrun_app(tmp_path, refused_port, OTEL_EXPORTER_OTLP_CERTIFICATE=str(tmp_path / "missing-ca.pem"))
    assert "APP DONE" in proc.stdout, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "FileNotFoundError" not in proc.stderr, proc.stderr[-2000:]
    warnings = _lines(proc, "OTEL_EXPORTER_OTLP_CERTIFICATE")
    assert len(warnings) == 1 and "no such file" in warnings[0], proc.stderr[-2000:]


def test_a_client_certificate_without_its_key_is_dropped_with_it(tmp_path: Path, refused_port: int) -> None:
    certificate = tmp_path / "client.pem"
    certificate.write_text("not read: its key is missing\n")
    proc = _tlsrun_app(tmp_path, refused_port, OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY=str(tmp_path / "missing-key.pem"),
                    OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE=str(certificate))
    assert "APP DONE" in proc.stdout, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    key = _lines(proc, "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY")
    assert len(key) == 1 and "no such file" in key[0], proc.stderr[-2000:]
    pair = _lines(proc, "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE")
    assert len(pair) == 1 and "CLIENT_KEY is unusable" in pair[0], proc.stderr[-2000:]
