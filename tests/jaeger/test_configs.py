"""The collector configs the docs ship are valid for the collector that runs them, and the
Jaeger variant the tests run is the shipped otel-collector.yaml except where documented."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .support import COLLECTOR_CONFIG, JAEGER_CONFIG, SHIPPED_COLLECTOR_CONFIG, clean_env, jaeger_binary


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(jaeger_binary()), "validate", "--config", str(config)], env=clean_env(),
                          capture_output=True, text=True, timeout=60)


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("config", [JAEGER_CONFIG, COLLECTOR_CONFIG], ids=lambda p: p.name)
def test_jaeger_configs_are_valid(config: Path) -> None:
    result = validate(config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shipped_collector_config_is_valid_for_the_collector_components(tmp_path: Path) -> None:
    """otel-collector.yaml's receivers, processors and exporters are upstream collector components
    that Jaeger's build contains too; only otelcol-contrib's `health_check` extension is not."""
    config = load(SHIPPED_COLLECTOR_CONFIG)
    assert config["service"]["extensions"] == ["health_check"]
    del config["extensions"], config["service"]["extensions"]
    copy = tmp_path / "otel-collector-without-health-check.yaml"
    copy.write_text(yaml.safe_dump(config))
    result = validate(copy)
    assert result.returncode == 0, result.stdout + result.stderr

    broken = tmp_path / "broken.yaml"   # the check can fail: a misspelt setting is refused
    config["processors"]["batch"]["send_batch_sise"] = 1
    broken.write_text(yaml.safe_dump(config))
    assert validate(broken).returncode != 0


def test_jaeger_variant_matches_the_shipped_config() -> None:
    shipped, variant = load(SHIPPED_COLLECTOR_CONFIG), load(COLLECTOR_CONFIG)
    assert variant["processors"] == shipped["processors"]
    assert variant["receivers"]["otlp"]["protocols"].keys() == shipped["receivers"]["otlp"]["protocols"].keys()
    endpoints = {   # exporter: (variant, shipped)
        "otlphttp/cmbagent": ("${env:CMBAGENT_OTEL_INGEST_ENDPOINT:-http://127.0.0.1:4319}",
                              "http://cmbagent-ingest:4319"),
        "otlp/cmbagent-grpc": ("${env:CMBAGENT_OTEL_INGEST_GRPC_ENDPOINT:-127.0.0.1:4320}", "cmbagent-ingest:4320"),
    }
    for name, (variant_endpoint, shipped_endpoint) in endpoints.items():
        ingest_shipped = dict(shipped["exporters"][name])
        ingest_variant = dict(variant["exporters"][name])
        assert (ingest_variant.pop("endpoint"), ingest_shipped.pop("endpoint")) == (variant_endpoint, shipped_endpoint)
        assert ingest_variant == ingest_shipped, name
    assert set(variant["exporters"]) == {"jaeger_storage_exporter", *endpoints}
    pipeline_shipped = shipped["service"]["pipelines"]["traces"]
    pipeline_variant = variant["service"]["pipelines"]["traces"]
    assert pipeline_variant["receivers"] == pipeline_shipped["receivers"] == ["otlp"]
    assert pipeline_variant["processors"] == pipeline_shipped["processors"] == ["memory_limiter", "batch"]
    # Jaeger stores in-process instead of receiving over OTLP; Tempo is not run here
    assert [e for e in pipeline_shipped["exporters"] if e not in ("otlp/jaeger", "otlp/tempo")] == [
        "otlphttp/cmbagent"]
    assert pipeline_variant["exporters"] == ["jaeger_storage_exporter", "otlphttp/cmbagent"]
