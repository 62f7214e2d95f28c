"""The collector path: applications -> Jaeger v2 running the collector fan-out
(examples/collector_fanout/jaeger-collector.yaml: OTLP in, memory_limiter, batch) -> Jaeger
storage + ``cmbagent-otel ingest`` (a real subprocess writing a SQLite DAG database)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support import (
    COLLECTOR_CONFIG,
    INGEST_TOKEN,
    Jaeger,
    app_env,
    assert_db_describes,
    assert_same_spans,
    assert_ui_api_agrees,
    assert_workflow_tree,
    finish_app,
    read_trace,
    run_ingest,
    run_jaeger,
    start_app,
    trace_ids,
    wait_for_db,
)


@dataclass
class FanOut:
    collector: Jaeger
    db_url: str


@pytest.fixture(scope="module")
def fanout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FanOut]:
    work = tmp_path_factory.mktemp("fanout")
    db_url = f"sqlite:///{work / 'dag.db'}"
    with run_ingest(db_url, work) as ingest, run_jaeger(
        COLLECTOR_CONFIG, work, "jaeger-collector",
        CMBAGENT_OTEL_INGEST_ENDPOINT=ingest, CMBAGENT_OTEL_INGEST_TOKEN=INGEST_TOKEN,
    ) as collector:
        yield FanOut(collector, db_url)


def check_run(fanout: FanOut, local: dict) -> None:
    """Jaeger has exactly the exported spans, and the DAG rows describe that same trace."""
    assert_workflow_tree(local)
    (trace_id,) = trace_ids(local)
    remote = read_trace(fanout.collector, trace_id, len(local))
    assert_same_spans(remote, local)
    assert_ui_api_agrees(fanout.collector, remote)
    assert_db_describes(wait_for_db(fanout.db_url, remote), remote)


def test_one_application_through_the_collector(fanout: FanOut, tmp_path: Path) -> None:
    out = tmp_path / "spans.json"
    env = app_env("grpc", fanout.collector, "cmbagent-collector")
    check_run(fanout, finish_app(start_app(env, out, "through the collector"), out))


def test_several_applications_at_once(fanout: FanOut, tmp_path: Path) -> None:
    protocols = ["grpc", "http/protobuf", "grpc"]
    procs = []
    for i, protocol in enumerate(protocols):   # all running at the same time
        out = tmp_path / f"spans-{i}.json"
        env = app_env(protocol, fanout.collector, f"cmbagent-app-{i}")
        procs.append((start_app(env, out, f"concurrent run {i}"), out))
    runs = [finish_app(proc, out) for proc, out in procs]

    assert len(set().union(*(trace_ids(r) for r in runs))) == len(protocols)
    for local in runs:
        check_run(fanout, local)
