"""otel-collector.yaml is well-formed and wires the fan-out the docs describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

CONFIG = Path(__file__).resolve().parents[2] / "otel-collector.yaml"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def test_every_referenced_component_is_defined(config: dict[str, Any]) -> None:
    service = config["service"]
    for ext in service.get("extensions", []):
        assert ext in config["extensions"]
    for pipeline in service["pipelines"].values():
        for section in ("receivers", "processors", "exporters"):
            for name in pipeline[section]:
                assert name in config[section], f"{section} {name} used but not defined"


def test_traces_pipeline(config: dict[str, Any]) -> None:
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert traces["processors"] == ["memory_limiter", "batch"]  # the limiter must come first
    assert traces["exporters"] == ["otlp/jaeger", "otlp/tempo", "otlphttp/cmbagent"]


def test_endpoints(config: dict[str, Any]) -> None:
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    exporters = config["exporters"]
    assert exporters["otlp/jaeger"] == {"endpoint": "jaeger:4317", "tls": {"insecure": True}}
    assert exporters["otlp/tempo"] == {"endpoint": "tempo:4317", "tls": {"insecure": True}}
    ingest = exporters["otlphttp/cmbagent"]
    assert ingest["endpoint"] == "http://cmbagent-ingest:4319"  # not the collector's own 4318
    assert ingest["encoding"] == "proto" and ingest["compression"] == "gzip"
    assert ingest["headers"]["Authorization"] == "Bearer ${env:CMBAGENT_OTEL_INGEST_TOKEN}"
