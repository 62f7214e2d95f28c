"""Thirty-second fault campaign: a gRPC batch sent again is stored once.

A call whose deadline passes while its batch is being written is stored, while its client saw
DEADLINE_EXCEEDED and (an OTLP exporter does) sends the same batch again. The write cannot be taken back
once it runs, so what keeps the data right is that a batch written twice gives the tables a batch written
once gives: the writer derives its rows' ids from the trace and span ids, so a row written again lands on
itself. Pinned here on a real run's spans over a real gRPC channel, against
the tables one direct write gives, on SQLite and (when configured) PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from cmbagent_otel.ingest import IngestServer
from tests.conftest import PG_ENV, schema_in
from tests.faults.conftest import dump, plan_run_spans, reference

from .test_ingest_slow_clients import EXPORT, WAIT


@pytest.fixture(params=["sqlite", "postgresql"])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two empty databases of one kind: the receiver's, and the one direct write's."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ingest.db'}", f"sqlite:///{tmp_path / 'direct.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set")
    with schema_in(base) as ingest, schema_in(base) as direct:
        yield ingest, direct


def test_a_grpc_batch_sent_again_leaves_the_tables_of_one_write(urls: tuple[str, str]) -> None:
    """The same request twice (a client retrying after DEADLINE_EXCEEDED for a call the receiver stored)
    and then a third time after another run's batch: the tables are those of one direct write of both runs."""
    ingest_url, direct_url = urls
    first, second = plan_run_spans("retried"), plan_run_spans("other")
    body = encode_spans(first).SerializeToString()
    with IngestServer(ingest_url, port=0, grpc_port=0, request_timeout=600) as srv, \
            grpc.insecure_channel(srv.grpc_endpoint) as channel:
        export = channel.unary_unary(EXPORT)
        for request in (body, body, encode_spans(second).SerializeToString(), body):
            reply = ExportTraceServiceResponse.FromString(export(request, timeout=WAIT))
            assert not reply.HasField("partial_success")
    tables = dump(ingest_url)
    assert tables == reference([*first, *second], direct_url)
    assert len(tables["workflow_runs"]) == 2 and len(tables["dag_nodes"]) >= 8  # not vacuous: both runs, their steps
