"""End to end against a real Arize Phoenix: OTLP over HTTP and gRPC, span tree read back via its REST API.

Phoenix lives in its own venv (``.ci/setup-phoenix.sh``); point ``CMBAGENT_OTEL_PHOENIX_BIN``
at its ``phoenix`` executable.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ingest_app import STEPS, run
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel
from cmbagent_otel.provider import build_tracer_provider
from tests.jaeger.support import free_ports

pytestmark = pytest.mark.phoenix

PHOENIX_BIN = os.environ.get("CMBAGENT_OTEL_PHOENIX_BIN", "")
STARTUP_DEADLINE_S = 600  # guards against a hang only: Phoenix took over 180 s to start at load 13 (2 cores)


@dataclass
class Phoenix:
    http: str
    grpc: str


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    if not PHOENIX_BIN:
        pytest.skip("CMBAGENT_OTEL_PHOENIX_BIN is not set (run .ci/setup-phoenix.sh and export it)")
    if not Path(PHOENIX_BIN).is_file():
        pytest.skip(f"CMBAGENT_OTEL_PHOENIX_BIN={PHOENIX_BIN} does not exist")
    work = tmp_path_factory.mktemp("phoenix")
    with free_ports(2, every_address=True) as (http_port, grpc_port):
        env = {
            **os.environ,
            "PHOENIX_WORKING_DIR": str(work),
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(http_port),
            "PHOENIX_GRPC_PORT": str(grpc_port),
            "PHOENIX_TELEMETRY_ENABLED": "false",
        }
        for key in [k for k in env if k.startswith("OTEL_")]:
            del env[key]  # our test settings must not configure Phoenix's own tracing
        log = (work / "phoenix.log").open("wb")
        proc = subprocess.Popen([PHOENIX_BIN, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{http_port}"
        try:
            deadline = time.monotonic() + STARTUP_DEADLINE_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"phoenix exited with {proc.returncode}: {(work / 'phoenix.log').read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"{base}/healthz", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    tail = (work / "phoenix.log").read_text()[-3000:]
                    pytest.fail(f"phoenix not ready after {STARTUP_DEADLINE_S}s: {tail}")
                time.sleep(0.25)
            yield Phoenix(http=base, grpc=f"http://127.0.0.1:{grpc_port}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def export_run(monkeypatch: pytest.MonkeyPatch, project: str, env: dict[str, str]) -> list[ReadableSpan]:
    """One instrumented run exported through the OTEL_* configured provider; returns the local copy."""
    for key, value in {**env, "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={project}"}.items():
        monkeypatch.setenv(key, value)
    memory = InMemorySpanExporter()
    provider = build_tracer_provider("otlp", span_exporters=[memory])
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        run(project)
    finally:
        cmbagent_otel.uninstrument()
        assert provider.force_flush()
        provider.shutdown()
    return list(memory.get_finished_spans())


def read_back(phoenix: Phoenix, project: str, expected: int) -> list[dict[str, Any]]:
    """Phoenix stores spans asynchronously: poll its REST API until all arrived (or the deadline)."""
    url = f"{phoenix.http}/v1/projects/{project}/spans?limit=1000"
    deadline = time.monotonic() + 60
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            spans = get_json(url)["data"]
        except urllib.error.HTTPError as exc:
            if exc.code != 404:  # 404 until the project is created by the first span
                raise
        if len(spans) >= expected:
            break
        time.sleep(0.1)
    return spans


def assert_same_tree(remote: list[dict[str, Any]], local: list[ReadableSpan]) -> None:
    expected = {(s.name, f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}",
                 f"{s.parent.span_id:016x}" if s.parent else None) for s in local}
    got = {(s["name"], s["context"]["trace_id"], s["context"]["span_id"], s["parent_id"]) for s in remote}
    assert got == expected
    by_name = {s["name"]: s for s in remote}
    names = set(by_name)
    assert {"phase planning", "phase control", *(f"step {i}" for i in range(1, STEPS + 1))} <= names
    assert any(n.startswith("invoke_agent engineer") for n in names)
    assert any(n.startswith("chat ") for n in names)
    root = next(s for s in remote if s["parent_id"] is None)
    assert root["name"].startswith("workflow ingest-")
    assert root["attributes"]["cmbagent.span.kind"] == "workflow"
    ids = {s["context"]["span_id"]: s for s in remote}
    step = by_name["step 1"]
    assert ids[step["parent_id"]]["name"] == "phase control"
    assert step["attributes"]["cmbagent.dag.node"] == "step_1"


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_phoenix_receives_span_tree(phoenix: Phoenix, monkeypatch: pytest.MonkeyPatch, protocol: str) -> None:
    project = f"cmbagent-{protocol.split('/')[0]}"
    if protocol == "grpc":
        env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": phoenix.grpc,
               "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    else:
        env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{phoenix.http}/v1/traces"}
    local = export_run(monkeypatch, project, env)
    remote = read_back(phoenix, project, len(local))
    assert_same_tree(remote, local)
