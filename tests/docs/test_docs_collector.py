"""otel-collector.yaml and the compose file as README.md and docs/backends.md describe them, without a
collector binary (tests/jaeger validates the file with one; these run everywhere)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from cmbagent_otel import environment_variables as env

ROOT = Path(__file__).resolve().parents[2]
BACKENDS_DOC = (ROOT / "docs" / "backends.md").read_text()
README = (ROOT / "README.md").read_text()


def _load(path: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / path).read_text())  # type: ignore[no-any-return]


def _paragraph() -> str:
    return BACKENDS_DOC.split("## OpenTelemetry Collector fan-out\n", 1)[1].split("```", 1)[0]


def test_docs_collector_receivers_processors_and_health_check() -> None:
    config, text = _load("otel-collector.yaml"), _paragraph()
    grpc, http = re.search(r"gRPC (\d+), HTTP (\d+)", text).groups()  # type: ignore[union-attr]
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(f":{grpc}") and protocols["http"]["endpoint"].endswith(f":{http}")
    assert "OTLP in on 4317/4318" in README and (grpc, http) == ("4317", "4318")
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    assert "`memory_limiter` then `batch`" in text and pipeline["processors"] == ["memory_limiter", "batch"]
    port = re.search(r"`health_check` answers on (\d+)", text).group(1)  # type: ignore[union-attr]
    assert config["extensions"]["health_check"]["endpoint"].endswith(f":{port}")
    assert config["service"]["extensions"] == ["health_check"]


def test_docs_collector_exporters() -> None:
    config, text = _load("otel-collector.yaml"), _paragraph()
    exporters = config["exporters"]
    pipeline = config["service"]["pipelines"]["traces"]["exporters"]
    jaeger = re.search(r"Jaeger \(`([^`]+)`\)", text).group(1)  # type: ignore[union-attr]
    tempo = re.search(r"Tempo\s+\(`([^`]+)`\)", text).group(1)  # type: ignore[union-attr]
    ingest = re.search(r"`otlphttp` to `([^`]+)`", text).group(1)  # type: ignore[union-attr]
    grpc_ingest = re.search(r"`otlp/cmbagent-grpc`,\s+the\s+same over gRPC to `([^`]+)`", text).group(1)  # type: ignore[union-attr]
    assert [exporters[name]["endpoint"] for name in pipeline] == [jaeger, tempo, ingest]
    assert exporters["otlp/cmbagent-grpc"]["endpoint"] == grpc_ingest and "otlp/cmbagent-grpc" not in pipeline
    for name in ("otlphttp/cmbagent", "otlp/cmbagent-grpc"):
        assert exporters[name]["compression"] == "gzip"
        assert exporters[name]["headers"]["Authorization"] == "Bearer ${env:CMBAGENT_OTEL_INGEST_TOKEN}"
        # the file's comment: fewer senders than the ingest serves one client at once
        assert exporters[name]["sending_queue"]["num_consumers"] <= env.SETTINGS[
            env.INGEST_MAX_REQUESTS_PER_CLIENT].default_value()


def test_docs_compose_file_wires_the_collector_to_the_ingest() -> None:
    compose, config = _load("examples/collector_fanout/docker-compose.yaml"), _load("otel-collector.yaml")
    services = compose["services"]
    assert services["collector"]["volumes"][0].startswith("../../otel-collector.yaml:")
    assert {"4317:4317", "4318:4318", "13133:13133"} <= set(services["collector"]["ports"])
    command = services["cmbagent-ingest"]["command"]
    http_port = re.search(r"--port (\d+)", command).group(1)  # type: ignore[union-attr]
    grpc_port = re.search(r"--grpc-port (\d+)", command).group(1)  # type: ignore[union-attr]
    assert config["exporters"]["otlphttp/cmbagent"]["endpoint"] == f"http://cmbagent-ingest:{http_port}"
    assert config["exporters"]["otlp/cmbagent-grpc"]["endpoint"] == f"cmbagent-ingest:{grpc_port}"
    assert {"jaeger", "tempo", "cmbagent-ingest"} <= set(services)
