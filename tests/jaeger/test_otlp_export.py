"""OTEL_TRACES_EXPORTER=otlp from an instrumented workflow straight into Jaeger (gRPC and HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import (
    JAEGER_CONFIG,
    Jaeger,
    app_env,
    assert_same_spans,
    assert_ui_api_agrees,
    assert_workflow_tree,
    finish_app,
    read_trace,
    run_jaeger,
    start_app,
    trace_ids,
)


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    with run_jaeger(JAEGER_CONFIG, tmp_path_factory.mktemp("jaeger"), "jaeger") as running:
        yield running


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_workflow_tree_in_jaeger(jaeger: Jaeger, tmp_path: Path, protocol: str) -> None:
    service_name = f"cmbagent-jaeger-{protocol.split('/')[0]}"
    out = tmp_path / "spans.json"
    local = finish_app(start_app(app_env(protocol, jaeger, service_name), out, f"direct {protocol}"), out)
    assert_workflow_tree(local)   # the application produced the tree we expect to find in Jaeger
    (trace_id,) = trace_ids(local)

    remote = read_trace(jaeger, trace_id, len(local))

    assert_same_spans(remote, local)
    assert_workflow_tree(remote)
    assert_ui_api_agrees(jaeger, remote)
    assert {s.resource["service.name"] for s in remote.values()} == {service_name}
